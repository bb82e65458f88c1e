"""VGG-like networks for CIFAR-shaped inputs (3x32x32).

``vgg-cifar-small``: three stages of two 3x3 convolutions (16, 32, 64 channels; no bias, each
followed by batch-norm and ReLU) and a 2x2 max-pool, then fc 128 with ReLU and fc ``num_classes``.
It has the VGG shape the SNIP paper prunes on CIFAR-10 (stacked 3x3 convolutions with batch-norm,
a small fully connected head) at a width a 2-core CPU trains in minutes: 204,794 parameters for
3x32x32 inputs and 10 classes::

    convs: 9 * sum(c_in * c_out) = 9 * (3*16 + 16*16 + 16*32 + 32*32 + 32*64 + 64*64)
    batch-norm: 2 * sum(c_out);  head: 64 * (H/8) * (W/8) * 128 + 128 + 128 * classes + classes

Every convolution weight viewed as (out, in*3*3) has rows that are a multiple of 4 long except
the first (in = 3: rows of 27), so 2:4 sparsity fits all layers but the first.
"""

from __future__ import annotations

import torch.nn as nn

from ..errors import SparsetrainError
from .registry import MODELS

POOL = "M"
SMALL = (16, 16, POOL, 32, 32, POOL, 64, 64, POOL)


def vgg_features(channels: int, plan: tuple) -> tuple[nn.Sequential, int, int]:
    """Conv-BN-ReLU layers (3x3, padding 1) and max-pools as ``plan`` says;
    returns (layers, output channels, number of pools)."""
    layers: list[nn.Module] = []
    pools = 0
    for item in plan:
        if item == POOL:
            layers.append(nn.MaxPool2d(2))  # (B, C, H/2, W/2)
            pools += 1
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU()]
            channels = item
    return nn.Sequential(*layers), channels, pools


@MODELS.register("vgg-cifar-small")
def vgg_cifar_small(*, input_shape=(3, 32, 32), num_classes=10, hidden: int = 128) -> nn.Module:
    c, h, w = input_shape
    features, out_channels, pools = vgg_features(c, SMALL)
    if min(h, w) < 2**pools:
        raise SparsetrainError(
            f"vgg-cifar-small halves the image {pools} times, so it needs at least "
            f"{2**pools}x{2**pools} pixels; got {h}x{w}"
        )
    fh, fw = h >> pools, w >> pools  # 4x4 for 32x32 inputs
    return nn.Sequential(
        features,  # (B, 64, H/8, W/8)
        nn.Flatten(),  # (B, 64 * H/8 * W/8)
        nn.Linear(out_channels * fh * fw, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
