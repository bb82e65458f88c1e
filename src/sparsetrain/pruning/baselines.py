"""Baselines scored through the same contract as SNIP; both need no data.

``random``: uniform scores, so global top-kappa keeps a uniformly random subset (every layer
ends up at about the same sparsity). ``magnitude``: |w| at initialization, global (in a later
round, under the mask so far, which changes nothing: the kept weights keep their values).
"""

from __future__ import annotations

import torch

from .registry import ScoreContext, register_method


@register_method("random", data_free=True)
def random_scores(ctx: ScoreContext, options: None) -> dict[str, torch.Tensor]:
    return {n: torch.rand(p.shape, generator=ctx.generator).to(p.device) for n, p in ctx.params.items()}


@register_method("magnitude", data_free=True)
def magnitude_scores(ctx: ScoreContext, options: None) -> dict[str, torch.Tensor]:
    return {n: p.detach().abs() for n, p in ctx.params.items()}
