"""The simple CNN of the data-parallelism paper (Lee, Ajanthan, Torr, Jaggi 2021) for MNIST and
Fashion-MNIST.

Definition from effect-dps-public (``edps/network.py``, ``SimpleCNN``): conv 32@5x5 (no padding)
with ReLU, max-pool 2, conv 64@5x5 with ReLU, max-pool 2, and one fully connected classifier on
the 64x4x4 feature map, 62,346 parameters for 1x28x28 inputs and 10 classes::

    conv1: 5*5*C*32 + 32;  conv2: 5*5*32*64 + 64;  fc: 64 * h * w * classes + classes,
    h = ((H - 4) // 2 - 4) // 2 (4 for 28)

The two unpadded convolutions and poolings need images of at least 16x16 pixels.
"""

from __future__ import annotations

import torch.nn as nn

from ..errors import SparsetrainError
from .registry import MODELS


@MODELS.register("simple-cnn")
def simple_cnn(*, input_shape=(1, 28, 28), num_classes=10) -> nn.Module:
    c, h, w = input_shape
    if min(h, w) < 16:
        raise SparsetrainError(
            f"simple-cnn's two unpadded 5x5 convolutions and 2x2 poolings need images of at least 16x16 "
            f"pixels, got {h}x{w}"
        )
    fh, fw = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2  # 4x4 for 28x28 inputs
    return nn.Sequential(
        nn.Conv2d(c, 32, 5), nn.ReLU(),  # (B, 32, H-4, W-4)
        nn.MaxPool2d(2),  # (B, 32, (H-4)/2, (W-4)/2)
        nn.Conv2d(32, 64, 5), nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 64, 4, 4) for 28x28
        nn.Flatten(),
        nn.Linear(64 * fh * fw, num_classes),
    )
