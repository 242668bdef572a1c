"""Where input data lies, found with one listing: what kind of data a `--data` string names and which files hold it.

A local folder is walked once (one os.scandir per directory); a bucket prefix is listed once (one recursive
`fs.find`). Brace patterns (`shards/{00000..09999}.tar`, `{a,b}`) and globs are matched against that one listing
of their fixed prefix. Dozens of recursive globs (datasets' imagefolder resolves 66 patterns, ~650k stat calls
for 10k files) are what made start-up take hours at 10M images.

File names are kept relative to the listed root, so the same data gives the same names whether it lies in a
folder or behind a URL. Names of a big folder are kept as sorted numpy byte strings (utf-8), never as millions of
Python objects.

A custom S3 endpoint (MinIO, an on-premise store) is set as AWS's tools set it: `AWS_ENDPOINT_URL` with
`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (s3fs reads them). The listing fails fast with one line naming
the URL: few retries and short connect timeouts, so an unreachable endpoint costs about a second, not minutes.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
from dataclasses import dataclass, field

import numpy as np
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

# What datasets' imagefolder takes as an image, so a folder holds the same images as before.
IMAGE_EXTENSIONS = frozenset(ImageFolder.EXTENSIONS)
METADATA_NAMES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
# Files save_to_disk writes: dataset_dict.json for a DatasetDict, state.json + dataset_info.json for a Dataset.
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
DATA_SUFFIXES = {".tar": "webdataset", ".parquet": "parquet", ".arrow": "table"}

# Listing a bucket at start-up: fail in about a second when the endpoint is down, instead of botocore's and
# s3fs's nested retries (25 attempts with back-off, ~11 s for a refused connection, minutes for a silent host).
_QUICK_OPTIONS = {"s3": {"config_kwargs": {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 2}}}}
_QUICK_RETRIES = 2
_CHUNK = 1 << 16
_FILE_FIELDS = {".tar": "tars", ".parquet": "parquets", ".arrow": "arrows"}


def is_url(data: str) -> bool:
    return "://" in data


def local_path(data: str) -> str:
    """`file://` URLs are local paths: walked with os.scandir like any folder."""
    return data[len("file://"):] if data.startswith("file://") else data


def join(root: str, name: str) -> str:
    """The location of `name` under `root` (a local path or a URL)."""
    return f"{root.rstrip('/')}/{name}" if name else root


def unreachable(url: str, exc: BaseException) -> OSError:
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    where = f" (AWS_ENDPOINT_URL={endpoint})" if endpoint and url.startswith("s3://") else ""
    return OSError(f"cannot reach {url}{where}: {type(exc).__name__}: {' '.join(str(exc).split())}. For a custom S3 "
                   f"endpoint set AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")


def quick_filesystem(url: str):
    """(fs, path) for a URL, with short retries and timeouts: for listing and reading headers at start-up."""
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True, **_QUICK_OPTIONS.get(protocol, {}))
    except (ImportError, ValueError) as exc:  # no fsspec implementation for the protocol, a malformed URL
        raise ValueError(f"cannot read {url}: {exc}") from None
    if hasattr(fs, "retries"):
        fs.retries = _QUICK_RETRIES
    return fs, path


def open_file(location: str, fs=None):
    """A binary, seekable file at a local path or URL; `fs` (from quick_filesystem) for start-up reads."""
    if not is_url(location):
        return open(location, "rb")
    if fs is not None:
        return fs.open(location, "rb")
    import fsspec

    return fsspec.open(location, "rb").open()


# ---------------------------------------------------------------------------------------------------------------
# One listing
# ---------------------------------------------------------------------------------------------------------------


class _Names:
    """Relative paths gathered into numpy byte-string chunks, so 10M names never live as 10M Python objects."""

    def __init__(self):
        self.chunks: list[np.ndarray] = []
        self.pending: list[bytes] = []

    def add(self, name: bytes) -> None:
        self.pending.append(name)
        if len(self.pending) >= _CHUNK:
            self.chunks.append(np.array(self.pending, dtype=np.bytes_))
            self.pending = []

    def sorted(self) -> np.ndarray:
        """Sorted by utf-8 bytes, which is the order Python's sorted() gives the decoded names."""
        if self.pending:
            self.chunks.append(np.array(self.pending, dtype=np.bytes_))
            self.pending = []
        return np.sort(np.concatenate(self.chunks)) if self.chunks else np.array([], dtype="S1")


@dataclass
class Listing:
    """The files under `root`, by what they hold; names relative to root, '/'-separated, sorted."""

    root: str
    images: np.ndarray
    texts: np.ndarray  # .txt files: captions beside images
    metadata: list[str] = field(default_factory=list)  # metadata.jsonl/csv/parquet anywhere below root
    tars: list[str] = field(default_factory=list)
    parquets: list[str] = field(default_factory=list)
    arrows: list[str] = field(default_factory=list)
    markers: list[str] = field(default_factory=list)  # save_to_disk's files at the top level

    def data_files(self) -> list[str]:
        return self.tars + self.parquets + self.arrows


