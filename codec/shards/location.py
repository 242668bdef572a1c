"""Where a latent store lives: a local folder or a bucket URL (`s3://`, `gs://`, `file://`, anything fsspec
speaks), behind the few operations the encoder, the verifier and the reader need.

A custom S3 endpoint (MinIO, an on-premise store) is set the way AWS's own tools set it: `AWS_ENDPOINT_URL` with
`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`; s3fs and boto3 (litdata's client) both read them.

Every write is whole or absent: a local file goes to a temp name and is renamed; an object store's PUT of one
object is atomic by itself. So a process killed mid-write never leaves a file a resumed run would take as done.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

from codec.common.atomic import write_bytes_atomically
from codec.data.listing import is_url, local_path, quick_filesystem, unreachable

# What a bucket client raises when the endpoint is down or refuses us: OSError, but also botocore's own exception
# types, which derive from Exception alone. Caught around every bucket call and turned into one line naming the URL.
_CLIENT_ERRORS = (Exception,)


def stream_sha256(fh) -> str:
    """sha256 of an open binary file, read in 4 MB blocks."""
    h = hashlib.sha256()
    for block in iter(lambda: fh.read(1 << 22), b""):
        h.update(block)
    return h.hexdigest()


class Location:
    """A folder or a bucket prefix. Names are '/'-separated paths relative to it."""

    def __init__(self, where: str | os.PathLike):
        where = os.fspath(where)
        self.url = where.rstrip("/") if is_url(where) else where
        self.remote = is_url(where) and not where.startswith("file://")
        if self.remote:
            # Short retries and timeouts: a bucket that cannot be reached is one line in seconds, not minutes.
            self.fs, self.root = quick_filesystem(self.url)
        else:
            self.fs, self.root = None, Path(local_path(where))

    def __str__(self) -> str:
        return self.url

    def join(self, name: str) -> str:
        """The full path or URL of `name`."""
        return f"{self.url}/{name}" if self.remote else os.fspath(self.root / name)

    def _remote(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def _unreachable(self, exc: Exception) -> OSError:
        return unreachable(self.url, exc)

    # ---- reading ---------------------------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        if not self.remote:
            return (self.root / name).exists()
        try:
            return self.fs.exists(self._remote(name))
        except _CLIENT_ERRORS as exc:
            raise self._unreachable(exc) from exc

    def read_bytes(self, name: str) -> bytes:
        if not self.remote:
            return (self.root / name).read_bytes()
        try:
            return self.fs.cat_file(self._remote(name))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.join(name)} does not exist") from None
        except _CLIENT_ERRORS as exc:
            raise self._unreachable(exc) from exc

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def list(self, folder: str = "") -> list[str]:
        """Names of the files directly in `folder` (one listing call), sorted; [] when it does not exist."""
        if not self.remote:
            base = self.root / folder
            return sorted(entry.name for entry in os.scandir(base) if entry.is_file()) if base.is_dir() else []
        prefix = self._remote(folder) if folder else self.root
        try:
            listed = self.fs.ls(prefix, detail=True, refresh=True)
        except FileNotFoundError:
            return []
        except _CLIENT_ERRORS as exc:
            raise self._unreachable(exc) from exc
        return sorted(entry["name"].rsplit("/", 1)[-1] for entry in listed if entry["type"] == "file")

    def sha256(self, name: str) -> str:
        if not self.remote:
            with open(self.root / name, "rb") as fh:
                return stream_sha256(fh)
        try:
            with self.fs.open(self._remote(name), "rb") as fh:
                return stream_sha256(fh)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.join(name)} does not exist") from None
        except _CLIENT_ERRORS as exc:
            raise self._unreachable(exc) from exc

    # ---- writing ---------------------------------------------------------------------------------------------

    def make(self) -> None:
        """Create the folder (a bucket prefix needs nothing); refuses a bucket that cannot be reached."""
        if not self.remote:
            self.root.mkdir(parents=True, exist_ok=True)
            return
        bucket = self.root.split("/", 1)[0]
        try:
            self.fs.ls(bucket, refresh=True)  # raises when the endpoint is down; exists() would say False
        except FileNotFoundError:
            raise OSError(f"cannot write to {self.url}: bucket {bucket!r} does not exist; create it first") from None
        except _CLIENT_ERRORS as exc:
            raise self._unreachable(exc) from exc

    def write_bytes(self, name: str, payload: bytes) -> None:
        if not self.remote:
            (self.root / name).parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomically(self.root / name, payload, fsync=True)
            return
        try:
            self.fs.pipe_file(self._remote(name), payload)
        except _CLIENT_ERRORS as exc:
            raise self._unreachable(exc) from exc

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def get(self, name: str, local: str | os.PathLike, attempts: int = 4) -> None:
        """Copy `name` to the local path `local`, whole or not at all (a temp name, then a rename). A bucket read
        is tried `attempts` times, 1, 2, 4 s apart: a long training run should outlast a moment's outage."""
        partial = f"{os.fspath(local)}.{os.getpid()}.part"
        try:
            if not self.remote:
                shutil.copyfile(self.root / name, partial)
            else:
                for attempt in range(attempts):
                    try:
                        self.fs.get_file(self._remote(name), partial)
                        break
                    except FileNotFoundError:
                        raise
                    except _CLIENT_ERRORS as exc:
                        if attempt == attempts - 1:
                            raise self._unreachable(exc) from exc
                        time.sleep(2**attempt)
            os.replace(partial, local)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.join(name)} does not exist") from None
        finally:
            if os.path.exists(partial):
                os.remove(partial)

    def put(self, local: str | os.PathLike, name: str) -> None:
        """Move (local store) or upload (bucket) a finished local file to `name`."""
        if not self.remote:
            target = self.root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(local, target)  # the temp folder is inside the store: a rename, whole or absent
            return
        try:
            self.fs.put_file(os.fspath(local), self._remote(name))
        except _CLIENT_ERRORS as exc:
            raise self._unreachable(exc) from exc

    def remove(self, name: str) -> None:
        if not self.remote:
            (self.root / name).unlink(missing_ok=True)
            return
        try:
            self.fs.rm_file(self._remote(name))
        except FileNotFoundError:
            pass
