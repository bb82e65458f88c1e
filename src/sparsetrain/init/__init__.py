"""Initialization schemes by name.

``default`` is PyTorch's own ``reset_parameters``. ``variance-scaling`` is TensorFlow 1's default
``variance_scaling_initializer`` as used by snip-public: truncated normal at two standard deviations,
fan-in mode, scale 1, std = sqrt(1 / fan_in) / 0.8796 (the correction for truncation), for weights
*and* biases (a bias of n entries has fan-in n, as in TF). ``variance-scaling-zero-bias`` draws
the weights the same way and sets biases to zero: snip-public's set of weights that is trained.

    >>> import torch
    >>> from sparsetrain.init import initialize_
    >>> layer = torch.nn.Linear(100, 10)
    >>> _ = initialize_(layer, "variance-scaling-zero-bias", seed=0)
    >>> float(layer.bias.detach().abs().sum())
    0.0
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..registry import Registry

INITS = Registry("init scheme")
_TRUNC_CORRECTION = 0.87962566103423978  # std of a unit normal truncated to [-2, 2]


def initialize_(model: nn.Module, scheme: str, seed: int) -> nn.Module:
    """Re-draw every parameter of ``model`` in place with ``scheme``, reproducibly from ``seed``."""
    init = INITS.get(scheme)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init(model)
    return model


def list_inits(pattern: str = "*") -> list[str]:
    return INITS.list(pattern)


@INITS.register("default")
def _default(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()


def _fan_in(shape: torch.Size) -> int:
    if len(shape) == 1:
        return shape[0]
    return math.prod(shape[1:])  # Linear (out, in); Conv (out, in, k...): in * prod(k)


def _variance_scaling_(tensor: torch.Tensor) -> None:
    std = math.sqrt(1.0 / _fan_in(tensor.shape)) / _TRUNC_CORRECTION
    nn.init.trunc_normal_(tensor, 0.0, std, -2 * std, 2 * std)


def _variance_scaling(model: nn.Module, zero_bias: bool) -> None:
    _default(model)  # normalisation layers and anything unusual keep PyTorch's defaults
    with torch.no_grad():
        for name, param in model.named_parameters():
            owner_name, _, leaf = name.rpartition(".")
            if isinstance(model.get_submodule(owner_name), _NORMS):
                continue
            if "bias" in leaf:  # bias, bias_ih_l0, in_proj_bias, ...
                param.zero_() if zero_bias else _variance_scaling_(param)
            elif param.dim() >= 2:
                _variance_scaling_(param)


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@INITS.register("variance-scaling")
def _variance_scaling_all(model: nn.Module) -> None:
    _variance_scaling(model, zero_bias=False)


@INITS.register("variance-scaling-zero-bias")
def _variance_scaling_weights(model: nn.Module) -> None:
    _variance_scaling(model, zero_bias=True)


__all__ = ["INITS", "initialize_", "list_inits"]
