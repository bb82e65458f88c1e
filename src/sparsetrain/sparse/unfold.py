"""A ``nn.Conv2d`` run as a weight matrix (out, C*kh*kw) times its unfolded input.

Both sparse convolutions (:class:`~sparsetrain.sparse.convert.SparseConv2d`, CSR, and
:class:`~sparsetrain.sparse.block.SparseBlockConv2d`, BSR) hold the same geometry and unfold
their input the same way; this mixin is that shared part. Only zero padding given as numbers is
supported (what ``F.unfold`` does)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SparsetrainError


def convertible_conv(conv: nn.Module) -> bool:
    """Whether ``conv`` is a Conv2d that :func:`F.unfold` can reproduce (zero padding, numbers)."""
    return isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


class UnfoldedConv:
    """Geometry of a convolution computed over ``F.unfold(x)``: set by :meth:`_init_geometry`."""

    in_channels: int
    out_channels: int

    def _init_geometry(self, matrix_shape: tuple[int, int], in_channels: int, kernel_size, stride, padding,
                       dilation, groups: int) -> None:
        self.out_channels = matrix_shape[0]
        self.in_channels = in_channels
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation, self.groups = tuple(padding), tuple(dilation), groups
        if matrix_shape[1] != in_channels * math.prod(self.kernel_size):
            raise SparsetrainError(
                f"a {tuple(matrix_shape)} matrix does not fit {in_channels} channels x {tuple(kernel_size)} kernels"
            )

    def _unfold(self, x: torch.Tensor) -> tuple[torch.Tensor, bool, tuple[int, int, int]]:
        """``(cols (B, C*kh*kw, L), unbatched, (B, Ho, Wo))`` for an input (B, C, H, W) or (C, H, W)."""
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise SparsetrainError(
                f"{type(self).__name__} expects (B, {self.in_channels}, H, W) input, got {tuple(x.shape)}"
            )
        B, _, H, W = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        return cols, unbatched, (B, Ho, Wo)

    def geometry(self) -> dict:
        return {
            "in_channels": self.in_channels, "kernel_size": list(self.kernel_size), "stride": list(self.stride),
            "padding": list(self.padding), "dilation": list(self.dilation), "groups": self.groups,
        }

    def _geometry_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}")
