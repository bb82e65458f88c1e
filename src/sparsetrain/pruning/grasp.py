"""GraSP: gradient signal preservation (Wang, Zhang, Grosse, ICLR 2020).

GraSP keeps the weights whose removal would most reduce the gradient flow g^T g after pruning.
To first order, removing weight theta_j changes the gradient norm by -theta_j (H g)_j, with g the
gradient of the loss and H its Hessian; the paper's score is S = -theta ⊙ (H g) and it *removes*
the weights with the largest S. Here higher scores are kept, so the score is

    s = theta ⊙ (H g)  (= -S; signed, not an absolute value),

as in ganguli-lab/Synaptic-Flow, which keeps the largest theta ⊙ Hg. H g costs one extra backward
pass: g is computed once and held constant (stop-gradient), then the gradient of
g(theta) . stopgrad(g) with respect to theta is H g (a double backward through a graph made with
``create_graph=True``).

Options, with the original's defaults (both cheap):

- ``temperature=200``: the logits are divided by T before the loss, which keeps the softmax from
  saturating so that H g is not zero;
- ``samples_per_class=10``: of the ``(inputs, targets)`` batches given, the first 10 examples of
  each class are scored (the original draws 10 per class from the training set); 0 scores every
  example given. Dict batches are used as given.

The network is scored in inference mode, as SNIP (batch-norm uses its running statistics);
attention runs in its plain-math form, whose second derivative exists.

    >>> import torch
    >>> from sparsetrain import create_model, prune_at_init
    >>> model = create_model("mlp-tiny")
    >>> x, y = torch.randn(100, 1, 28, 28), torch.arange(100) % 10
    >>> mask = prune_at_init(model, "grasp", sparsity=0.9, batches=(x, y))
    >>> sum(int(m.sum()) for m in mask.values())  # round(25408 * 0.1)
    2541
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..batches import forward_loss
from ..errors import SparsetrainError
from .registry import ScoreContext, register_method
from .snip import _eval_mode


@dataclass(frozen=True)
class GraSPOptions:
    """``temperature``: logits / T before the loss (original: 200); ``samples_per_class``: the
    first examples of each class scored (original: 10; 0 = every example given)."""

    temperature: float = 200.0
    samples_per_class: int = 10


def check_options(options: GraSPOptions) -> None:
    if not options.temperature > 0:
        raise SparsetrainError(f"GraSP's temperature divides the logits and must be > 0 (the original: 200); got {options.temperature}")
    if options.samples_per_class < 0:
        raise SparsetrainError(f"GraSP's samples_per_class must be >= 1, or 0 for every example given; got {options.samples_per_class}")


def per_class(batches: Iterable[Any], count: int) -> list[Any]:
    """The first ``count`` examples of each class over the ``(inputs, targets)`` batches, as one
    batch in the order they came; dict batches are kept as they are."""
    if count == 0:
        return list(batches)
    xs, ys, others = [], [], []
    seen: dict[int, int] = {}
    for batch in batches:
        if isinstance(batch, Mapping) or not torch.is_tensor(batch[1]) or batch[1].is_floating_point():
            others.append(batch)
            continue
        x, y = batch
        take = []
        for i, label in enumerate(y.tolist()):
            if seen.get(label, 0) < count:
                seen[label] = seen.get(label, 0) + 1
                take.append(i)
        if take:
            index = torch.tensor(take, device=y.device)
            xs.append(x.index_select(0, index))
            ys.append(y.index_select(0, index))
    return ([(torch.cat(xs), torch.cat(ys))] if xs else []) + others


def _cooled_loss(ctx: ScoreContext, batch: Any, temperature: float) -> torch.Tensor:
    if temperature == 1.0:
        return forward_loss(ctx.model, batch, ctx.loss_fn)[0]
    if isinstance(batch, Mapping) and ctx.loss_fn is None:
        raise SparsetrainError(
            "GraSP divides the logits by its temperature before the loss, but a dict batch without "
            "loss_fn is scored by the model's own loss, which it cannot reach: pass "
            "loss_fn=(logits, labels) -> loss, or options={'temperature': 1.0}"
        )
    base = ctx.loss_fn or F.cross_entropy
    return forward_loss(ctx.model, batch, lambda logits, y: base(logits / temperature, y))[0]


@register_method("grasp", options=GraSPOptions)
def grasp_scores(ctx: ScoreContext, options: GraSPOptions) -> dict[str, torch.Tensor]:
    """theta ⊙ (H g), summed over the batches (see the module docstring)."""
    check_options(options)
    batches = per_class(ctx.batches, options.samples_per_class)
    if not batches:
        raise SparsetrainError("GraSP got an empty set of batches: pass at least one batch")
    params = list(ctx.params.values())
    # Attention in its plain-math form: the fused CPU kernels have no second derivative.
    with _eval_mode(ctx.model), sdpa_kernel(SDPBackend.MATH):
        g = None  # the gradient, held constant
        for batch in batches:
            grads = torch.autograd.grad(_cooled_loss(ctx, batch, options.temperature), params, allow_unused=True)
            grads = [torch.zeros_like(p) if gr is None else gr for gr, p in zip(grads, params)]
            g = grads if g is None else [a + b for a, b in zip(g, grads)]
        hg = [torch.zeros_like(p) for p in params]
        for batch in batches:
            loss = _cooled_loss(ctx, batch, options.temperature)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            flow = sum((gr * c).sum() for gr, c in zip(grads, g) if gr is not None)  # g(theta) . stopgrad(g)
            if not torch.is_tensor(flow) or not flow.requires_grad:
                continue  # a network linear in its weights has H = 0 on this batch
            second = torch.autograd.grad(flow, params, allow_unused=True)
            hg = [a if s is None else a + s for a, s in zip(hg, second)]
    with torch.no_grad():
        scores = {n: p.detach() * h for (n, p), h in zip(ctx.params.items(), hg)}
    if not all(bool(torch.isfinite(s).all()) for s in scores.values()):
        raise SparsetrainError(
            "GraSP scores are NaN or infinite: check the inputs and the initialisation scale"
        )
    return scores
