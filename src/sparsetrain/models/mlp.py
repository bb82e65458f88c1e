"""The multilayer perceptrons of the signal-propagation paper (Lee et al. 2020): MLP-3, -5, -7.

As in spp-public (``spp/network.py``), the depth counts the weight layers: an MLP of depth d has
d fully connected layers, 784 -> 100, d - 2 of 100 -> 100 and 100 -> 10, each with a bias, and
the activation after every layer but the last (so d - 1 hidden layers). The activation is a
model argument, ``linear`` (spp-public's default network is MLP-7-linear), ``tanh`` or ``relu``.

    >>> from sparsetrain.models import create_model
    >>> sum(p.numel() for p in create_model("mlp-3").parameters())  # 78,500 + 10,100 + 1,010
    89610
"""

from __future__ import annotations

import math
from typing import Literal

import torch.nn as nn

from ..errors import SparsetrainError
from .registry import MODELS

Activation = Literal["linear", "tanh", "relu"]
_ACTIVATIONS = {"linear": nn.Identity, "tanh": nn.Tanh, "relu": nn.ReLU}


def mlp(depth: int, input_shape, num_classes: int, width: int, activation: str) -> nn.Sequential:
    """``depth`` fully connected layers of ``width`` units with ``activation`` between them."""
    if depth < 2 or width < 1:
        raise SparsetrainError(f"an MLP needs depth >= 2 and width >= 1, got depth={depth}, width={width}")
    sizes = [math.prod(input_shape)] + [width] * (depth - 1) + [num_classes]
    layers: list[nn.Module] = [nn.Flatten()]  # (B, C*H*W)
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < depth - 1:
            layers.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


@MODELS.register("mlp-3")
def mlp_3(*, input_shape=(1, 28, 28), num_classes=10, width: int = 100, activation: Activation = "linear") -> nn.Module:
    """spp-public's MLP-3: 3 weight layers, 89,610 parameters on MNIST."""
    return mlp(3, input_shape, num_classes, width, activation)


@MODELS.register("mlp-5")
def mlp_5(*, input_shape=(1, 28, 28), num_classes=10, width: int = 100, activation: Activation = "linear") -> nn.Module:
    """spp-public's MLP-5: 5 weight layers, 109,810 parameters on MNIST."""
    return mlp(5, input_shape, num_classes, width, activation)


@MODELS.register("mlp-7")
def mlp_7(*, input_shape=(1, 28, 28), num_classes=10, width: int = 100, activation: Activation = "linear") -> nn.Module:
    """spp-public's MLP-7: 7 weight layers, 130,010 parameters on MNIST."""
    return mlp(7, input_shape, num_classes, width, activation)
