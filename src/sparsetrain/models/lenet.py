"""The LeNets of the SNIP paper's Table 1.

LeNet-300-100 (LeCun et al. 1998): 784-300-100-10 with ReLU, 266,610 parameters.
LeNet-5-Caffe (the Caffe variant): conv 20@5x5, max-pool 2, conv 50@5x5, max-pool 2, fc 500, fc 10,
431,080 parameters. As in snip-public, there is no nonlinearity after the two convolutions; the
only ReLU follows fc 500.
"""

from __future__ import annotations

import math

import torch.nn as nn

from ..errors import SparsetrainError
from .registry import MODELS


@MODELS.register("lenet-300-100")
def lenet_300_100(*, input_shape=(1, 28, 28), num_classes=10) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),  # (B, C*H*W)
        nn.Linear(math.prod(input_shape), 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


@MODELS.register("lenet-5-caffe")
def lenet_5_caffe(*, input_shape=(1, 28, 28), num_classes=10) -> nn.Module:
    c, h, w = input_shape
    fh, fw = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2  # 4x4 for 28x28 inputs
    if min(h, w) < 16:
        raise SparsetrainError(f"lenet-5-caffe needs images of at least 16x16 pixels, got {h}x{w}")
    return nn.Sequential(
        nn.Conv2d(c, 20, 5),  # (B, 20, 24, 24)
        nn.MaxPool2d(2),  # (B, 20, 12, 12)
        nn.Conv2d(20, 50, 5),  # (B, 50, 8, 8)
        nn.MaxPool2d(2),  # (B, 50, 4, 4)
        nn.Flatten(),  # (B, 800)
        nn.Linear(50 * fh * fw, 500),
        nn.ReLU(),
        nn.Linear(500, num_classes),
    )
