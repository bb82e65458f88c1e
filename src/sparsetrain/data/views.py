"""Views: how image examples (C, H, W) are presented to a model.

- ``"image"``: (C, H, W), unchanged.
- ``"rows"``: a sequence of H steps, step ``t`` the image's row ``t`` with all its channels,
  C*W features (channel-major): (H, C*W). MNIST gives (28, 28), as SNIP's recurrent networks read it.
- ``"pixels"``: a sequence of H*W steps in raster order, each pixel's C channels: (H*W, C).
  MNIST gives (784, 1), sequential MNIST.

The data layer owns the view, so a recurrent model takes (T, F) sequences and never reshapes
images itself; ``Loaders.input_shape`` reports the viewed shape.

    >>> import torch
    >>> x = torch.arange(12.0).reshape(1, 1, 3, 4)  # (N, C, H, W)
    >>> view_shape("rows", (1, 3, 4)), apply_view("rows", x).shape
    ((3, 4), torch.Size([1, 3, 4]))
    >>> apply_view("pixels", x)[0, :5, 0].tolist()
    [0.0, 1.0, 2.0, 3.0, 4.0]
"""

from __future__ import annotations

import typing

import torch

from ..errors import SparsetrainError
from .args import View

#: The view names, "image" first (the default).
VIEWS: tuple[str, ...] = typing.get_args(View)


def view_shape(view: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one example of ``shape`` (C, H, W) under ``view``."""
    _check(view, shape)
    if view == "image":
        return tuple(shape)
    c, h, w = shape
    return (h, c * w) if view == "rows" else (h * w, c)


def apply_view(view: str, x: torch.Tensor) -> torch.Tensor:
    """Examples ``x`` (N, C, H, W) under ``view``: unchanged, (N, H, C*W) or (N, H*W, C).

    One-channel views are free (a reshape); with several channels the result is a copy.
    """
    _check(view, tuple(x.shape[1:]))
    if view == "image":
        return x
    n, c, h, w = x.shape
    if view == "rows":
        return x.transpose(1, 2).reshape(n, h, c * w)  # (N, H, C, W) -> (N, H, C*W)
    return x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # (N, H, W, C) -> (N, H*W, C)


def _check(view: str, shape: tuple[int, ...]) -> None:
    if view not in VIEWS:
        raise SparsetrainError(f"unknown view {view!r}; views: {', '.join(VIEWS)}")
    if view != "image" and len(shape) != 3:
        raise SparsetrainError(
            f"view {view!r} needs image examples of shape (C, H, W), got {tuple(shape)}; use view='image'"
        )
