"""Methods that iterate by themselves: SynFlow, iterative SNIP and FORCE run R rounds per call.

Their originals prune in many rounds by default (SynFlow 100, FORCE's commands 60), and FORCE
lets a connection pruned in one round come back in a later one, which the contract's rounds
(``prune_at_init(rounds=R)``, where pruned entries stay pruned) cannot express. So these methods
take ``rounds`` and ``schedule`` as their own options and run the rounds inside one call of
``scores``, with the shared pieces of :mod:`.rounds` (the schedule, the pruned weights zeroed
while scoring, never reviving) and :mod:`.select` (exact global top-kappa). They return the last
round's scores, which the caller's selection turns into the final mask. Every intermediate round
selects as the caller will (:func:`select_as_caller`: the caller's ``scope`` and block
``structure``, from the :class:`~.registry.ScoreContext`), so with ``scope="layerwise"`` or
``"erk"`` each round keeps each layer's budget at that round's sparsity and, without revival,
the masks are nested down to the final one: a layer never needs back an entry it pruned. N:M
structure fixes one sparsity, so the rounds before the last select unstructured (with the
caller's scope) and the last round's N:M selection is the only structured one.

One way to set the rounds: a caller that also passes ``prune_at_init(rounds=R > 1)`` is refused,
naming the option to use instead.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from ..errors import SparsetrainError
from .registry import ScoreContext
from .rounds import masked_weights, never_revive, round_sparsities
from .select import kept_count, select_top
from .structured import NM, select_structured

RoundScores = Callable[[dict[str, torch.Tensor] | None], dict[str, torch.Tensor]]


def refuse_outer_rounds(ctx: ScoreContext, method: str) -> None:
    if ctx.rounds > 1:
        raise SparsetrainError(
            f"pruning method {method!r} runs its own rounds: set them with options={{'rounds': "
            f"{ctx.rounds}}} (--option rounds={ctx.rounds}) and leave prune_at_init's rounds at 1 "
            f"(--prune-rounds 1); got rounds={ctx.rounds}"
        )


def rereadable(batches: Any) -> Any:
    """``batches`` readable once per round: a one-shot iterator (a generator) is kept in a list."""
    if batches is not None and iter(batches) is batches:
        return list(batches)
    return batches


def select_as_caller(ctx: ScoreContext, scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """The mask the caller's selection would make of ``scores`` at ``sparsity``: its scope, and
    its block structure (N:M, which fixes the sparsity, is left to the last round)."""
    if ctx.structure is None or isinstance(ctx.structure, NM):
        return select_top(scores, sparsity, ctx.scope)
    return select_structured(scores, ctx.structure, sparsity, ctx.scope, dict(ctx.input_dims))


def run_rounds(ctx: ScoreContext, method: str, rounds: int, schedule: str, score_round: RoundScores,
               revive: bool = False) -> dict[str, torch.Tensor]:
    """Prune to ``ctx.sparsity`` in ``rounds`` rounds along ``schedule``; return the last round's
    scores. ``score_round(mask)`` scores the network with the entries ``mask`` prunes zero in
    ``ctx.params`` (``mask`` is None in the first round, where nothing is pruned). Without
    ``revive`` the pruned entries score -inf, so kappa never grows and the masks are nested; with
    it (FORCE) every entry competes again in every round, inside the budget of its layer when
    the caller's scope sets one. Every round selects as the caller will (:func:`select_as_caller`). A
    round that would select the mask it starts from (kappa unchanged, the network unchanged) is
    skipped: at sparsity 0 only the last round is scored."""
    refuse_outer_rounds(ctx, method)
    steps = round_sparsities(ctx.sparsity, rounds, schedule)
    total = sum(p.numel() for p in ctx.params.values())
    mask: dict[str, torch.Tensor] | None = None
    kept, settled = total, True  # settled: the last selection left the mask as it was
    for k, step in enumerate(steps):
        last = k == len(steps) - 1
        if not last and kept_count(total, step) == kept and (settled or not revive):
            # Same network, same kappa: this round would select the mask it starts from.
            continue
        with masked_weights(ctx.params, mask) if mask is not None else contextlib.nullcontext():
            scores = score_round(mask)
        if mask is not None and not revive:
            scores = never_revive(scores, mask)
        if last:
            return scores
        new = select_as_caller(ctx, scores, step)
        settled = revive and mask is not None and all(torch.equal(new[n], mask[n]) for n in new)
        mask, kept = new, kept_count(total, step)
    raise AssertionError("unreachable: round_sparsities returns at least one round")
