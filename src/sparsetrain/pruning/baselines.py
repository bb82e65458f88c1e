"""Baselines scored through the same interface as SNIP.

``random``: uniform scores, so global top-kappa keeps a uniformly random subset (every layer
ends up at about the same sparsity). ``magnitude``: |w| at initialization, global.
"""

from __future__ import annotations

import torch

from . import METHODS


@METHODS.register("random")
def random_scores(model, params, batches, loss_fn, generator):
    return {n: torch.rand(p.shape, generator=generator).to(p.device) for n, p in params.items()}


@METHODS.register("magnitude")
def magnitude_scores(model, params, batches, loss_fn, generator):
    return {n: p.detach().abs() for n, p in params.items()}
