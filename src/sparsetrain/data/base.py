"""What every data set provides: the :class:`RawData` record, the ``DATASETS`` registry, and each
data set's arguments.

Kept apart from ``idx.py`` / ``synthetic.py`` / ``loaders.py`` so that all of them can import it
without import cycles. A data set is one function registered with :func:`register_dataset`,
which also names the frozen dataclass of the arguments it takes:

    >>> spec = dataset_spec("synthetic")
    >>> spec.args.__name__, dataset_args("synthetic", {"n_train": 60, "shape": [1, 8, 8]}).shape
    ('SyntheticArgs', (1, 8, 8))
    >>> dataset_args("mnist", {"views": "rows"})
    Traceback (most recent call last):
    ...
    sparsetrain.errors.SparsetrainError: unknown data arg 'views' of data set 'mnist'; valid data args: view, random_labels
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..registry import Registry
from .args import ImageArgs, build_args

#: Data sets by name. Each entry is a :class:`DatasetSpec`, callable as
#: ``spec(data_dir: str | Path | None, download: bool, args=None) -> RawData``.
DATASETS = Registry("dataset")


@dataclass
class RawData:
    """A data set as stored, before any preprocessing.

    ``train_x`` / ``test_x``: uint8 (pixels 0..255) or float tensors of shape (N, C, H, W).
    ``train_y`` / ``test_y``: int64 tensors of shape (N,) with values in ``[0, num_classes)``.
    ``keep_uint8``: the loaders keep uint8 images as they are and standardise each batch when it
    is drawn (large data sets: CIFAR, Tiny-ImageNet), instead of one float32 copy of everything.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    keep_uint8: bool = False

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one example."""
        return tuple(self.train_x.shape[1:])


#: ``load(data_dir, download, args) -> RawData``: a data set's loading function.
LoadFn = Callable[[Any, bool, Any], RawData]


@dataclass(frozen=True)
class DatasetSpec:
    """A registered data set: its ``name``, its ``load`` function, and ``args``, the frozen
    dataclass of the arguments it takes (fields with types, defaults and ``metadata["help"]``)."""

    name: str
    load: LoadFn
    args: type = ImageArgs

    @property
    def summary(self) -> str:
        """The first line of the loading function's docstring."""
        return (self.load.__doc__ or "").strip().split("\n")[0]

    def make_args(self, values: Any = None) -> Any:
        """The args dataclass from a dict of values (None: all defaults); see :func:`dataset_args`."""
        return build_args(self.args, values, self.name)

    def __call__(self, data_dir: str | Path | None = None, download: bool = True, args: Any = None) -> RawData:
        return self.load(data_dir, download, self.make_args(args))


def register_dataset(name: str, args: type = ImageArgs) -> Callable[[LoadFn], LoadFn]:
    """Register ``fn(data_dir, download, args) -> RawData`` as data set ``name`` taking ``args``
    (a frozen dataclass; its instance is what ``fn`` receives). Returns ``fn`` unchanged."""

    def decorator(fn: LoadFn) -> LoadFn:
        DATASETS.register(name)(DatasetSpec(name, fn, args))
        return fn

    return decorator


def dataset_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of data set ``name`` (``.args`` is its args dataclass); unknown
    names raise SparsetrainError with close matches."""
    return DATASETS.get(name)


def dataset_args(name: str, values: Any = None) -> Any:
    """The args dataclass instance of data set ``name`` built from ``values`` (a dict as read from
    TOML/JSON, None for the defaults, or an instance). Unknown keys raise SparsetrainError listing
    the valid ones; a value of the wrong type names the expected type."""
    return dataset_spec(name).make_args(values)


def list_datasets(pattern: str = "*") -> list[str]:
    """Registered data set names matching a shell-style ``pattern``, sorted."""
    return DATASETS.list(pattern)


def load_dataset(
    name: str, data_dir: str | Path | None = None, download: bool = True, args: Any = None
) -> RawData:
    """The raw data of data set ``name`` (``args``: its data args, a dict or None for the defaults);
    unknown names raise SparsetrainError with close matches."""
    return dataset_spec(name)(data_dir, download, args)
