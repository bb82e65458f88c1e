"""The model registry: factories registered by name, built with their own arguments.

A factory is a function with keyword-only arguments: ``input_shape`` (one example's shape) and
``num_classes``, whose defaults are the model's paper configuration, and the model's own
arguments (depth, width, ...), typed and with defaults. ``create_model(name)`` with no other
argument builds the paper configuration; ``model_args`` are checked against the factory's
signature, so a wrong key or type is a clear error, not a TypeError deep inside.

    >>> sorted(model_args_of("mlp-tiny"))
    ['hidden']
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

import torch.nn as nn

from ..errors import SparsetrainError
from ..options import check_value, type_name
from ..registry import Registry

MODELS = Registry("model")
_SHAPE_ARGS = ("input_shape", "num_classes")


def create_model(name: str, *, input_shape: tuple[int, ...] | None = None, num_classes: int | None = None,
                 **model_args: Any) -> nn.Module:
    """Build the model registered as ``name`` (see :func:`list_models`). ``input_shape`` and
    ``num_classes`` default to the model's own (its paper configuration); ``model_args`` are the
    factory's other arguments. The model carries its name as ``model.registered_name``: the
    registered models are tested to give the same results in the channels-last layout, so
    training may run them in it (:func:`sparsetrain.train.loop.conv_layout`); a model of one's
    own, which may ``.view`` its activations, is trained as it is."""
    factory = MODELS.get(name)
    kwargs = check_model_args(name, model_args)
    if input_shape is not None:
        kwargs["input_shape"] = tuple(input_shape)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = factory(**kwargs)
    model.registered_name = name
    return model


def list_models(pattern: str = "*") -> list[str]:
    return MODELS.list(pattern)


def model_args_of(name: str) -> dict[str, inspect.Parameter]:
    """The model's own arguments (beyond input_shape and num_classes), by name."""
    params = inspect.signature(MODELS.get(name)).parameters
    return {n: p for n, p in params.items() if n not in _SHAPE_ARGS and p.kind is not p.VAR_KEYWORD}


def default_input_shape(name: str) -> tuple[int, ...]:
    """One example's shape the model is built for when none is given."""
    return tuple(inspect.signature(MODELS.get(name)).parameters["input_shape"].default)


def check_model_args(name: str, values: dict[str, Any] | None) -> dict[str, Any]:
    """``values`` checked against the factory of ``name``: unknown keys are named with the valid
    ones, values converted to the annotated types."""
    values = dict(values or {})
    known = model_args_of(name)
    unknown = [k for k in values if k not in known]
    if unknown:
        raise SparsetrainError(
            f"unknown model_args {', '.join(map(repr, unknown))} for model {name!r}; "
            f"valid: {', '.join(known) or 'none (this model takes no arguments)'}"
        )
    hints = typing.get_type_hints(MODELS.get(name))
    return {k: check_value(v, hints.get(k, Any), f"model_args {k!r} of model {name!r}") for k, v in values.items()}


def describe_model_args(name: str) -> str:
    """``hidden (an int) = 32, ...`` for listings."""
    hints = typing.get_type_hints(MODELS.get(name))
    return ", ".join(f"{n} ({type_name(hints.get(n, Any))}) = {p.default!r}" for n, p in model_args_of(name).items())
