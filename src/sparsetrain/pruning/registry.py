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
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

from ..errors import SparsetrainError
from ..options import build_options
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
    ``sparsity``: the sparsity this round selects at. ``scope``, ``structure`` and
    ``input_dims``: how the caller selects (its layer budget, its parsed structure or None, the
    input axis of each weight for the structure), so that a method that runs rounds of its own
    (:mod:`.iterate`) selects every round with the caller's budgets, not only the last."""

    model: nn.Module
    params: dict[str, nn.Parameter]
    mask: dict[str, torch.Tensor]
    batches: Iterable[Any] | None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    generator: torch.Generator
    round: int = 0
    rounds: int = 1
    sparsity: float = 0.0
    scope: str = "global"
    structure: Any = None
    input_dims: Mapping[str, int] = dataclasses.field(default_factory=dict)


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


METHODS = Registry("pruning method")


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
    if spec.options is None:
        if values:
            keys = ", ".join(map(repr, values)) if isinstance(values, Mapping) else repr(values)
            raise SparsetrainError(f"pruning method {name!r} takes no options; got {keys}")
        return None
    return build_options(spec.options, values, "option", f"of pruning method {name!r}")
