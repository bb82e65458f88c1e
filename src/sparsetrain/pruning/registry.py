"""The pruning-method contract: what a method receives, what it returns, and its registry.

A method is one function ``scores(ctx, options) -> {name: score tensor}`` (higher = keep),
registered by name with :func:`register_method`, that owns a frozen dataclass of options (or
none). It only scores; selection (exact top-kappa, ties, structure, rounds) is shared.

    >>> import dataclasses, torch
    >>> @dataclasses.dataclass(frozen=True)
    ... class PowerOptions:
    ...     power: float = 1.0
    >>> @register_method("doc-power", options=PowerOptions, data_free=True)
    ... def power_scores(ctx, options):
    ...     return {n: p.detach().abs() ** options.power for n, p in ctx.params.items()}
    >>> method_options("doc-power", {"power": 2})
    PowerOptions(power=2.0)
    >>> method_spec("doc-power").data_free
    True
    >>> METHODS.unregister("doc-power")
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

from ..errors import SparsetrainError
from ..registry import Registry


@dataclass(frozen=True)
class ScoreContext:
    """What a method scores with, in one round of pruning.

    ``params``: the prunable parameters, ``{canonical name: parameter}``, a shared tensor once.
    ``mask``: ``{name: bool tensor}``, the mask so far (all True in round 0); while a method
    runs in a later round, the pruned entries of ``params`` are zero in the model (restored
    afterwards), and entries already pruned are never revived whatever their score.
    ``batches``: an iterable of batches (``(inputs, targets)`` or dicts, see
    :mod:`sparsetrain.batches`), or None for a data-free method called without data; it may be
    iterated once per round. ``loss_fn``: None means the default (cross-entropy for
    ``(inputs, targets)``, the model's own loss for dict batches).
    ``generator``: seeded once per ``prune_at_init`` call. ``round``: 0 .. ``rounds`` - 1.
    ``sparsity``: the sparsity this round selects at."""

    model: nn.Module
    params: dict[str, nn.Parameter]
    mask: dict[str, torch.Tensor]
    batches: Iterable[Any] | None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    generator: torch.Generator
    round: int = 0
    rounds: int = 1
    sparsity: float = 0.0


ScoreFn = Callable[[ScoreContext, Any], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its scoring function, its options dataclass (None: it takes no
    options) and whether it scores without data (``data_free``)."""

    name: str
    scores: ScoreFn
    options: type | None = None
    data_free: bool = False

    def __call__(self, ctx: ScoreContext, options: Any = None) -> dict[str, torch.Tensor]:
        return self.scores(ctx, options)


class _MethodRegistry(Registry):
    def unregister(self, name: str) -> None:
        """Remove a method (tests and notebooks that register one for a while)."""
        self._entries.pop(name, None)


METHODS = _MethodRegistry("pruning method")


def register_method(name: str, *, options: type | None = None, data_free: bool = False) -> Callable[[ScoreFn], ScoreFn]:
    """Register ``scores(ctx, options)`` as pruning method ``name``; ``options`` is its frozen
    dataclass of options (every field with a default), ``data_free`` says it needs no batches."""
    if options is not None and not dataclasses.is_dataclass(options):
        raise TypeError(f"register_method({name!r}): options must be a dataclass type, got {options!r}")

    def decorator(fn: ScoreFn) -> ScoreFn:
        METHODS.register(name)(MethodSpec(name, fn, options, data_free))
        return fn

    return decorator


def list_methods(pattern: str = "*") -> list[str]:
    return METHODS.list(pattern)


def method_spec(name: str) -> MethodSpec:
    """The registered method ``name`` (unknown names raise, naming the closest ones). A bare
    function registered with ``METHODS.register`` is taken as a method with no options."""
    entry = METHODS.get(name)
    return entry if isinstance(entry, MethodSpec) else MethodSpec(name, entry)


def method_options(name: str, values: Mapping[str, Any] | Any | None = None) -> Any:
    """Method ``name``'s options as its dataclass, from a dict (checked: unknown keys and wrong
    types raise :class:`SparsetrainError` naming the valid keys or the expected type), an
    instance of the dataclass, or None (the defaults). None for a method without options."""
    spec = method_spec(name)
    cls = spec.options
    if cls is None:
        if values:
            raise SparsetrainError(f"pruning method {name!r} takes no options; got {_keys(values)}")
        return None
    if values is None:
        return cls()
    if isinstance(values, cls):
        return values
    if not isinstance(values, Mapping):
        raise SparsetrainError(
            f"options of pruning method {name!r} must be a dict or a {cls.__name__}; got {type(values).__name__}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise SparsetrainError(
            f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for pruning "
            f"method {name!r}; valid options: {', '.join(fields) or 'none'}"
        )
    hints = typing.get_type_hints(cls)
    return cls(**{k: _checked(name, k, v, hints.get(k, Any)) for k, v in values.items()})


def _keys(values: Any) -> str:
    return ", ".join(map(repr, values)) if isinstance(values, Mapping) else repr(values)


def _checked(method: str, key: str, value: Any, expected: Any) -> Any:
    ok, converted = _convert(value, expected)
    if not ok:
        raise SparsetrainError(
            f"option {key!r} of pruning method {method!r} must be {_type_name(expected)}; "
            f"got {value!r} ({type(value).__name__})"
        )
    return converted


def _convert(value: Any, expected: Any) -> tuple[bool, Any]:
    """(fits, value converted): bool is not an int here, an int is a float."""
    origin = typing.get_origin(expected)
    if expected is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(expected):
            ok, converted = _convert(value, arm)
            if ok:
                return True, converted
        return False, value
    if origin is typing.Literal:
        return value in typing.get_args(expected), value
    if expected is type(None):
        return value is None, value
    if expected is float:
        fits = isinstance(value, (int, float)) and not isinstance(value, bool)
        return fits, float(value) if fits else value
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False, value
        args = typing.get_args(expected)
        arm = args[0] if args else Any
        items = [_convert(v, arm) for v in value]
        return all(ok for ok, _ in items), origin(v for _, v in items)
    if isinstance(expected, type):
        return isinstance(value, expected), value
    return True, value


def _type_name(expected: Any) -> str:
    if isinstance(expected, type):
        return expected.__name__
    return str(expected).replace("typing.", "")
