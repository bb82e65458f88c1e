"""Unsupervised SNIP: connection sensitivity from a loss that needs no labels (Lee, Ajanthan,
Gould, Torr, ICLR 2020, section 5.2, "pruning without supervision").

SNIP's sensitivity |dL/dc_j| = |w_j dL/dw_j| needs a loss; the supervised one is the cross-entropy
against the labels. Here the target is the uniform distribution over the C classes instead, the
choice of spp-public (``compute_loss(..., fake_uniform=True)`` in ``spp/model.py``: one-hot labels
replaced by ``1 / C``), so the loss is the mean over the batch of

    L(x) = -(1/C) sum_k log softmax(f(x))_k,

the cross-entropy of the softmax against the uniform distribution (equal, up to the constant
log C, to KL(uniform || softmax)). It measures how far the network's prediction is from "no
preference", which depends on the weights and the inputs only. The class dimension is dim 1 of the
logits, as for the default cross-entropy (``(B, C)`` or ``(B, C, ...)``).

The labels are never read: an ``(inputs, targets)`` batch is scored as ``(inputs, None)`` and a dict
batch without its ``"labels"``, so garbage or absent labels give the same mask. Everything else is
SNIP's (:mod:`.snip`): inference mode, gradients summed over batches before the absolute value,
shared tensors scored once.

    >>> import torch
    >>> from sparsetrain import create_model, prune_at_init
    >>> model = create_model("mlp-tiny")
    >>> x = torch.randn(100, 1, 28, 28)
    >>> a = prune_at_init(model, "snip-unsupervised", sparsity=0.9, batches=(x, None))
    >>> b = prune_at_init(model, "snip-unsupervised", sparsity=0.9, batches=(x, torch.full((100,), 12345)))
    >>> all(torch.equal(a[n], b[n]) for n in a)
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from ..errors import SparsetrainError
from .registry import ScoreContext, register_method
from .snip import _sensitivity_and_sum

#: What ``sparsetrain list methods`` and docs/pruning.md say the loss is.
LOSS = "cross-entropy against the uniform distribution over classes (spp-public's fake_uniform)"


def uniform_cross_entropy(logits: torch.Tensor, _targets: Any = None) -> torch.Tensor:
    """Mean over the batch of -(1/C) sum_k log softmax(logits)_k, classes on dim 1; the targets
    are ignored (the signature of a ``loss_fn``).

        >>> round(float(uniform_cross_entropy(torch.zeros(3, 4))), 4)  # uniform prediction: log 4
        1.3863
    """
    if logits.dim() < 2:
        raise SparsetrainError(f"the unsupervised loss needs logits of shape (B, C, ...); got {tuple(logits.shape)}")
    return -F.log_softmax(logits, dim=1).mean(dim=1).mean()


def _without_labels(batch: Any) -> Any:
    """The batch with its labels dropped: ``(x, y) -> (x, None)``, a dict batch as
    ``({inputs without "labels"}, None)`` (so that the model is called as ``model(**inputs)``)."""
    if isinstance(batch, Mapping):
        return ({k: v for k, v in batch.items() if k != "labels"}, None)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return (batch[0], None)
    return batch  # not a batch: forward_loss says what is wrong with it


def _unlabelled(batches: Iterable[Any] | None) -> Iterable[Any] | None:
    return None if batches is None else (_without_labels(b) for b in batches)


@register_method("snip-unsupervised")
def snip_unsupervised_scores(ctx: ScoreContext, options: None) -> dict[str, torch.Tensor]:
    """|dL/dc_j| unnormalised with L the label-free :func:`uniform_cross_entropy`; a loss_fn
    given by the caller is refused (this method's loss is its definition)."""
    if ctx.loss_fn is not None:
        raise SparsetrainError(
            "pruning method 'snip-unsupervised' scores with its own label-free loss (cross-entropy against "
            "the uniform distribution) and takes no loss_fn: leave loss_fn out, or use method 'snip'"
        )
    return _sensitivity_and_sum(ctx.model, ctx.params, _unlabelled(ctx.batches), uniform_cross_entropy)[0]
