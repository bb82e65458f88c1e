"""Data set arguments: one frozen dataclass per data set, built and checked from plain values.

Each registered data set declares the arguments it takes as a frozen dataclass whose fields have
types, defaults and a ``help`` string (``field(metadata={"help": ...})``); configs and the command
line hold plain values (TOML/JSON: a list where the dataclass has a tuple), and
:func:`build_args` turns them into the dataclass, refusing unknown keys and wrong types.

    >>> build_args(ImageArgs, {"view": "rows"}, "mnist")
    ImageArgs(view='rows')
    >>> build_args(ImageArgs, {"flip": True}, "mnist")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    sparsetrain.errors.SparsetrainError: data set 'mnist' has no train-time transform 'flip' ...

Shared bases, so that data sets of one kind take the same arguments:

- :class:`ImageArgs`: ``view``, how examples are presented (``"image"``, ``"rows"``, ``"pixels"``;
  see :mod:`sparsetrain.data.views`).
- :class:`AugmentedImageArgs`: adds the train-time transforms ``random_crop`` and ``flip`` (see
  :mod:`sparsetrain.data.transforms`), for natural-image data sets.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from ..errors import SparsetrainError

#: How examples are presented to the model; see :mod:`sparsetrain.data.views`.
View = Literal["image", "rows", "pixels"]


@dataclass(frozen=True)
class ImageArgs:
    """Arguments every image data set takes."""

    view: View = field(
        default="image",
        metadata={"help": "how examples are presented: image (C, H, W); rows (H steps of C*W features); "
                          "pixels (H*W steps of C features)"},
    )


@dataclass(frozen=True)
class AugmentedImageArgs(ImageArgs):
    """Image arguments plus the train-time transforms (natural images: CIFAR, Tiny-ImageNet)."""

    random_crop: int = field(
        default=0,
        metadata={"help": "random translation: pad each training image by this many black pixels per side, "
                          "then crop it back at a random offset (0: off; CIFAR recipes use 4)"},
    )
    flip: bool = field(
        default=False, metadata={"help": "flip each training image left-right with probability 1/2"}
    )

    def __post_init__(self):
        if self.random_crop < 0:
            raise SparsetrainError(f"data arg 'random_crop' must be >= 0 (0: off), got {self.random_crop}")


#: Argument names that ask for a train-time transform (on data sets whose args do not have them,
#: asking for them is an error that says so).
TRANSFORM_ARGS = tuple(f.name for f in dataclasses.fields(AugmentedImageArgs) if f.name not in
                       {g.name for g in dataclasses.fields(ImageArgs)})


def build_args(cls: type, values: Any, owner: str) -> Any:
    """An instance of args dataclass ``cls`` from ``values`` (a mapping, None for the defaults, or
    an instance of ``cls``); ``owner`` names the data set in error messages.

    Lists become tuples where the field is a tuple; ints are accepted for floats. Unknown keys and
    values of the wrong type raise SparsetrainError naming the key, the expected type and the
    valid keys.
    """
    if values is None:
        values = {}
    if isinstance(values, cls):
        return values
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        values = {f.name: getattr(values, f.name) for f in dataclasses.fields(values)}
    if not isinstance(values, typing.Mapping):
        raise SparsetrainError(
            f"data args for {owner!r} must be a table (dict) of name -> value, got {type(values).__name__}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    valid = ", ".join(fields) or "(none)"
    converted = {}
    for key, value in values.items():
        if key not in fields:
            if key in TRANSFORM_ARGS:
                raise SparsetrainError(
                    f"data set {owner!r} has no train-time transform {key!r} (it takes no augmentation); "
                    f"valid data args for {owner!r}: {valid}"
                )
            raise SparsetrainError(f"unknown data arg {key!r} for data set {owner!r}; valid data args: {valid}")
        converted[key] = _convert(value, hints[key], key, owner)
    return cls(**converted)


def non_default_args(args: Any) -> dict[str, Any]:
    """The fields of args instance ``args`` that differ from their defaults, JSON-ready (tuples as
    lists): what a run key should hold, so that adding an argument with a default changes no key.

    >>> non_default_args(ImageArgs()), non_default_args(ImageArgs(view="pixels"))
    ({}, {'view': 'pixels'})
    """
    out = {}
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if value != f.default:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` (command-line flags) as a dict of values: each value is read as JSON
    when it is valid JSON (``4``, ``true``, ``[3, 32, 32]``), else kept as a string (``rows``).
    Check the result with ``dataset_args``.

    >>> parse_assignments(["view=rows", "random_crop=4", "flip=true", "shape=[3, 8, 8]"])
    {'view': 'rows', 'random_crop': 4, 'flip': True, 'shape': [3, 8, 8]}
    """
    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise SparsetrainError(f"a data arg is written KEY=VALUE (e.g. view=rows), got {item!r}")
        try:
            values[key.strip()] = json.loads(text)
        except ValueError:
            values[key.strip()] = text
    return values


def describe_args(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) of each field of args dataclass ``cls``, for help texts.

    >>> describe_args(ImageArgs)[0][:3]
    ('view', "'image' | 'rows' | 'pixels'", 'image')
    """
    hints = typing.get_type_hints(cls)
    return [
        (f.name, _type_name(hints[f.name]), f.default, f.metadata.get("help", ""))
        for f in dataclasses.fields(cls)
    ]


def _convert(value: Any, tp: Any, key: str, owner: str) -> Any:
    """``value`` as type ``tp``; raises SparsetrainError naming ``key`` and the expected type."""
    ok, converted = _try_convert(value, tp)
    if ok:
        return converted
    if typing.get_origin(tp) is Literal:
        choices = ", ".join(repr(c) for c in typing.get_args(tp))
        raise SparsetrainError(
            f"unknown {key} {value!r} for data set {owner!r}: data arg {key!r} must be one of {choices}"
        )
    raise SparsetrainError(
        f"data arg {key!r} of data set {owner!r} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    )


def _try_convert(value: Any, tp: Any) -> tuple[bool, Any]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:  # bool is an int in Python, but True for a count is a mistake
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args), value
    if origin in (Union, types.UnionType):
        for option in args:
            ok, converted = _try_convert(value, option)
            if ok:
                return True, converted
        return False, value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        element_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(element_types) != len(value):
            return False, value
        converted = [_try_convert(v, t) for v, t in zip(value, element_types)]
        return all(ok for ok, _ in converted), tuple(c for _, c in converted)
    return isinstance(value, origin or tp), value


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    names = {bool: "a bool (true/false)", int: "an int", float: "a number", str: "a string", type(None): "none"}
    if tp in names:
        return names[tp]
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            plural = {int: "ints", float: "numbers", str: "strings", bool: "bools"}
            return f"a list of {plural.get(args[0], _type_name(args[0]))}"
        return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    return getattr(tp, "__name__", str(tp))
