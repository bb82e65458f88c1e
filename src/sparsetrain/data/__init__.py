"""Data sets and in-memory loaders.

    >>> from sparsetrain.data import create_loaders
    >>> loaders = create_loaders("synthetic", batch_size=50)
    >>> x, y = next(iter(loaders.train))
    >>> tuple(x.shape), loaders.num_classes
    ((50, 1, 28, 28), 10)

Data sets are registered by name in ``DATASETS`` (``"mnist"``, ``"fashion-mnist"``,
``"cifar10"``, ``"cifar100"``, ``"tiny-imagenet"``, ``"synthetic"``), each with the frozen
dataclass of the arguments it takes (``dataset_spec(name).args``; build one with
``dataset_args(name, {...})``). Files are looked for in ``<root>/<name>/`` with root
``data_dir``, else ``$SPARSETRAIN_DATA``, else ``~/.cache/sparsetrain``. One module per concern:
``files`` (fetch, checksum, cache, archives), ``args``, ``views``, ``transforms``, ``loaders``; one
per format family (``idx``, ``cifar``, ``tiny_imagenet``, ``synthetic``).
See docs/data.md.
"""

from .args import AugmentedImageArgs, ImageArgs, non_default_args
from .base import (
    DATASETS,
    DatasetSpec,
    RawData,
    dataset_args,
    dataset_spec,
    list_datasets,
    load_dataset,
    register_dataset,
)
from .files import DataFile, ensure_extracted, locate_files
from . import cifar, tiny_imagenet  # noqa: F401  (they register "cifar10", "cifar100", "tiny-imagenet")
from .idx import MIRRORS, SHA256, load_idx_dataset, read_idx, resolve_data_root
from .loaders import EvalLoader, Loaders, TrainStream, create_loaders, preprocess, split_train_val
from .synthetic import SyntheticArgs, make_synthetic
from .transforms import RandomCropFlip
from .views import VIEWS, apply_view, view_shape

__all__ = [
    "DATASETS",
    "VIEWS",
    "AugmentedImageArgs",
    "DataFile",
    "DatasetSpec",
    "EvalLoader",
    "ImageArgs",
    "Loaders",
    "MIRRORS",
    "RandomCropFlip",
    "RawData",
    "SHA256",
    "SyntheticArgs",
    "TrainStream",
    "apply_view",
    "create_loaders",
    "dataset_args",
    "dataset_spec",
    "ensure_extracted",
    "list_datasets",
    "load_dataset",
    "load_idx_dataset",
    "locate_files",
    "make_synthetic",
    "non_default_args",
    "preprocess",
    "read_idx",
    "register_dataset",
    "resolve_data_root",
    "split_train_val",
    "view_shape",
]
