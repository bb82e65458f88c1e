"""IDX files, the MNIST format: reading, locating, checksums and downloading.

Registers the data sets ``"mnist"`` and ``"fashion-mnist"``. Each is four files,
:data:`IDX_FILES`, looked for in ``<root>/<name>/`` either gzip-compressed (``.gz``, as
distributed) or uncompressed, where ``<root>`` is :func:`resolve_data_root`. Missing files are
downloaded from :data:`MIRRORS` (tests point that dict at ``file://`` folders).

Every file is checked against the sha256 of its *decompressed* content (:data:`SHA256`):
recompressed copies are still accepted, and a wrong or damaged file is refused with a message
that says which file and what to do. Successful checks are remembered for the process and in a
``.verified.json`` next to the files (keyed by size and mtime, so a changed file is re-checked).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import SparsetrainError
from .base import DATASETS, RawData

#: The four files of an IDX data set, without the ``.gz`` suffix; train images, train labels,
#: test images, test labels.
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

#: sha256 of the decompressed content, keyed by ``"<data set>/<file without .gz>"``.
SHA256: dict[str, str] = {
    "mnist/train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "mnist/train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "mnist/t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "mnist/t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    "fashion-mnist/t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "fashion-mnist/t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    "fashion-mnist/train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "fashion-mnist/train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
}

#: Base URLs tried in order; a file's URL is ``<mirror>/<file>.gz``. Module-level so that tests
#: (and users behind a proxy) can replace them.
MIRRORS: dict[str, list[str]] = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ],
    "fashion-mnist": [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
    ],
}

NUM_CLASSES = {"mnist": 10, "fashion-mnist": 10}

DATA_ENV = "SPARSETRAIN_DATA"
DOWNLOAD_TIMEOUT_S = 60.0
VERIFIED_FILE = ".verified.json"

# IDX type codes; multi-byte values are big-endian on disk.
_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# (resolved path, size, mtime_ns, expected sha256) of files already checked in this process:
# the shared copy may be read-only, so the JSON cache cannot always help.
_VERIFIED_IN_PROCESS: set[tuple[str, int, int, str]] = set()

_FIX_BAD_FILE = "Delete it so that it is downloaded again, or replace it with a good copy."


# ---------------------------------------------------------------------------------------------
# Reading


def read_idx(path: str | Path) -> torch.Tensor:
    """The array in IDX file ``path`` (gzip if its name ends in ``.gz``) as a native-order tensor.

    Raises SparsetrainError naming the file for bad gzip data, a wrong magic number, an unknown
    type code, or a payload whose length does not match the header's dimensions.
    """
    return parse_idx(_read_payload(Path(path)), path)


def parse_idx(data: bytes, source: str | Path = "<bytes>") -> torch.Tensor:
    """Decode the bytes of an (uncompressed) IDX file; ``source`` names it in error messages."""
    if len(data) < 4:
        raise _bad_file(source, f"only {len(data)} bytes, too short for an IDX header")
    code, ndim = data[2], data[3]
    if data[:2] != b"\0\0" or ndim == 0:
        raise _bad_file(
            source,
            f"not an IDX file: magic number 0x{data[:4].hex()} (expected 0x0000TTNN: type code TT, "
            "NN >= 1 dimensions)",
        )
    if code not in _DTYPES:
        raise _bad_file(source, f"unknown IDX type code 0x{code:02x} in magic number 0x{data[:4].hex()}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _bad_file(source, f"truncated header: {len(data)} bytes, {ndim} dimensions need {header}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_DTYPES[code])
    expected, actual = math.prod(dims) * dtype.itemsize, len(data) - header
    if actual != expected:
        how = "truncated" if actual < expected else "trailing bytes"
        raise _bad_file(
            source, f"{how}: payload is {actual} bytes but dimensions {dims} of {dtype.name} need {expected}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    # astype copies into a writable, native-order array (torch warns on read-only buffers).
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def _read_payload(path: Path) -> bytes:
    """The file's uncompressed content; ``.gz`` files are decompressed."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SparsetrainError(f"cannot read {path}: {e}") from e
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; truncation is EOFError
        raise _bad_file(path, f"bad gzip data ({e})") from e


def _bad_file(path: str | Path, problem: str) -> SparsetrainError:
    return SparsetrainError(f"{path}: {problem}. {_FIX_BAD_FILE}")


