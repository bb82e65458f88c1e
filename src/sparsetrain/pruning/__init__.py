"""Pruning at initialization: score, then select, then (by the caller) apply.

    >>> import torch
    >>> from sparsetrain import create_model, prune_at_init
    >>> model = create_model("lenet-300-100")
    >>> x, y = torch.randn(100, 1, 28, 28), torch.randint(0, 10, (100,))
    >>> mask = prune_at_init(model, "snip", sparsity=0.95, batches=(x, y))
    >>> sum(int(m.sum()) for m in mask.values())  # round(266200 * 0.05) weights kept
    13310

A method is one function ``scores(ctx, options)`` registered with :func:`register_method`
(:mod:`.registry`) that returns a score per prunable entry (higher = more important); selection
(global top-kappa, exact, deterministic ties) is shared (:mod:`.select`), and so are structured
selection (``structure="2:4"`` or ``"block32x32"``, :mod:`.structured`) and rounds
(:mod:`.rounds`). See docs/pruning.md for how to add a method.
"""

from __future__ import annotations

from . import baselines, snip  # noqa: F401  (importing the methods registers them)
from . import force, grasp, synflow  # noqa: F401  (GraSP, SynFlow, iterative SNIP, FORCE)
from . import snip_unsupervised  # noqa: F401  (SNIP from a label-free loss)
from .axes import input_dims
from .prune import as_batches, prune_at_init, prune_at_levels, scores_once
from .registry import (
    METHODS,
    MethodSpec,
    ScoreContext,
    list_methods,
    method_options,
    method_spec,
    register_method,
)
from .rounds import SCHEDULES, round_sparsities
from .select import SCOPES, check_sparsity, select_top
from .snip import connection_sensitivity
from .structured import NM, Blocks, parse_structure, select_structured, structured_sparsity

__all__ = [
    "METHODS",
    "SCHEDULES",
    "SCOPES",
    "Blocks",
    "MethodSpec",
    "NM",
    "ScoreContext",
    "as_batches",
    "check_sparsity",
    "connection_sensitivity",
    "input_dims",
    "list_methods",
    "method_options",
    "method_spec",
    "parse_structure",
    "prune_at_init",
    "prune_at_levels",
    "scores_once",
    "register_method",
    "round_sparsities",
    "select_structured",
    "select_top",
    "structured_sparsity",
]
