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


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Every module in inference mode for the block, then each module's own flag back (unlike
    ``model.train(flag)``, which would give every submodule the root's flag). The flags are
    written directly: ``nn.Module.__setattr__`` costs ~5 us a call, and eval()/train() over
    LeNet-300-100's 7 modules took ~0.1 ms, 5% of pruning it."""
    modules = list(model.modules())
    flags = [m.training for m in modules]
    for m in modules:
        object.__setattr__(m, "training", False)
    try:
        yield modules
    finally:
        for m, flag in zip(modules, flags):
            object.__setattr__(m, "training", flag)


def summed_gradients(model: nn.Module, params: dict[str, nn.Parameter], batches, loss_fn) -> list[torch.Tensor]:
    """sum over batches of dL/dw for each parameter, with the model in inference mode."""
    if batches is None:
        raise SparsetrainError("SNIP needs data: pass batches=(inputs, targets) or a loader")
    tensors = list(params.values())
    total: list[torch.Tensor] | None = None
    with _eval_mode(model) as modules:
        # cuDNN cannot run an RNN backward pass in inference mode; the native kernels can.
        no_cudnn = any(isinstance(m, nn.RNNBase) for m in modules)
        with torch.backends.cudnn.flags(enabled=False) if no_cudnn else contextlib.nullcontext():
            for x, y in batches:
                loss = _forward_loss(model, loss_fn, x, y)
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]
                total = grads if total is None else [a.add_(g) for a, g in zip(total, grads)]
    if total is None:
        raise SparsetrainError("SNIP got an empty set of batches: pass at least one (inputs, targets) batch")
    return total


def _sensitivity_and_sum(model, params, batches, loss_fn) -> tuple[dict[str, torch.Tensor], float]:
    """|dL/dc_j| at c = 1 for every connection (unnormalised) and their sum, checked."""
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
    return dict(zip(params, raw)), norm


def connection_sensitivity(model: nn.Module, params: dict[str, nn.Parameter], batches, loss_fn) -> dict[str, torch.Tensor]:
    """Normalised connection sensitivities s_j (they sum to 1 over ``params``)."""
    raw, norm = _sensitivity_and_sum(model, params, batches, loss_fn)
    return {n: r.div_(norm) for n, r in raw.items()}


@METHODS.register("snip")
def snip_scores(model, params, batches, loss_fn, generator):
    """|dL/dc_j| unnormalised: dividing by the sum does not change which connections are the
    top kappa, so the selection skips that pass (:func:`connection_sensitivity` gives s_j)."""
    return _sensitivity_and_sum(model, params, batches, loss_fn)[0]
