"""Typed settings: one checker for every dataclass of values a user writes.

The run config's sections, a model's arguments, a data set's arguments and a pruning method's
options are all dataclasses (or signatures) with annotated fields. Values come from TOML, JSON or
the command line, so they arrive as plain ints, floats, strings, lists and dicts; this module
checks them against the annotations, converts where that loses nothing (an int for a float, a
list for a tuple) and otherwise says what was expected, in one wording everywhere.

    >>> import dataclasses
    >>> @dataclasses.dataclass(frozen=True)
    ... class Opts:
    ...     scale: float = 1.0
    ...     shape: tuple[int, ...] = (1, 28, 28)
    >>> build_options(Opts, {"scale": 2, "shape": [3, 32, 32]}, "option", "of the example")
    Opts(scale=2.0, shape=(3, 32, 32))
    >>> build_options(Opts, {"scale": "big"}, "option", "of the example")
    Traceback (most recent call last):
    ...
    sparsetrain.errors.SparsetrainError: option 'scale' of the example must be a float, got 'big'
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Mapping

from .errors import SparsetrainError

__all__ = ["build_options", "check_value", "convert", "describe_options", "type_name"]


def convert(value: Any, expected: Any) -> tuple[bool, Any]:
    """``(fits, converted)``: ``value`` as annotation ``expected``. A bool is not an int, an int is
    a float, a list fits a tuple (and becomes one), ``Literal`` takes its listed values only."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if expected is Any:
        return True, value
    if expected is type(None):
        return value is None, value
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            ok, converted = convert(value, arm)
            if ok:
                return True, converted
        return False, value
    if origin is Literal:  # True is not 1 here
        return any(value == a and type(value) is type(a) for a in args), value
    if expected is float:
        fits = isinstance(value, (int, float)) and not isinstance(value, bool)
        return fits, float(value) if fits else value
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False, value
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):  # tuple[int, int]
            if len(args) != len(value):
                return False, value
            items = [convert(v, t) for v, t in zip(value, args)]
        else:
            items = [convert(v, args[0] if args else Any) for v in value]
        return all(ok for ok, _ in items), origin(v for _, v in items)
    if origin is dict:
        if not isinstance(value, Mapping):
            return False, value
        item = args[1] if len(args) == 2 else Any
        items = {str(k): convert(v, item) for k, v in value.items()}
        return all(ok for ok, _ in items.values()), {k: v for k, (_, v) in items.items()}
    if isinstance(expected, type):
        return isinstance(value, expected), value
    return True, value


def type_name(expected: Any) -> str:
    """A type as a user reads it: ``an int``, ``a list of ints``, ``one of 'image', 'rows'``."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        return f"a list of {len(args)}: " + ", ".join(type_name(a) for a in args)
    if origin in (tuple, list):
        item = args[0] if args else Any
        return "a list" + ("" if item is Any else f" of {_plural(item)}")
    if origin is dict:
        return "a table (key = value)"
    return {int: "an int", float: "a float", str: "a string", bool: "a bool (true or false)",
            type(None): "none"}.get(expected, getattr(expected, "__name__", str(expected)))


def _plural(expected: Any) -> str:
    return {int: "ints", float: "floats", str: "strings", bool: "bools"}.get(expected, type_name(expected))


def check_value(value: Any, expected: Any, what: str) -> Any:
    """``value`` converted to ``expected``, or a SparsetrainError: ``{what} must be {type}, got {value!r}``."""
    ok, converted = convert(value, expected)
    if not ok:
        raise SparsetrainError(f"{what} must be {type_name(expected)}, got {value!r}")
    return converted


def build_options(cls: type, values: Mapping[str, Any] | Any | None, kind: str, owner: str) -> Any:
    """An instance of dataclass ``cls`` from ``values`` (a mapping, an instance, or None for the
    defaults). Errors name ``{kind} '{key}' {owner}``: an unknown key with the valid ones, a value
    with the expected type."""
    if values is None:
        return cls()
    if isinstance(values, cls):
        return values
    if not isinstance(values, Mapping):
        raise SparsetrainError(f"the {kind}s {owner} must be a table (key = value), got {values!r}")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise SparsetrainError(
            f"unknown {kind}{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} {owner}; "
            f"valid {kind}s: {', '.join(fields) or 'none'}"
        )
    hints = typing.get_type_hints(cls)
    return cls(**{k: check_value(v, hints.get(k, Any), f"{kind} {k!r} {owner}") for k, v in values.items()})


def describe_options(cls: type | None) -> list[str]:
    """``name: type = default  help`` for each field of a dataclass (for listings and help)."""
    if cls is None:
        return []
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = f.metadata.get("help", "")
        lines.append(f"{f.name} ({type_name(hints[f.name])}) = {default!r}" + (f"  {help_text}" if help_text else ""))
    return lines
