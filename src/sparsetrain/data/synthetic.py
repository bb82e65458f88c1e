"""A small, deterministic, learnable stand-in data set for tests and demos (no files, no network).

Each class has a fixed random "prototype" image; an example is its class prototype plus Gaussian
noise. Any single pixel says little about the class, but the whole image says a lot, so a small
model learns it quickly (tests can check that training helps) without any download.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SparsetrainError
from .args import ImageArgs
from .base import RawData, register_dataset

# Noise relative to the prototypes' unit scale: large per pixel, but summed over many pixels the
# class signal dominates, so the task is learnable but not solved by looking at one pixel.
NOISE_STD = 2.0


def make_synthetic(
    n_train: int,
    n_test: int,
    shape: tuple[int, ...] = (1, 28, 28),
    num_classes: int = 10,
    seed: int = 0,
) -> RawData:
    """``n_train`` / ``n_test`` float32 examples of ``shape`` with balanced int64 labels.

    The same arguments always give the same tensors (own ``torch.Generator``; global RNG untouched).
    Train and test share the class prototypes, so test accuracy measures generalisation.
    """
    if n_train < 1 or n_test < 0 or num_classes < 2 or any(d < 1 for d in shape):
        raise SparsetrainError(
            f"make_synthetic needs n_train >= 1, n_test >= 0, num_classes >= 2 and positive shape; "
            f"got n_train={n_train}, n_test={n_test}, num_classes={num_classes}, shape={tuple(shape)}"
        )
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, *shape, generator=gen)
    train_x, train_y = _sample(prototypes, n_train, gen)
    test_x, test_y = _sample(prototypes, n_test, gen)
    return RawData(train_x, train_y, test_x, test_y, num_classes)


def _sample(prototypes: torch.Tensor, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    # Cycling through the classes before shuffling keeps them balanced even for tiny n.
    labels = (torch.arange(n) % len(prototypes))[torch.randperm(n, generator=gen)]
    noise = torch.randn(n, *prototypes.shape[1:], generator=gen) * NOISE_STD
    return prototypes[labels] + noise, labels.to(torch.int64)


@dataclass(frozen=True)
class SyntheticArgs(ImageArgs):
    """The arguments of the ``"synthetic"`` data set; the defaults give 600 / 200 examples of (1, 28, 28)."""

    n_train: int = field(
        default=600, metadata={"help": "number of training examples (before the validation split)"}
    )
    n_test: int = field(default=200, metadata={"help": "number of test examples"})
    shape: tuple[int, ...] = field(default=(1, 28, 28), metadata={"help": "shape of one example, (C, H, W)"})
    num_classes: int = field(default=10, metadata={"help": "number of classes (>= 2)"})
    seed: int = field(default=0, metadata={"help": "seed of the class prototypes and the noise"})


@register_dataset("synthetic", args=SyntheticArgs)
def synthetic(
    data_dir: str | Path | None = None, download: bool = True, args: SyntheticArgs | None = None
) -> RawData:
    """Class prototypes plus noise, made in memory (default: 600 train / 200 test (1, 28, 28), 10 classes).

    Needs no files: ``data_dir`` and ``download`` are ignored.
    """
    args = args if args is not None else SyntheticArgs()
    return make_synthetic(args.n_train, args.n_test, args.shape, args.num_classes, args.seed)
