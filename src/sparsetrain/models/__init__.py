"""Models by name. They know nothing of pruning.

    >>> from sparsetrain.models import create_model, list_models
    >>> model = create_model("lenet-300-100")
    >>> sum(p.numel() for p in model.parameters())
    266610

Every factory takes ``input_shape`` (C, H, W) and ``num_classes`` keyword arguments, so the
run code can build any registered model for any registered data set.
"""

from __future__ import annotations

import torch.nn as nn

from ..registry import Registry

MODELS = Registry("model")


def create_model(name: str, *, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    """Build the model registered as ``name`` (see :func:`list_models`)."""
    return MODELS.create(name, input_shape=tuple(input_shape), num_classes=num_classes)


def list_models(pattern: str = "*") -> list[str]:
    return MODELS.list(pattern)


# Importing the families fills the registry.
from . import lenet, small, vgg  # noqa: E402,F401

__all__ = ["MODELS", "create_model", "list_models"]
