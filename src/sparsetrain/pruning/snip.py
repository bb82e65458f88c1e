"""SNIP: connection sensitivity at initialization (Lee, Ajanthan, Torr, ICLR 2019).

With a mask c multiplying the weights, g_j = dL/dc_j at c = 1 equals (dL/dw_j) * w_j, so one
forward-backward pass gives every sensitivity at once:

    s_j = |g_j| / sum_k |g_k|,   g_j = w_j * dL/dw_j.

The network is scored in inference mode (batch-norm statistics are not updated, dropout is off),
as snip-public. With several batches the gradients are summed before the absolute value (|sum g|,
as spp-public and effect-dps-public do over the whole training set).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from ..errors import SparsetrainError
from . import METHODS


def _forward_loss(model, loss_fn, x, y) -> torch.Tensor:
    try:
        out = model(x)
        loss = loss_fn(out, y)
    except RuntimeError as err:
        raise SparsetrainError(
            f"a batch of inputs {tuple(x.shape)} and targets {tuple(y.shape)} does not fit "
            f"{type(model).__name__}: {err}. Check that the data set matches the model "
            "(input shape and number of classes)."
        ) from err
    if not torch.isfinite(loss):
        raise SparsetrainError(
            f"the loss at initialization is {loss.item()}: the scores would be meaningless. "
            "Check the inputs for NaN/inf and the initialization scale."
        )
    return loss


def summed_gradients(model: nn.Module, params: dict[str, nn.Parameter], batches, loss_fn) -> list[torch.Tensor]:
    """sum over batches of dL/dw for each parameter, with the model in inference mode."""
    if batches is None:
        raise SparsetrainError("SNIP needs data: pass batches=(inputs, targets) or a loader")
    tensors = list(params.values())
    total: list[torch.Tensor] | None = None
    was_training = model.training
    # cuDNN cannot run an RNN backward pass in inference mode; the native kernels can.
    no_cudnn = any(isinstance(m, nn.RNNBase) for m in model.modules())
    model.eval()
    try:
        with torch.backends.cudnn.flags(enabled=False) if no_cudnn else contextlib.nullcontext():
            for x, y in batches:
                loss = _forward_loss(model, loss_fn, x, y)
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]
                total = grads if total is None else [a.add_(g) for a, g in zip(total, grads)]
    finally:
        model.train(was_training)
    if total is None:
        raise SparsetrainError("SNIP got an empty set of batches: pass at least one (inputs, targets) batch")
    return total


def connection_sensitivity(model: nn.Module, params: dict[str, nn.Parameter], batches, loss_fn) -> dict[str, torch.Tensor]:
    """Normalised connection sensitivities s_j (they sum to 1 over ``params``)."""
    grads = summed_gradients(model, params, batches, loss_fn)
    with torch.no_grad():
        raw = [g.mul_(p).abs_() for g, p in zip(grads, params.values())]  # |dL/dc| at c = 1, in place
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
    return {n: r.div_(norm) for n, r in zip(params, raw)}


@METHODS.register("snip")
def snip_scores(model, params, batches, loss_fn, generator):
    return connection_sensitivity(model, params, batches, loss_fn)
