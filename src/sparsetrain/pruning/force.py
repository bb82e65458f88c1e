"""Iterative SNIP and FORCE (de Jorge et al., "Progressive Skeletonization", ICLR 2021).

Both prune in R rounds along an exponential schedule (density_k = density^(k/R)), recomputing
SNIP's sensitivity in every round on the network the last round left, with the gradients g of the
loss at the pruned weights c ⊙ theta (c: the mask so far). They differ in which weights the
sensitivity multiplies, and so in whether a pruned connection can come back:

- ``iter-snip``: s = |g ⊙ (c ⊙ theta)|, the sensitivity of the pruned network at its own weights.
  A pruned weight is zero, scores zero, and is never revived: the masks are nested.
- ``force`` (FOResight Connection sEnsitivity): s = |g ⊙ theta|, with theta the weights at
  initialisation, i.e. the gradient of the pruned network's loss with respect to the mask,
  dL/dc = theta ⊙ dL/d(c ⊙ theta). A pruned connection keeps a score (what putting it back would
  do) and competes again in every round, as in naver/force (``prune_method=3``).

Defaults follow naver/force's published commands (``--num_steps 60 --mode exp``, one batch):
``rounds=60``, ``schedule="exponential"``; the batches are the caller's (gradients summed over
them, as SNIP here). The network is scored in inference mode, as SNIP. These methods run their
own rounds (:mod:`.iterate`): set them with ``options={"rounds": R}``.

    >>> import torch
    >>> from sparsetrain import create_model, prune_at_init
    >>> model = create_model("mlp-tiny")
    >>> x, y = torch.randn(20, 1, 28, 28), torch.randint(0, 10, (20,))
    >>> mask = prune_at_init(model, "force", sparsity=0.9, batches=(x, y), options={"rounds": 3})
    >>> sum(int(m.sum()) for m in mask.values())  # round(25408 * 0.1)
    2541
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .iterate import rereadable, run_rounds
from .registry import ScoreContext, register_method
from .snip import summed_gradients


@dataclass(frozen=True)
class IterativeOptions:
    """``rounds``: how many rounds of scoring and pruning (naver/force's commands: 60);
    ``schedule``: the density after round k is density^(k/R) (exponential) or the sparsity
    grows by equal steps (linear)."""

    rounds: int = 60
    schedule: Literal["exponential", "linear"] = "exponential"


def _sensitivity(ctx: ScoreContext, batches, weights: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """|dL/dw ⊙ weights| per parameter, the gradients taken at the current (masked) parameters."""
    grads = summed_gradients(ctx.model, ctx.params, batches, ctx.loss_fn)
    with torch.no_grad():
        return {n: g.mul_(w).abs_() for n, g, w in zip(ctx.params, grads, weights)}


@register_method("iter-snip", options=IterativeOptions)
def iter_snip_scores(ctx: ScoreContext, options: IterativeOptions) -> dict[str, torch.Tensor]:
    """|g ⊙ (c ⊙ theta)| recomputed each round; pruned connections stay pruned."""
    batches = rereadable(ctx.batches)
    params = list(ctx.params.values())  # zero where pruned while a round scores
    return run_rounds(ctx, "iter-snip", options.rounds, options.schedule,
                      lambda mask: _sensitivity(ctx, batches, [p.detach() for p in params]))


@register_method("force", options=IterativeOptions)
def force_scores(ctx: ScoreContext, options: IterativeOptions) -> dict[str, torch.Tensor]:
    """|g ⊙ theta| with theta the initial weights and g taken on the pruned network; pruned
    connections may come back."""
    batches = rereadable(ctx.batches)
    theta = [p.detach().clone() for p in ctx.params.values()]  # the weights before any round
    return run_rounds(ctx, "force", options.rounds, options.schedule,
                      lambda mask: _sensitivity(ctx, batches, theta), revive=True)
