"""IDX files, the MNIST format: reading them, and the data sets ``"mnist"`` and ``"fashion-mnist"``.

Each data set is four files, :data:`IDX_FILES`, looked for in ``<root>/<name>/`` either
gzip-compressed (``.gz``, as distributed) or uncompressed, where ``<root>`` is
:func:`~sparsetrain.data.files.resolve_data_root`. Finding, downloading (from :data:`MIRRORS`) and
checking them (against the sha256 of their *decompressed* content, :data:`SHA256`) is
:mod:`sparsetrain.data.files`' job; this module reads the format.

    >>> header = bytes([0, 0, 0x08, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    >>> parse_idx(header + bytes(range(6))).tolist()
    [[0, 1, 2], [3, 4, 5]]
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import SparsetrainError
from .args import ImageArgs
from .base import RawData, register_dataset
from .files import DATA_ENV, FIX_BAD_FILE, MIRRORS, SHA256, VERIFIED_FILE, DataFile, locate_files
from .files import bad_file as _bad_file
from .files import read_content as _read_payload
from .files import resolve_data_root
from .files import verify as verify_file

# DATA_ENV and VERIFIED_FILE are re-exported for code written when they lived here.
__all__ = [
    "DATA_ENV", "IDX_FILES", "MIRRORS", "SHA256", "VERIFIED_FILE",
    "idx_files", "load_idx_dataset", "parse_idx", "read_idx", "resolve_data_root",
]

#: The four files of an IDX data set, without the ``.gz`` suffix; train images, train labels,
#: test images, test labels.
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# sha256 of the decompressed content, keyed by "<data set>/<file without .gz>" (in the shared table).
SHA256.update({
    "mnist/train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "mnist/train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "mnist/t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "mnist/t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    "fashion-mnist/t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "fashion-mnist/t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    "fashion-mnist/train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "fashion-mnist/train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
})

# Base URLs tried in order; a file's URL is ``<mirror>/<file>.gz`` (in the shared MIRRORS dict).
MIRRORS.update({
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ],
    "fashion-mnist": [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
    ],
})

NUM_CLASSES = {"mnist": 10, "fashion-mnist": 10}

# IDX type codes; multi-byte values are big-endian on disk.
_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


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
    files = idx_files(name)
    paths = locate_files(name, files, data_dir, download)
    arrays = []
    for file, path in zip(files, paths):
        payload = _read_payload(path)
        if verify:
            verify_file(path, file.sha256, payload)
        arrays.append(parse_idx(payload, path))
    num_classes = NUM_CLASSES.get(name, 10)
    train_x, train_y = _images_and_labels(arrays[0], arrays[1], paths[0], paths[1], num_classes)
    test_x, test_y = _images_and_labels(arrays[2], arrays[3], paths[2], paths[3], num_classes)
    return RawData(train_x, train_y, test_x, test_y, num_classes)


def idx_files(name: str) -> list[DataFile]:
    """The four gzip :class:`DataFile` of IDX data set ``name``, with their checksums from :data:`SHA256`."""
    return [DataFile(f"{base}.gz", SHA256.get(f"{name}/{base}"), gzip=True) for base in IDX_FILES]


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
            f"One of them is wrong: {FIX_BAD_FILE}"
        )
    labels = labels.to(torch.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        found = f"{labels.min().item()}..{labels.max().item()}"
        raise _bad_file(labels_path, f"labels must lie in [0, {num_classes}), found {found}")
    return images.unsqueeze(1), labels


@register_dataset("mnist", args=ImageArgs)
def mnist(data_dir: str | Path | None = None, download: bool = True, args: ImageArgs | None = None) -> RawData:
    """MNIST handwritten digits: 60000 train / 10000 test uint8 images (1, 28, 28), 10 classes."""
    return load_idx_dataset("mnist", data_dir, download)


@register_dataset("fashion-mnist", args=ImageArgs)
def fashion_mnist(
    data_dir: str | Path | None = None, download: bool = True, args: ImageArgs | None = None
) -> RawData:
    """Fashion-MNIST clothing images: 60000 train / 10000 test uint8 (1, 28, 28), 10 classes."""
    return load_idx_dataset("fashion-mnist", data_dir, download)
