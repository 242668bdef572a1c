"""Files and folders that appear complete or not at all.

Every output a later run or reader trusts (checkpoints, exported models, shards, manifests, bundled photos,
reports) is written under a temporary name in the same folder and renamed into place: a kill at any moment
leaves the old version or the new one, never half a file that a resumed run would take as done.

What is renamed into place gets the mode a plain `open(path, "w")` (or mkdir) gives there: some writers create
their file readable by its owner only (safetensors' save_file: 0600 whatever the umask, and it writes our exported
codecs, pipelines, LDM files and checkpoints), which another account or a ComfyUI server could not read.
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _temp_name(path: Path) -> Path:
    """A hidden name beside `path`, unique to this process, whose suffix no image or shard reader picks up."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def plain_modes(folder: Path) -> tuple[int, int]:
    """(file mode, folder mode) that open(..., "w") and mkdir give a new entry in `folder`: 0666 and 0777 less the
    umask (and less what a default ACL there takes away). Measured by making one of each: the umask can only be read
    by changing it, and meanwhile another thread (tensorboard's writer) would create its files unmasked."""
    probe = folder / f".mode-probe.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        file_mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        probe.unlink()
    probe.mkdir(0o777)
    try:
        folder_mode = stat.S_IMODE(probe.stat().st_mode)
    finally:
        probe.rmdir()
    return file_mode, folder_mode


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None], fsync: bool = False) -> None:
    """`write(tmp)` writes the file at a temp name, which then replaces `path` (os.replace is atomic)."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        write(tmp)
        os.chmod(tmp, plain_modes(path.parent)[0])
        if fsync:  # the bytes reach the disk before the name does: a power cut cannot leave an empty file
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes_atomically(path: str | os.PathLike, payload: bytes, fsync: bool = False) -> None:
    write_atomically(path, lambda tmp: tmp.write_bytes(payload), fsync=fsync)


def save_figure(fig, path: str | os.PathLike, dpi: int) -> Path:
    """A matplotlib figure as a PNG at `path` (its folder created), written atomically; the figure is closed, so a
    long study that plots many does not keep them all in memory."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    plt.close(fig)
    return path


def folder_temp_name(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _give_plain_modes(root: Path) -> None:
    """Every file and folder under `root`, and root itself, gets the mode a plain open / mkdir gives there."""
    file_mode, folder_mode = plain_modes(root.parent)
    for parent, folders, files in os.walk(root):
        for names, mode in ((files, file_mode), (folders, folder_mode)):
            for name in names:
                entry = os.path.join(parent, name)
                if not os.path.islink(entry):  # a link's target is not ours to change
                    os.chmod(entry, mode)
    os.chmod(root, folder_mode)


def replace_folder(tmp: Path, path: Path) -> None:
    """Put the complete folder `tmp` in the place of `path` (an older `path` is removed first)."""
    _give_plain_modes(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


@contextmanager
def folder_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty `<path>.tmp` to fill; when the block ends without error it replaces `path`. After an error
    `path` is untouched and the temp folder is cleared by the next call."""
    final = Path(path)
    tmp = folder_temp_name(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    replace_folder(tmp, final)