class _Sorter:
    """Sorts each listed name into its Listing field by suffix."""

    def __init__(self):
        self.images, self.texts = _Names(), _Names()
        self.others: dict[str, list[str]] = {"metadata": [], "tars": [], "parquets": [], "arrows": [], "markers": []}

    def add(self, name: bytes) -> None:
        base = os.fsdecode(name.rsplit(b"/", 1)[-1])
        suffix = os.path.splitext(base)[1].lower()
        if base in METADATA_NAMES:
            self.others["metadata"].append(os.fsdecode(name))
        elif suffix in IMAGE_EXTENSIONS:
            self.images.add(name)
        elif suffix == ".txt":
            self.texts.add(name)
        elif suffix in _FILE_FIELDS:
            self.others[_FILE_FIELDS[suffix]].append(os.fsdecode(name))
        elif b"/" not in name and base in SAVED_DATASET_MARKERS:
            self.others["markers"].append(base)

    def listing(self, root: str) -> Listing:
        others = {key: sorted(names) for key, names in self.others.items()}
        return Listing(root, self.images.sorted(), self.texts.sorted(), **others)


def _skipped(name: bytes, is_dir: bool) -> bool:
    """Hidden files and folders (temp files of atomic writers among them) and __pycache__-like folders, as datasets
    skips them."""
    return name.startswith(b".") or (is_dir and name.startswith(b"__"))


def _walk_local(root: str, sorter: _Sorter, depth: int | None) -> None:
    """One os.scandir per directory, `depth` folders deep at most (None: all); symlinked folders are not followed
    (a link loop would never end)."""
    base = os.fsencode(root)
    pending = [(b"", 0)]
    while pending:
        rel, level = pending.pop()
        with os.scandir(base + b"/" + rel if rel else base) as entries:
            for entry in entries:
                is_dir = entry.is_dir(follow_symlinks=False)
                if _skipped(entry.name, is_dir):
                    continue
                name = rel + b"/" + entry.name if rel else entry.name
                if not is_dir:
                    sorter.add(name)
                elif depth is None or level < depth:
                    pending.append((name, level + 1))


def _walk_url(url: str, sorter: _Sorter, depth: int | None) -> None:
    """One recursive listing of the prefix (s3fs: list_objects_v2 without a delimiter, paged)."""
    fs, path = quick_filesystem(url)
    path = path.rstrip("/")
    try:
        found = fs.find(path, detail=False, maxdepth=None if depth is None else depth + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} does not exist (no such bucket or prefix)") from None
    except Exception as exc:  # any failure to list a remote prefix means the data cannot be reached from here
        raise unreachable(url, exc) from None
    for full in found:
        rel = full[len(path) + 1:] if full.startswith(path + "/") else posixpath.basename(full)
        parts = rel.split("/")
        if any(_skipped(p.encode(), True) for p in parts[:-1]) or _skipped(parts[-1].encode(), False):
            continue
        sorter.add(os.fsencode(rel))


def list_folder(root: str, depth: int | None = None) -> Listing:
    """Every file under `root` (a local folder or a URL prefix) and at most `depth` folders below it, by kind,
    from one listing."""
    sorter = _Sorter()
    if is_url(root):
        _walk_url(root, sorter, depth)
    else:
        _walk_local(root, sorter, depth)
    return sorter.listing(root)


def _exists_url(url: str) -> bool:
    fs, path = quick_filesystem(url)
    try:
        return fs.isfile(path)
    except FileNotFoundError:
        return False
    except Exception as exc:  # as in _walk_url
        raise unreachable(url, exc) from None


# ---------------------------------------------------------------------------------------------------------------
# Patterns: braces and globs against one listing of their fixed prefix
# ---------------------------------------------------------------------------------------------------------------

_BRACE = re.compile(r"\{([^{}]*)\}")
_GLOB_CHARS = "*?["


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: `{00000..00009}` (zero padding kept, also descending) and `{a,b}`, nested and
    repeated; the innermost braces expand first. Order kept, duplicates dropped."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if numeric:
        first, last = numeric.groups()
        padded = any(len(end.lstrip("-")) > 1 and end.lstrip("-").startswith("0") for end in (first, last))
        width = max(len(first), len(last)) if padded else 0
        step = 1 if int(last) >= int(first) else -1
        words = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    elif "," in body:
        words = body.split(",")
    else:  # a literal brace pair, as in bash
        return [pattern[: match.end()] + rest for rest in expand_braces(pattern[match.end():])]
    expanded = []
    for word in words:
        expanded += expand_braces(pattern[: match.start()] + word + pattern[match.end():])
    return list(dict.fromkeys(expanded))


def is_pattern(data: str) -> bool:
    return _BRACE.search(data) is not None or any(c in data for c in _GLOB_CHARS)


def _split_pattern(pattern: str) -> tuple[str, str]:
    """(the folder before the pattern's first brace or glob character, the rest of the pattern relative to it)."""
    cut = min((i for i, c in enumerate(pattern) if c in "{" + _GLOB_CHARS), default=len(pattern))
    if "/" not in pattern[:cut]:
        return ".", pattern
    root = pattern[:cut].rpartition("/")[0]
    return root or "/", pattern[len(root) + 1:]


