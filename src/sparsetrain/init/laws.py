"""The laws one tensor is drawn from: fans, fixed-scale normals, variance scaling, orthogonal and
delta-orthogonal. Each function fills ``tensor`` in place from the global torch RNG (the caller
seeds it) and knows nothing of models; :mod:`.schemes` decides which tensor gets which law.

Fans follow PyTorch's convention (``torch.nn.init._calculate_fan_in_and_fan_out``): a weight
``(out, in, *kernel)`` has fan-in ``in * prod(kernel)`` and fan-out ``out * prod(kernel)``, so a
Linear ``(out, in)`` has fan-in ``in``, a recurrent ``weight_ih (4h, in)`` fan-in ``in`` and
``weight_hh (4h, h)`` fan-in ``h``. A vector of ``n`` entries (a bias) has fan-in = fan-out =
``n``, as TensorFlow computes it when one initializer is given to a bias.

    >>> import torch
    >>> fans(torch.empty(64, 3, 5, 5))
    (75, 1600)
    >>> fans(torch.empty(10))
    (10, 10)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import SparsetrainError

#: Std of a unit normal truncated to [-2, 2]: TensorFlow's variance scaling divides by it so that
#: the truncated draw keeps the variance scale / n.
TRUNC_CORRECTION = 0.87962566103423978

MODES = ("fan_in", "fan_out", "fan_avg")
DISTRIBUTIONS = ("truncated_normal", "normal", "uniform")


def fans(tensor: torch.Tensor) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of ``tensor`` (see the module docstring for the convention)."""
    shape = tensor.shape
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    receptive = math.prod(shape[2:])  # 1 for a matrix
    return shape[1] * receptive, shape[0] * receptive


def normal_(tensor: torch.Tensor, std: float) -> None:
    """N(0, std^2)."""
    nn.init.normal_(tensor, 0.0, std)


def truncated_normal_(tensor: torch.Tensor, std: float) -> None:
    """N(0, std^2) re-drawn outside [-2 std, 2 std], as TensorFlow's ``truncated_normal``: the
    result's std is ``TRUNC_CORRECTION * std`` (about 0.88 std), not ``std``."""
    nn.init.trunc_normal_(tensor, 0.0, std, -2 * std, 2 * std)


def uniform_(tensor: torch.Tensor, limit: float) -> None:
    """U(-limit, limit) (std ``limit / sqrt(3)``)."""
    nn.init.uniform_(tensor, -limit, limit)


def variance_scaling_(tensor: torch.Tensor, scale: float = 1.0, mode: str = "fan_in",
                      distribution: str = "truncated_normal") -> None:
    """TensorFlow's ``VarianceScaling``: variance ``scale / n`` with ``n`` the fan of ``mode``
    (``fan_avg`` is the mean of fan-in and fan-out). ``truncated_normal``: std ``sqrt(scale / n) /
    TRUNC_CORRECTION`` cut at two of those stds, so the draw's std is ``sqrt(scale / n)``;
    ``normal``: std ``sqrt(scale / n)``; ``uniform``: limit ``sqrt(3 * scale / n)``."""
    fan_in, fan_out = fans(tensor)
    n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
    if distribution == "truncated_normal":
        truncated_normal_(tensor, math.sqrt(scale / n) / TRUNC_CORRECTION)
    elif distribution == "normal":
        normal_(tensor, math.sqrt(scale / n))
    elif distribution == "uniform":
        uniform_(tensor, math.sqrt(3.0 * scale / n))
    else:
        raise SparsetrainError(f"unknown distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}")


def orthogonal_(tensor: torch.Tensor, gain: float = 1.0) -> None:
    """``gain`` times a uniformly random (Haar) orthogonal matrix, ``torch.nn.init.orthogonal_``:
    the tensor is read as the matrix ``(size(0), numel / size(0))`` (a conv kernel as ``(out,
    in * k * k)``), whose rows are orthonormal when it is wide and columns when it is tall."""
    nn.init.orthogonal_(tensor, gain)


def delta_orthogonal_(tensor: torch.Tensor, gain: float = 1.0) -> None:
    """Xiao et al. (2018)'s delta-orthogonal kernel for a convolution ``(out, in, *kernel)``: an
    orthogonal ``(out, in)`` matrix times ``gain`` at the kernel's centre tap (index ``(k - 1) //
    2`` on each axis, as TensorFlow's ``ConvolutionDeltaOrthogonal``), zeros at every other tap.
    With ``out >= in`` its columns are orthonormal, so the convolution (stride 1, padding that
    keeps the size) maps every input to one of the same norm. With ``out < in`` no linear map
    can do that: the centre tap gets orthonormal rows (what :func:`orthogonal_` gives a wide
    matrix), where TensorFlow refuses the layer."""
    if tensor.dim() < 3:
        raise SparsetrainError(f"delta-orthogonal needs a convolution kernel (out, in, *kernel); got shape "
                               f"{tuple(tensor.shape)}")
    centre = torch.empty(tensor.shape[:2], dtype=tensor.dtype, device=tensor.device)  # (out, in)
    nn.init.orthogonal_(centre, gain)
    with torch.no_grad():
        tensor.zero_()
        tensor[(slice(None), slice(None), *((k - 1) // 2 for k in tensor.shape[2:]))] = centre