# ---------------------------------------------------------------------------------------------
# Locating


def resolve_data_root(data_dir: str | Path | None = None) -> Path:
    """The data root: ``data_dir`` if given, else ``$SPARSETRAIN_DATA``, else ``~/.cache/sparsetrain``.

    Data set ``name`` lives in ``<root>/<name>/``.
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "sparsetrain"


def _find_file(folder: Path, base: str) -> Path | None:
    """``<folder>/<base>.gz`` or, failing that, the uncompressed ``<folder>/<base>``."""
    for candidate in (folder / f"{base}.gz", folder / base):
        if candidate.is_file():
            return candidate
    return None


# ---------------------------------------------------------------------------------------------
# Checksums


def _verify(path: Path, payload: bytes, key: str) -> None:
    """Refuse ``path`` unless sha256(payload) matches ``SHA256[key]`` (no entry: nothing to check)."""
    expected = SHA256.get(key)
    if expected is None or _is_verified(path, expected):
        return
    found = hashlib.sha256(payload).hexdigest()
    if found != expected:
        raise SparsetrainError(
            f"{path} is corrupt: sha256 of its decompressed content is {found}, expected {expected}. "
            f"{_FIX_BAD_FILE}"
        )
    _mark_verified(path, expected)


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _is_verified(path: Path, expected: str) -> bool:
    resolved, size, mtime_ns = _stat_key(path)
    if (resolved, size, mtime_ns, expected) in _VERIFIED_IN_PROCESS:
        return True
    entry = _read_verified(path.parent).get(path.name)
    return entry == {"size": size, "mtime_ns": mtime_ns, "sha256": expected}


def _mark_verified(path: Path, expected: str) -> None:
    resolved, size, mtime_ns = _stat_key(path)
    _VERIFIED_IN_PROCESS.add((resolved, size, mtime_ns, expected))
    if not _writable(path.parent):  # a read-only shared copy is simply hashed once per process
        return
    entries = _read_verified(path.parent)
    entries[path.name] = {"size": size, "mtime_ns": mtime_ns, "sha256": expected}
    try:  # best effort: it is only a cache
        _write_json_atomically(path.parent / VERIFIED_FILE, entries)
    except OSError:
        pass


def _write_json_atomically(dest: Path, obj: object) -> None:
    # Temp file + os.replace: a concurrent reader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the cache from other users of the folder
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _writable(folder: Path) -> bool:
    # os.access alone says yes to root; a folder without write bits is meant to stay untouched.
    try:
        return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)
    except OSError:
        return False


def _read_verified(folder: Path) -> dict:
    try:
        entries = json.loads((folder / VERIFIED_FILE).read_text())
    except (OSError, ValueError):  # absent or damaged: it is only a cache
        return {}
    return entries if isinstance(entries, dict) else {}


# ---------------------------------------------------------------------------------------------
# Downloading


def _download(name: str, base: str, folder: Path) -> tuple[Path | None, list[str]]:
    """Fetch ``<base>.gz`` into ``folder`` from the first mirror that serves a good copy.

    Returns the path (None if every mirror failed) and one ``"url: error"`` line per failure.
    """
    errors = []
    for mirror in MIRRORS.get(name, []):
        url = f"{mirror.rstrip('/')}/{base}.gz"
        try:
            return _fetch(url, folder / f"{base}.gz", f"{name}/{base}"), errors
        except (OSError, ValueError, EOFError, zlib.error) as e:  # URLError, HTTPError are OSErrors
            errors.append(f"{url}: {e}")
    return None, errors


def _fetch(url: str, dest: Path, key: str) -> Path:
    """Download ``url`` to a temp file beside ``dest``, check it, then move it into place.

    The temp file + ``os.replace`` means an interrupted download never leaves a half file under
    the real name.
    """
    expected = SHA256.get(key)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            shutil.copyfileobj(resp, out)
        found = hashlib.sha256(gzip.decompress(Path(tmp).read_bytes())).hexdigest()
        if expected is not None and found != expected:
            raise ValueError(f"downloaded file is corrupt: sha256 {found}, expected {expected}")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a data cache is meant to be shared
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if expected is not None:
        _mark_verified(dest, expected)
    return dest


# ---------------------------------------------------------------------------------------------
# Loading


def load_idx_dataset(
    name: str, data_dir: str | Path | None = None, download: bool = True, *, verify: bool = True
) -> RawData:
    """Load IDX data set ``name`` from ``<root>/<name>/`` (root: :func:`resolve_data_root`).

    Missing files are downloaded from ``MIRRORS[name]`` when ``download`` is true. With ``verify``
    each file's decompressed sha256 is checked against :data:`SHA256`. Images come back as uint8
    (N, 1, H, W), labels as int64 (N,). Any problem raises SparsetrainError saying what to do.
    """
    root = resolve_data_root(data_dir)
    folder = root / name
    paths = _locate_or_download(name, root, folder, download)
    arrays = []
    for base, path in zip(IDX_FILES, paths):
        payload = _read_payload(path)
        if verify:
            _verify(path, payload, f"{name}/{base}")
        arrays.append(parse_idx(payload, path))
    num_classes = NUM_CLASSES.get(name, 10)
    train_x, train_y = _images_and_labels(arrays[0], arrays[1], paths[0], paths[1], num_classes)
    test_x, test_y = _images_and_labels(arrays[2], arrays[3], paths[2], paths[3], num_classes)
    return RawData(train_x, train_y, test_x, test_y, num_classes)


def _locate_or_download(name: str, root: Path, folder: Path, download: bool) -> list[Path]:
    """Paths of the four files, in :data:`IDX_FILES` order, downloading missing ones if allowed."""
    found = {base: _find_file(folder, base) for base in IDX_FILES}
    missing = [base for base, path in found.items() if path is None]
    if missing and not download:
        raise _not_found(name, root, folder, missing, "Downloading is off (download=False).")
    if missing:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            reason = f"Cannot create {folder} to download into: {e}."
            raise _not_found(name, root, folder, missing, reason) from e
    for base in missing:  # stop at the first file no mirror can serve: the data set is unusable
        found[base], errors = _download(name, base, folder)
        if found[base] is None:
            tried = "".join(f"\n  {e}" for e in errors) or f" no mirrors are configured for {name!r}."
            raise _not_found(name, root, folder, missing, f"Downloading {base}.gz failed:{tried}")
    return [found[base] for base in IDX_FILES]


def _not_found(name: str, root: Path, folder: Path, missing: list[str], reason: str) -> SparsetrainError:
    expected = ", ".join(f"{base}.gz" for base in IDX_FILES)
    lines = [
        f"{name} data not found in {folder} (data root {root}).",
        f"Expected the four files {expected} (each may also be uncompressed, without .gz).",
        f"Missing: {', '.join(missing)}.",
        reason,
    ]
    if _find_file(root, IDX_FILES[0]) is not None:
        lines.append(f"Note: {root} itself holds IDX files; the data root must be its parent folder.")
    lines.append(
        f"Fix: put the files in {folder}, or point to a data root that has a {name}/ folder with them: "
        f"--data-dir DIR or {DATA_ENV}=DIR."
    )
    return SparsetrainError("\n".join(lines))


def _images_and_labels(
    images: torch.Tensor, labels: torch.Tensor, images_path: Path, labels_path: Path, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check an images/labels pair fits together; images get a channel dimension, labels int64."""
    if images.dim() != 3:
        raise _bad_file(images_path, f"expected 3 dimensions (N, H, W), found shape {tuple(images.shape)}")
    if labels.dim() != 1:
        raise _bad_file(labels_path, f"expected 1 dimension (N,), found shape {tuple(labels.shape)}")
    if len(images) != len(labels):
        raise SparsetrainError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels. "
            f"One of them is wrong: {_FIX_BAD_FILE}"
        )
    labels = labels.to(torch.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        found = f"{labels.min().item()}..{labels.max().item()}"
        raise _bad_file(labels_path, f"labels must lie in [0, {num_classes}), found {found}")
    return images.unsqueeze(1), labels


@DATASETS.register("mnist")
def mnist(data_dir: str | Path | None = None, download: bool = True) -> RawData:
    """MNIST handwritten digits: 60000 train / 10000 test uint8 images (1, 28, 28), 10 classes."""
    return load_idx_dataset("mnist", data_dir, download)


@DATASETS.register("fashion-mnist")
def fashion_mnist(data_dir: str | Path | None = None, download: bool = True) -> RawData:
    """Fashion-MNIST clothing images: 60000 train / 10000 test uint8 (1, 28, 28), 10 classes."""
    return load_idx_dataset("fashion-mnist", data_dir, download)
