"""Train-time transforms: random batch changes that stay seeded and resumable.

A transform is applied to each training batch on the batch's device. Its randomness comes from a
generator seeded by (shuffle seed, step) alone, so the batch of step ``s`` is the same whether the
run got there uninterrupted or resumed with ``TrainStream.iter_from(s)``. Evaluation loaders
never transform.

:class:`RandomCropFlip` is the natural-image recipe: pad by ``padding`` pixels, crop back to the
original size at a random offset (the papers' "random translation"), and flip left-right with
probability 1/2.

    >>> import torch
    >>> t = RandomCropFlip(padding=1, flip=True, fill=(0.0,))
    >>> x = torch.ones(2, 1, 3, 3)  # (B, C, H, W)
    >>> y = t(x, seed=0, step=5)
    >>> y.shape, torch.equal(y, t(x, seed=0, step=5))
    (torch.Size([2, 1, 3, 3]), True)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from .views import apply_view


class BatchTransform(Protocol):
    """``transform(x, seed, step) -> x``: a batch (B, ...) changed as a pure function of the batch,
    ``seed`` and ``step``."""

    def __call__(self, x: torch.Tensor, seed: int, step: int) -> torch.Tensor: ...


def step_generator(seed: int, step: int, salt: str = "augment") -> torch.Generator:
    """A CPU generator seeded by (``salt``, ``seed``, ``step``) alone: the same on every run.

    Hashed rather than added, so that neighbouring (seed, step) pairs do not share draws.
    """
    digest = hashlib.sha256(f"{salt}:{seed}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@dataclass(frozen=True)
class RandomCropFlip:
    """Random translation by up to ``padding`` pixels (pad with ``fill``, crop back at a random
    offset) and, with ``flip``, a left-right flip with probability 1/2; per example, on images
    (B, C, H, W).

    ``fill``: per channel, the value the padding takes; :func:`sparsetrain.data.create_loaders`
    passes the standardised value of a black pixel (what padding the 0..255 image with zeros, as
    torchvision's ``RandomCrop(padding=4)`` does, gives after standardisation).
    """

    padding: int = 0
    flip: bool = False
    fill: tuple[float, ...] = (0.0,)

    @property
    def active(self) -> bool:
        return self.padding > 0 or self.flip

    def __call__(self, x: torch.Tensor, seed: int, step: int) -> torch.Tensor:
        if not self.active:
            return x
        b, c, h, w = x.shape
        p = self.padding
        gen = step_generator(seed, step)
        # Drawn on the CPU (the same numbers on every device), then moved.
        offsets = torch.randint(0, 2 * p + 1, (b, 2), generator=gen)  # (B, 2): top, left in the padded image
        flips = torch.rand(b, generator=gen) < 0.5 if self.flip else torch.zeros(b, dtype=torch.bool)
        offsets, flips = offsets.to(x.device), flips.to(x.device)
        fill = torch.tensor(self.fill, dtype=x.dtype, device=x.device).expand(c).view(1, c, 1, 1)
        padded = fill.expand(b, c, h + 2 * p, w + 2 * p).clone()  # (B, C, H+2p, W+2p)
        padded[:, :, p : p + h, p : p + w] = x
        ar_h, ar_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        rows = offsets[:, :1] + ar_h  # (B, H)
        cols = offsets[:, 1:] + torch.where(flips[:, None], w - 1 - ar_w, ar_w)  # (B, W)
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        channel = torch.arange(c, device=x.device)[None, :, None, None]
        return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)


@dataclass(frozen=True)
class ThenView:
    """``transform`` on images, then ``view`` (see :mod:`sparsetrain.data.views`)."""

    transform: Callable[..., Any]
    view: str

    def __call__(self, x: torch.Tensor, seed: int, step: int) -> torch.Tensor:
        return apply_view(self.view, self.transform(x, seed, step))


def train_transform(args: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> RandomCropFlip | None:
    """The train-time transform data args ask for (``random_crop``, ``flip``), None when none is.

    ``mean`` / ``std``: the per-channel statistics the data were standardised with (they give the
    padding's black pixel).
    """
    padding, flip = int(getattr(args, "random_crop", 0)), bool(getattr(args, "flip", False))
    if padding == 0 and not flip:
        return None
    fill = tuple(-m / s for m, s in zip(mean, std))  # a black pixel (0), standardised
    return RandomCropFlip(padding, flip, fill)
