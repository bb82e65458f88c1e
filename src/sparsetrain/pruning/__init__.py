"""Pruning at initialization: score, then select, then (by the caller) apply.

    >>> import torch
    >>> from sparsetrain import create_model, prune_at_init
    >>> model = create_model("lenet-300-100")
    >>> x, y = torch.randn(100, 1, 28, 28), torch.randint(0, 10, (100,))
    >>> mask = prune_at_init(model, "snip", sparsity=0.95, batches=(x, y))
    >>> sum(int(m.sum()) for m in mask.values())  # round(266200 * 0.05) weights kept
    13310

A method is one function registered in ``METHODS`` that returns a score per prunable entry
(higher = more important); selection (global top-kappa, exact, deterministic ties) is shared,
and so is structured selection (``structure="2:4"`` or ``"block32x32"``, see :mod:`.structured`).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SparsetrainError
from ..masks import Mask, prunable_parameters
from ..registry import Registry
from .select import check_sparsity, select_top
from .structured import parse_structure, select_structured, structured_sparsity

METHODS = Registry("pruning method")

Batch = tuple[torch.Tensor, torch.Tensor]


def list_methods(pattern: str = "*") -> list[str]:
    return METHODS.list(pattern)


def as_batches(batches: Batch | Iterable[Batch] | None) -> list[Batch] | None:
    """Accept one ``(inputs, targets)`` batch or an iterable of them (a loader)."""
    if batches is None:
        return None
    if isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[0], torch.Tensor):
        return [batches]
    return batches  # iterated once, lazily, by the method


def select_parameters(model: nn.Module, include_biases: bool, params: list[str] | None) -> dict[str, nn.Parameter]:
    if params is None:
        return prunable_parameters(model, include_biases)
    named = dict(model.named_parameters())
    unknown = [p for p in params if p not in named]
    if unknown or not params:
        raise SparsetrainError(
            f"cannot prune {unknown or 'an empty list of parameters'}: not parameters of the model. "
            f"Its parameters: {', '.join(named) or 'none'}"
        )
    return {p: named[p] for p in params}


def prune_at_init(
    model: nn.Module,
    method: str = "snip",
    *,
    sparsity: float | None = None,
    batches: Batch | Iterable[Batch] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    include_biases: bool = False,
    params: list[str] | None = None,
    scope: str = "global",
    seed: int = 0,
    structure: str = "",
) -> Mask:
    """Return a mask (``{parameter name: bool tensor}``) keeping ``1 - sparsity`` of the
    prunable connections of ``model`` by ``method``'s scores. The model is not changed: apply
    the mask with :func:`sparsetrain.masks.apply_mask_` or train with it.

    ``batches`` is one ``(inputs, targets)`` batch (SNIP's single mini-batch) or an iterable of
    them, whose gradients are summed (spp-public's whole-training-set variant).

    ``structure``: ``""`` (unstructured), ``"N:M"`` (keep the top N of every M consecutive scores
    of each row; ``sparsity`` is then 1 - N/M and may be left out) or ``"blockRxC"`` (whole
    R x C tiles, kappa counting tiles); see :mod:`sparsetrain.pruning.structured`.
    """
    layout = parse_structure(structure)
    sparsity = check_sparsity(sparsity) if layout is None else structured_sparsity(layout, sparsity)
    scorer = METHODS.get(method)
    named = select_parameters(model, include_biases, params)
    generator = torch.Generator().manual_seed(seed)
    scores = scorer(model, named, as_batches(batches), loss_fn, generator)
    if layout is None:
        return select_top(scores, sparsity, scope)
    return select_structured(scores, layout, sparsity, scope)


# Importing the methods fills the registry.
from . import baselines, snip  # noqa: E402,F401
from .snip import connection_sensitivity  # noqa: E402

__all__ = [
    "METHODS",
    "connection_sensitivity",
    "list_methods",
    "parse_structure",
    "prune_at_init",
    "select_structured",
    "select_top",
]
