"""The samples of a webdataset tar (img2dataset's `KEY.jpg` + `KEY.txt` + `KEY.json`), read with tarfile: their
bytes (the encoder reads a tar in order), or where their members lie (codec.data.index reads them at random).

Members with the same key (the path up to the first dot of the file name, webdataset's rule) in a row form one
sample. tarfile ends its iteration silently when a header is cut off or garbled, so a tar truncated at a member
boundary would read as a shorter, valid one: here an archive must end with tar's zero block, else BrokenTar.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class BrokenTar(Exception):
    """The archive is truncated or corrupt after `samples` samples; what follows cannot be read."""

    def __init__(self, samples: int, reason: str):
        self.samples = samples
        self.reason = reason
        super().__init__(f"truncated or corrupt tar after {samples} samples: {reason}")


def _key_and_field(member_name: str) -> tuple[str | None, str]:
    """('dir/000123', 'jpg') for 'dir/000123.jpg'; (None, '') for a name without an extension."""
    match = _KEY.match(member_name)
    return (match.group(1), match.group(2).lower()) if match else (None, "")


def _ends_cleanly(fileobj: BinaryIO, offset: int) -> bool:
    """A complete archive has a zero block where tarfile stopped reading headers."""
    fileobj.seek(offset)
    tail = fileobj.read(tarfile.BLOCKSIZE)
    return len(tail) == tarfile.BLOCKSIZE and tail.count(0) == tarfile.BLOCKSIZE


def _samples(fileobj: BinaryIO, value: Callable[[tarfile.TarFile, tarfile.TarInfo], Any]) -> Iterator[tuple]:
    """(key, {field: value(tar, member)}) per sample, in archive order; BrokenTar where the archive stops being
    readable (the sample being assembled then is not yielded: it may be missing members)."""
    done, key, fields = 0, None, {}
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r:")
        while (member := tar.next()) is not None:
            tar.members.clear()  # tarfile keeps every header it read; a unit needs none of them afterwards
            if not member.isfile():
                continue
            member_key, field = _key_and_field(member.name)
            if member_key is None:
                continue
            if member_key != key and key is not None:
                yield key, fields
                done, fields = done + 1, {}
            key = member_key
            fields.setdefault(field, value(tar, member))
        clean = _ends_cleanly(fileobj, tar.offset)
    except (tarfile.TarError, EOFError) as exc:  # an OSError (the disk, the network) is no verdict on the tar
        raise BrokenTar(done, f"{type(exc).__name__}: {exc}") from None
    if not clean:
        raise BrokenTar(done, f"no end-of-archive block at byte {tar.offset}")
    if key is not None:
        yield key, fields


def tar_samples(fileobj: BinaryIO) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) per sample, in archive order; BrokenTar as in _samples."""
    return _samples(fileobj, lambda tar, member: tar.extractfile(member).read())


def tar_members(fileobj: BinaryIO) -> Iterator[tuple[str, dict[str, tuple[int, int]]]]:
    """(key, {field: (offset, size)}) per sample, from the headers alone: where each member's bytes lie in the
    archive (tarfile seeks past the data); the same samples and the same BrokenTar as tar_samples."""
    return _samples(fileobj, lambda tar, member: (member.offset_data, member.size))
