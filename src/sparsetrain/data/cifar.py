"""CIFAR-10 and CIFAR-100 in their official format, the python pickle batches: the data sets
``"cifar10"`` and ``"cifar100"``.

Each is one archive from the authors' page (https://www.cs.toronto.edu/~kriz/cifar.html) whose
publisher gives its md5 (:data:`MD5`), unpacked once into ``<root>/<name>/`` by
:func:`~sparsetrain.data.files.ensure_extracted`:

- ``cifar10/cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5`` (10000 images each) and
  ``test_batch``; ``batches.meta`` holds the class names and is not needed;
- ``cifar100/cifar-100-python/``: ``train`` and ``test``, each image with a ``fine_labels`` (100
  classes) and a ``coarse_labels`` (20 superclasses) entry; data arg ``labels`` chooses.

An already-extracted folder is used as it is; the archive found in ``<root>/<name>/`` is
checked and extracted without a download. Each batch is a pickled dict whose ``data`` is a uint8
array (N, 3072): 1024 red, then 1024 green, then 1024 blue values of a 32x32 image, row-major, i.e.
(N, 3, 32, 32) as it stands. Images stay uint8 in memory (``RawData.keep_uint8``) and are
standardised per batch.

The files are read with a restricted unpickler that builds only dicts, lists, strings, numbers and
NumPy arrays: a pickle can run any code when loaded, and a data file has no business doing so.
"""

from __future__ import annotations

import io
import pickle
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .args import AugmentedImageArgs
from .base import RawData, register_dataset
from .files import MIRRORS, DataFile, bad_file, ensure_extracted, read_content

__all__ = ["ARCHIVES", "MD5", "Cifar10Args", "Cifar100Args", "read_batch"]

#: The archive of each data set, as published.
ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}

#: The md5 the authors publish for each archive (they give no sha256); read at load time, so a
#: test may replace an entry.
MD5 = {"cifar10": "c58f30108f718f92721af3b95e74349a", "cifar100": "eb9058c3a382ffc7106e4002c42a8d85"}

MIRRORS.update({"cifar10": ["https://www.cs.toronto.edu/~kriz/"], "cifar100": ["https://www.cs.toronto.edu/~kriz/"]})

#: The folder inside ``<root>/<name>/`` and its (train, test) batch files.
LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    "cifar100": ("cifar-100-python", ["train"], ["test"]),
}

IMAGE_SHAPE = (3, 32, 32)


@dataclass(frozen=True)
class Cifar10Args(AugmentedImageArgs):
    """CIFAR-10's arguments: ``view`` and the train-time transforms ``random_crop``, ``flip``."""


@dataclass(frozen=True)
class Cifar100Args(AugmentedImageArgs):
    """CIFAR-100's arguments: those of CIFAR-10 and which labels to learn."""

    labels: Literal["fine", "coarse"] = field(
        default="fine", metadata={"help": "fine: the 100 classes; coarse: the 20 superclasses"}
    )


# ---------------------------------------------------------------------------------------------
# Reading


class _DataUnpickler(pickle.Unpickler):
    """Builds plain data and NumPy arrays only (what the CIFAR batches hold)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"it asks to build {module}.{name}, which a data batch never holds")
        return super().find_class(module, name)


def read_batch(path: str | Path) -> dict[str, Any]:
    """The dict pickled in CIFAR batch ``path``, with str keys (the official files were written
    by Python 2, whose strings load as bytes). A file that is not such a pickle raises
    SparsetrainError naming it and the fix."""
    path = Path(path)
    payload = read_content(path)
    try:
        with warnings.catch_warnings():  # the official files name numpy.core, numpy._core since NumPy 2
            warnings.simplefilter("ignore", DeprecationWarning)
            obj = _DataUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError, zlib.error, MemoryError) as e:
        raise bad_file(path, f"not a readable CIFAR batch (a Python pickle): {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise bad_file(path, f"not a CIFAR batch: the pickle holds a {type(obj).__name__}, not a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def batch_arrays(
    batch: dict[str, Any], label_key: str, num_classes: int, path: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) of one batch read by :func:`read_batch`,
    checked: the keys present, 3072 values per image, as many labels as images, labels in range."""
    for key in ("data", label_key):
        if key not in batch:
            found = ", ".join(sorted(map(str, batch))) or "none"
            raise bad_file(path, f"not a CIFAR batch of this data set: no {key!r} entry (keys: {found})")
    data = np.asarray(batch["data"])
    per_image = int(np.prod(IMAGE_SHAPE))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != per_image:
        raise bad_file(path, f"'data' must be uint8 of shape (N, {per_image}), found {data.dtype} {data.shape}")
    labels = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
    if len(labels) != len(data):
        raise bad_file(path, f"{len(data)} images but {len(labels)} {label_key!r}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise bad_file(path, f"{label_key!r} must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}")
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(len(data), *IMAGE_SHAPE).copy())
    return images, torch.from_numpy(labels.copy())


def load_cifar(name: str, data_dir: str | Path | None, download: bool, label_key: str, num_classes: int) -> RawData:
    """Data set ``name`` (``"cifar10"`` or ``"cifar100"``) from ``<root>/<name>/``: the extracted
    folder, else its archive there (checked against :data:`MD5`), else downloaded."""
    inner, train_files, test_files = LAYOUT[name]
    contents = [f"{inner}/{f}" for f in train_files + test_files]
    archive = DataFile(ARCHIVES[name], sha256=None, md5=MD5.get(name))
    folder = ensure_extracted(name, archive, contents, data_dir, download)
    splits = []
    for files in (train_files, test_files):
        paths = [folder / inner / f for f in files]
        parts = [batch_arrays(read_batch(path), label_key, num_classes, path) for path in paths]
        splits.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    (train_x, train_y), (test_x, test_y) = splits
    return RawData(train_x, train_y, test_x, test_y, num_classes, keep_uint8=True)


@register_dataset("cifar10", args=Cifar10Args)
def cifar10(data_dir: str | Path | None = None, download: bool = True, args: Cifar10Args | None = None) -> RawData:
    """CIFAR-10 natural images: 50000 train / 10000 test uint8 (3, 32, 32), 10 classes."""
    return load_cifar("cifar10", data_dir, download, "labels", 10)


@register_dataset("cifar100", args=Cifar100Args)
def cifar100(data_dir: str | Path | None = None, download: bool = True, args: Cifar100Args | None = None) -> RawData:
    """CIFAR-100 natural images: 50000 train / 10000 test uint8 (3, 32, 32), 100 classes (20 coarse)."""
    coarse = args is not None and args.labels == "coarse"
    label_key, num_classes = ("coarse_labels", 20) if coarse else ("fine_labels", 100)
    return load_cifar("cifar100", data_dir, download, label_key, num_classes)
