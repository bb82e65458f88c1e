"""``prune_at_init``: choose the prunable set, score it with a method, select, in one or more rounds.

The model is never changed: a later round scores with the pruned weights zeroed and their values
restored afterwards, and the result is a :class:`~sparsetrain.masks.Mask` to apply or train with.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from ..batches import is_batch
from ..errors import SparsetrainError
from ..masks import Mask, prunable_set
from .axes import input_dims as find_input_dims
from .registry import ScoreContext, list_methods, method_options, method_spec
from .rounds import masked_weights, never_revive, round_sparsities
from .select import SCOPES, check_sparsity, select_top
from .structured import NM, parse_structure, select_structured, structured_sparsity


def as_batches(batches: Any) -> Iterable[Any] | None:
    """Accept one batch (``(inputs, targets)`` or a dict) or an iterable of them (a loader)."""
    if batches is None:
        return None
    if is_batch(batches):
        return [batches]
    return batches  # iterated once per round, lazily, by the method


def prune_at_init(
    model: nn.Module,
    method: str = "snip",
    *,
    sparsity: float | None = None,
    batches: Any = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    include_biases: bool = False,
    params: Sequence[str] | None = None,
    exclude: Sequence[str] | str | None = None,
    scope: str = "global",
    seed: int = 0,
    structure: str = "",
    input_dims: Mapping[str, int] | None = None,
    options: Mapping[str, Any] | Any | None = None,
    rounds: int = 1,
    schedule: str | Sequence[float] = "exponential",
    scores_out: dict | None = None,
) -> Mask:
    """Return a :class:`~sparsetrain.masks.Mask` (``{parameter name: bool tensor}``) keeping
    ``1 - sparsity`` of the prunable connections of ``model`` by ``method``'s scores. The model is
    not changed: apply the mask with :func:`sparsetrain.masks.apply_mask_` or train with it.

    ``batches``: one batch, ``(inputs, targets)`` or a dict for ``model(**batch)`` (SNIP's single
    mini-batch), or an iterable of them, whose gradients are summed (spp-public's
    whole-training-set variant); None for a data-free method. ``loss_fn(logits, targets)``:
    default cross-entropy, or the model's own loss for dict batches (see
    :mod:`sparsetrain.batches`).

    Prunable set: every parameter with 2+ dimensions outside normalisation layers, any module
    class, plus 1-D biases with ``include_biases``; ``params=[names]`` prunes those instead,
    ``exclude=[glob patterns]`` leaves matches out; ``mask.left_out`` says what was left out and
    why. A shared (tied) tensor is scored, counted and named once, by its first name.

    ``structure``: ``""`` (unstructured), ``"N:M"`` (keep the top N of every M consecutive input
    entries of each output; ``sparsity`` is then 1 - N/M and may be left out) or ``"blockRxC"``
    (whole R x C tiles, kappa counting tiles); see :mod:`sparsetrain.pruning.structured`. The
    input axis of each weight comes from its layer class, ``input_dims={"name": 0 or 1}``, or is
    assumed to be dim 1 with a note in ``mask.notes`` (:mod:`sparsetrain.pruning.axes`).

    ``options``: the method's options (a dict, checked, or its dataclass; see
    :func:`~sparsetrain.pruning.registry.method_options`). ``rounds``: prune in that many rounds
    along ``schedule`` (``"exponential"``, ``"linear"`` or a list of sparsities), each scored under
    the mask of the round before; entries once pruned stay pruned. Each round reads the batches
    again: a loader is iterated once per round, a one-shot iterator is kept in memory.
    ``scores_out``: a dict that receives the last round's scores (:func:`prune_at_levels` selects
    other sparsities from them).
    """
    layout = parse_structure(structure)
    sparsity = check_sparsity(sparsity) if layout is None else structured_sparsity(layout, sparsity)
    spec = method_spec(method)
    opts = method_options(method, options)
    steps = round_sparsities(sparsity, rounds, schedule)
    if rounds > 1 and isinstance(layout, NM):
        raise SparsetrainError(
            f"structure {layout} fixes the sparsity at {layout.sparsity:.6g} in one step, so it cannot "
            f"be reached in {rounds} rounds; prune with rounds=1, or use block or no structure"
        )
    if scope not in SCOPES:
        raise SparsetrainError(f"unknown selection scope {scope!r}; choose one of {', '.join(SCOPES)}")
    batches = as_batches(batches)
    if batches is None and not spec.data_free:
        free = [n for n in list_methods() if method_spec(n).data_free]
        raise SparsetrainError(
            f"pruning method {method!r} needs data: pass batches=(inputs, targets), a dict batch or a "
            f"loader (the methods that need none: {', '.join(free) or 'none'})"
        )
    if batches is not None and rounds > 1 and iter(batches) is batches:
        batches = list(batches)  # a one-shot iterator (a generator): kept, so that every round reads it
    named, left_out = prunable_set(model, include_biases, params, exclude)
    # The input axis matters to structure only (input_dims are checked either way).
    dims, notes = find_input_dims(model, named, input_dims) if layout is not None or input_dims else ({}, {})
    generator = torch.Generator().manual_seed(seed)
    # The first round keeps everything: a read-only broadcast of one True per tensor, so that
    # scoring does not hold a byte per connection beside the gradients (LSTM-b: 0.5 MiB over the
    # peak of a dense step; docs/results/bench_snip_table2.md). Later rounds get real masks.
    mask = {n: torch.ones((), dtype=torch.bool, device=p.device).expand(p.shape) for n, p in named.items()}
    for k, step in enumerate(steps):
        ctx = ScoreContext(model, named, mask, batches, loss_fn, generator, k, rounds, step, scope, layout, dims)
        # the first round's mask keeps everything: nothing to zero (and no pass over it to find so)
        with masked_weights(named, mask) if k > 0 else contextlib.nullcontext():
            scores = spec.scores(ctx, opts)
        scores = _checked_scores(method, scores, named)
        if k > 0:
            scores = never_revive(scores, mask)
        if scores_out is not None and k == len(steps) - 1:
            scores_out.clear()
            scores_out.update(scores)
        if layout is None:
            mask = select_top(scores, step, scope)
        else:
            mask = select_structured(scores, layout, step, scope, dims)
    return Mask(mask, left_out=left_out, notes=notes if layout is not None else {})


def scores_once(method: str, options: Mapping[str, Any] | Any | None = None, rounds: int = 1,
                structure: str = "") -> bool:
    """Whether pruning by ``method`` (with ``options``, ``rounds`` and ``structure`` as
    :func:`prune_at_init` takes them) scores once, unstructured, in a way that does not depend on
    the sparsity it selects at: false with several rounds or a structure, and for a method that
    runs rounds of its own towards that sparsity (``iter-snip``, ``force``, ``synflow``: an options
    field ``rounds`` above 1)."""
    return rounds == 1 and not structure and getattr(method_options(method, options), "rounds", 1) <= 1


def prune_at_levels(model: nn.Module, method: str, sparsities: Sequence[float], **kwargs: Any) -> list[Mask]:
    """One :class:`~sparsetrain.masks.Mask` per sparsity of ``sparsities`` from one scoring: each
    the mask :func:`prune_at_init` (same ``kwargs``) returns at that sparsity, for the cost of one.
    For one-round, unstructured pruning by a method that :func:`scores_once` (SNIP's scores, say,
    do not depend on the sparsity: a study pruning at 0.7 and 0.9 sums SNIP's gradient over the
    training split once). The method is called at the highest sparsity."""
    levels = [check_sparsity(s) for s in sparsities]
    if not levels:
        raise SparsetrainError("prune_at_levels needs at least one sparsity")
    if not scores_once(method, kwargs.get("options"), kwargs.get("rounds", 1), kwargs.get("structure", "")):
        raise SparsetrainError(
            f"prune_at_levels selects every sparsity from one round of unstructured scores; {method!r} with "
            f"rounds={kwargs.get('rounds', 1)}, structure={kwargs.get('structure', '')!r} and its options scores "
            "towards each sparsity in rounds: call prune_at_init once per sparsity"
        )
    scores: dict[str, torch.Tensor] = {}
    top = prune_at_init(model, method, sparsity=max(levels), scores_out=scores, **kwargs)
    scope = kwargs.get("scope", "global")
    return [top if s == max(levels) else Mask(select_top(scores, s, scope), left_out=top.left_out) for s in levels]


def _checked_scores(method: str, scores: Any, named: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The scores in parameter order, one tensor of the parameter's shape for each."""
    if not isinstance(scores, Mapping) or set(scores) != set(named):
        got = sorted(scores) if isinstance(scores, Mapping) else type(scores).__name__
        raise SparsetrainError(
            f"pruning method {method!r} must return {{name: score tensor}} for exactly the parameters "
            f"in ctx.params ({', '.join(named)}); got {got}"
        )
    bad = [n for n, p in named.items() if tuple(scores[n].shape) != tuple(p.shape)]
    if bad:
        raise SparsetrainError(
            f"pruning method {method!r} returned scores of the wrong shape for {', '.join(bad)} "
            f"(e.g. {tuple(scores[bad[0]].shape)} for a parameter {tuple(named[bad[0]].shape)})"
        )
    return {n: scores[n] for n in named}
