"""SNIP: connection sensitivity at initialization (Lee, Ajanthan, Torr, ICLR 2019).

With a mask c multiplying the weights, g_j = dL/dc_j at c = 1 equals (dL/dw_j) * w_j, so one
forward-backward pass gives every sensitivity at once:

    s_j = |g_j| / sum_k |g_k|,   g_j = w_j * dL/dw_j.

The network is scored in inference mode (batch-norm statistics are not updated, dropout is off),
as snip-public. With several batches the gradients are summed before the absolute value (|sum g|,
as spp-public and effect-dps-public do over the whole training set). A tensor shared by several
layers is one connection set: its gradient sums over its uses and it is scored once.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable

import torch
import torch.nn as nn

from ..batches import LossFn, forward_loss
from ..errors import SparsetrainError
from .registry import ScoreContext, register_method


def _finite_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None) -> torch.Tensor:
    loss, _ = forward_loss(model, batch, loss_fn)
    if not torch.isfinite(loss):
        raise SparsetrainError(
            f"the loss at initialization is {loss.item()}: the scores would be meaningless. "
            "Check the inputs for NaN/inf and the initialization scale."
        )
    return loss


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Every module in inference mode for the block, then each module's own flag back (unlike
    ``model.train(flag)``, which would give every submodule the root's flag). The flags are
    written with ``object.__setattr__``, which skips ``nn.Module.__setattr__``'s bookkeeping:
    scoring a small network is fast enough for that to show (docs/pruning.md)."""
    modules = list(model.modules())
    flags = [m.training for m in modules]
    for m in modules:
        object.__setattr__(m, "training", False)
    try:
        yield modules
    finally:
        for m, flag in zip(modules, flags):
            object.__setattr__(m, "training", flag)


def _distinct(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``params`` with each tensor once, under its first name (a tied weight is one tensor)."""
    seen: set[int] = set()
    out = {}
    for name, p in params.items():
        if id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out


def summed_gradients(model: nn.Module, params: dict[str, nn.Parameter], batches: Iterable[Any] | None,
                     loss_fn: LossFn | None = None) -> list[torch.Tensor]:
    """sum over batches of dL/dw for each parameter (each a distinct tensor), with the model in
    inference mode. A parameter that does not require grad gets a zero gradient."""
    if batches is None:
        raise SparsetrainError("SNIP needs data: pass batches=(inputs, targets), a dict batch or a loader")
    tensors = list(params.values())
    wanted = [t for t in tensors if t.requires_grad]
    total: list[torch.Tensor] | None = None
    with _eval_mode(model) as modules:
        # cuDNN cannot run an RNN backward pass in inference mode; the native kernels can.
        no_cudnn = any(isinstance(m, nn.RNNBase) for m in modules)
        with torch.backends.cudnn.flags(enabled=False) if no_cudnn else contextlib.nullcontext():
            for batch in batches:
                loss = _finite_loss(model, batch, loss_fn)
                found = iter(torch.autograd.grad(loss, wanted, allow_unused=True))
                grads = [next(found) if t.requires_grad else None for t in tensors]
                grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]
                total = grads if total is None else [a.add_(g) for a, g in zip(total, grads)]
    if total is None:
        raise SparsetrainError("SNIP got an empty set of batches: pass at least one batch")
    return total


def _sensitivity_and_sum(model, params, batches, loss_fn) -> tuple[dict[str, torch.Tensor], float]:
    """|dL/dc_j| at c = 1 for every connection (unnormalised) and their sum, checked."""
    grads = summed_gradients(model, params, batches, loss_fn)
    with torch.no_grad():
        # in place: each gradient is a distinct tensor (params are distinct)
        raw = [g.mul_(p).abs_() for g, p in zip(grads, params.values())]  # |dL/dc| at c = 1
        norm = sum(float(r.sum()) for r in raw)
    if not math.isfinite(norm):
        raise SparsetrainError(
            "SNIP scores are NaN or infinite (gradients overflowed at initialization). "
            "Check the inputs and the initialization scale, or score in float64."
        )
    if norm == 0.0:
        raise SparsetrainError(
            "every SNIP score is zero: the loss does not depend on any prunable weight "
            "(dead ReLUs, all-zero weights or inputs?). Check the initialization and the data."
        )
    return dict(zip(params, raw)), norm


def connection_sensitivity(model: nn.Module, params: dict[str, nn.Parameter], batches: Iterable[Any] | None,
                           loss_fn: LossFn | None = None) -> dict[str, torch.Tensor]:
    """Normalised connection sensitivities s_j (they sum to 1 over ``params``; a tensor named
    twice in ``params`` is scored once, under its first name)."""
    raw, norm = _sensitivity_and_sum(model, _distinct(params), batches, loss_fn)
    return {n: r.div_(norm) for n, r in raw.items()}


@register_method("snip")
def snip_scores(ctx: ScoreContext, options: None) -> dict[str, torch.Tensor]:
    """|dL/dc_j| unnormalised: dividing by the sum does not change which connections are the
    top kappa, so the selection skips that pass (:func:`connection_sensitivity` gives s_j)."""
    return _sensitivity_and_sum(ctx.model, ctx.params, ctx.batches, ctx.loss_fn)[0]
