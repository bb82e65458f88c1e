"""Data sets and in-memory loaders.

    >>> from sparsetrain.data import create_loaders
    >>> loaders = create_loaders("synthetic", batch_size=50)
    >>> x, y = next(iter(loaders.train))
    >>> tuple(x.shape), loaders.num_classes
    ((50, 1, 28, 28), 10)

Data sets are registered by name in ``DATASETS`` (``"mnist"``, ``"fashion-mnist"``,
``"synthetic"``); IDX files are looked for in ``<root>/<name>/`` with root ``data_dir``, else
``$SPARSETRAIN_DATA``, else ``~/.cache/sparsetrain``.
"""

from .base import DATASETS, RawData, list_datasets, load_dataset
from .idx import MIRRORS, SHA256, load_idx_dataset, read_idx, resolve_data_root
from .loaders import EvalLoader, Loaders, TrainStream, create_loaders, preprocess, split_train_val
from .synthetic import make_synthetic

__all__ = [
    "DATASETS",
    "EvalLoader",
    "Loaders",
    "MIRRORS",
    "RawData",
    "SHA256",
    "TrainStream",
    "create_loaders",
    "list_datasets",
    "load_dataset",
    "load_idx_dataset",
    "make_synthetic",
    "preprocess",
    "read_idx",
    "resolve_data_root",
    "split_train_val",
]
