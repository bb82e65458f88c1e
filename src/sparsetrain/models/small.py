"""Small models of every architecture family SNIP must handle: MLP, conv with batch-norm,
residual, LSTM, GRU and attention. They make tests fast and show that pruning works on any
``nn.Module``. The recurrent and attention models take sequences (T, F): the data layer's
``view="rows"`` turns an image (C, H, W) into H steps of C*W features (MNIST: 28 x 28).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import SparsetrainError
from .registry import MODELS


@MODELS.register("mlp-tiny")
def mlp_tiny(*, input_shape=(1, 28, 28), num_classes=10, hidden: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )


@MODELS.register("conv-tiny")
def conv_tiny(*, input_shape=(1, 28, 28), num_classes=10) -> nn.Module:
    c = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(c, 8, 3, padding=1),  # (B, 8, H, W)
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 8, H/2, W/2)
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),  # (B, 16, 1, 1)
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


class _Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):  # (B, C, H, W) -> (B, C, H, W)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


class ResNetTiny(nn.Module):
    def __init__(self, input_shape, num_classes, width=8):
        super().__init__()
        self.stem = nn.Conv2d(input_shape[0], width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(_Block(width), _Block(width))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):  # (B, C, H, W)
        x = torch.relu(self.bn(self.stem(x)))
        x = self.blocks(x).mean(dim=(2, 3))  # (B, width)
        return self.head(x)


@MODELS.register("resnet-tiny")
def resnet_tiny(*, input_shape=(1, 28, 28), num_classes=10, width: int = 8) -> nn.Module:
    return ResNetTiny(input_shape, num_classes, width)


def sequence_features(name: str, input_shape) -> int:
    """F of a sequence input shape (T, F); an image shape is refused with the fix."""
    if len(input_shape) != 2:
        raise SparsetrainError(
            f"{name} takes sequences of shape (steps, features), got examples of shape {tuple(input_shape)}; "
            "read an image data set as a sequence with data_args view = 'rows' (or 'pixels')"
        )
    return input_shape[1]


class RecurrentTiny(nn.Module):
    def __init__(self, cell: type[nn.Module], input_shape, num_classes, hidden=32):
        super().__init__()
        self.rnn = cell(sequence_features(f"{cell.__name__.lower()}-tiny", input_shape), hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):  # (B, T, F)
        out, _ = self.rnn(x)  # (B, T, hidden)
        return self.head(out[:, -1])


@MODELS.register("lstm-tiny")
def lstm_tiny(*, input_shape=(28, 28), num_classes=10, hidden: int = 32) -> nn.Module:
    return RecurrentTiny(nn.LSTM, input_shape, num_classes, hidden)


@MODELS.register("gru-tiny")
def gru_tiny(*, input_shape=(28, 28), num_classes=10, hidden: int = 32) -> nn.Module:
    return RecurrentTiny(nn.GRU, input_shape, num_classes, hidden)


class AttentionTiny(nn.Module):
    def __init__(self, input_shape, num_classes, dim=32, heads=4):
        super().__init__()
        steps, features = input_shape[0], sequence_features("attention-tiny", input_shape)
        self.embed = nn.Linear(features, dim)
        self.pos = nn.Parameter(torch.zeros(steps, dim))
        self.encoder = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):  # (B, T, F)
        seq = self.embed(x) + self.pos  # (B, T, dim)
        return self.head(self.encoder(seq).mean(dim=1))


@MODELS.register("attention-tiny")
def attention_tiny(*, input_shape=(28, 28), num_classes=10, dim: int = 32, heads: int = 4) -> nn.Module:
    return AttentionTiny(input_shape, num_classes, dim, heads)