def _glob_matches(pattern: str, name: str) -> bool:
    """fnmatch, where '*' stays within one folder unless the pattern says '**'."""
    if "**" not in pattern and pattern.count("/") != name.count("/"):
        return False
    return fnmatch.fnmatchcase(name, pattern)


def match_pattern(data: str) -> tuple[Listing, list[str]]:
    """(listing of the pattern's fixed prefix, the names it selects, sorted). Every name a brace pattern spells
    must exist: a missing shard is an error, not a silently smaller dataset."""
    root, relative = _split_pattern(data)
    # Only as deep as the pattern reaches: `*.tar` in a checkout must not walk the whole tree below it.
    listing = list_folder(root, None if "**" in relative else relative.count("/"))
    spelled = expand_braces(relative)
    names = sorted(n for n in listing.data_files() if any(_glob_matches(p, n) for p in spelled))
    if not any(c in relative for c in _GLOB_CHARS):
        present = set(names)
        missing = [n for n in spelled if n not in present]
        if missing:
            raise FileNotFoundError(
                f"{data!r} names {len(spelled)} files, {len(missing)} of them missing under {root} (first: "
                f"{', '.join(missing[:3])}); pass the folder itself to take the files that exist"
            )
    if not names:
        raise FileNotFoundError(f"no files match {data!r}; pass existing .tar/.parquet/.arrow files, a folder or a "
                                f"pattern of them")
    return listing, names


# ---------------------------------------------------------------------------------------------------------------
# What a --data string names
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Found:
    """kind: folder | webdataset | parquet | table | hub. `root` is where `names` (the unit files: tars, parquet,
    arrow) are relative to; `listing` the folder's listing (folder, and a save_to_disk folder: table)."""

    data: str
    kind: str
    root: str = ""
    names: list[str] = field(default_factory=list)
    listing: Listing | None = None

    def locations(self) -> list[str]:
        return [join(self.root, name) for name in self.names]


def _looks_like_a_path(data: str) -> bool:
    """A string the user meant as a path (a Hub name is 'owner/name' or 'name')."""
    return data.startswith(("/", "./", "../", "~")) or os.path.splitext(data)[1].lower() in DATA_SUFFIXES


def _single_file(data: str, where: str) -> Found:
    suffix = os.path.splitext(where)[1].lower()
    if suffix not in DATA_SUFFIXES:
        raise ValueError(
            f"{data!r} is a file but not .parquet/.arrow/.tar; pass an image folder, a save_to_disk directory, "
            f"parquet/arrow files or webdataset tars"
        )
    root, name = where.rsplit("/", 1) if "/" in where else (".", where)
    return Found(data, DATA_SUFFIXES[suffix], root, [name])


def _from_listing(data: str, listing: Listing) -> Found:
    """A folder's kind from what it holds: save_to_disk's files, tars (img2dataset's .parquet beside them are
    metadata), parquet or arrow files, else images."""
    if any(m in listing.markers for m in ("dataset_dict.json", "state.json")):
        return Found(data, "table", listing.root, [], listing)
    if listing.tars and len(listing.images):
        raise ValueError(f"{data!r} holds both images and .tar files; pass the folder (or a pattern) of one of them")
    if listing.tars:
        return Found(data, "webdataset", listing.root, listing.tars, listing)
    if not len(listing.images):
        for kind, files in (("parquet", listing.parquets), ("table", listing.arrows)):
            if files:
                return Found(data, kind, listing.root, files, listing)
    return Found(data, "folder", listing.root, [], listing)


def find_data(data: str) -> Found:
    """What `data` names, from one listing. Raises one clear line for a path or URL that holds nothing usable."""
    where = local_path(data)
    if is_pattern(where):
        listing, names = match_pattern(where)
        kinds = {DATA_SUFFIXES[os.path.splitext(n)[1].lower()] for n in names}
        if len(kinds) > 1:
            raise ValueError(f"{data!r} matches files of different kinds ({sorted(kinds)}); pass one kind at a time")
        return Found(data, kinds.pop(), listing.root, names)
    if is_url(where):
        where = where.rstrip("/")
        if os.path.splitext(where)[1].lower() in DATA_SUFFIXES:
            if not _exists_url(where):
                raise FileNotFoundError(f"{data} does not exist")
            return _single_file(data, where)
        listing = list_folder(where)
        if not (len(listing.images) or listing.tars or listing.parquets or listing.arrows or listing.markers):
            raise ValueError(f"no data under {data}: expected images, .tar, .parquet or .arrow files there")
        return _from_listing(data, listing)
    if os.path.isdir(where):
        return _from_listing(data, list_folder(where.rstrip("/") or "/"))
    if os.path.exists(where):
        return _single_file(data, where)
    if _looks_like_a_path(where):
        raise FileNotFoundError(f"{data!r} does not exist; pass an existing folder, file or pattern")
    return Found(data, "hub")
