"""What every data set provides: the :class:`RawData` record and the ``DATASETS`` registry.

Kept apart from ``idx.py`` / ``synthetic.py`` / ``loaders.py`` so that all of them can import it
without import cycles.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..registry import Registry

#: Data sets by name. Each entry is ``fn(data_dir: str | Path | None, download: bool) -> RawData``.
DATASETS = Registry("dataset")


@dataclass
class RawData:
    """A data set as stored, before any preprocessing.

    ``train_x`` / ``test_x``: uint8 (pixels 0..255) or float tensors of shape (N, C, H, W).
    ``train_y`` / ``test_y``: int64 tensors of shape (N,) with values in ``[0, num_classes)``.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one example."""
        return tuple(self.train_x.shape[1:])


def list_datasets(pattern: str = "*") -> list[str]:
    """Registered data set names matching a shell-style ``pattern``, sorted."""
    return DATASETS.list(pattern)


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = True) -> RawData:
    """The raw data of data set ``name``; unknown names raise SparsetrainError with close matches."""
    return DATASETS.create(name, data_dir, download)
