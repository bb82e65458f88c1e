"""SynFlow: iterative synaptic flow pruning, without data (Tanaka et al., NeurIPS 2020).

Every parameter and floating buffer of the network is replaced by its absolute value, the input
is a single example of ones, and R is the sum of the outputs. For a network that is linear or
ReLU between its weight layers, R = 1^T |W_L| ... |W_1| 1 is the total flow along every
input-output path, and the score of a weight is its share of that flow:

    s = |theta| ⊙ dR/d|theta|     (>= 0; higher = keep)

The network runs in inference mode, as in ganguli-lab/Synaptic-Flow: batch-norm uses its
running statistics (made absolute too: at initialisation a mean of 0 and a variance of 1, so the
layer is |gamma| x + |beta| up to its epsilon), and dropout is off. The method never reads a
batch: ``batches`` may be None or anything.

Precision: R is a sum over all paths of products of weights, which grows geometrically with
depth and overflows float32 on deep networks (a deep MLP, a wide residual network). The pass
runs in float64 (its exponent reaches 1e308) on a float64 copy of the parameters; scores that are
still not finite raise an error.

Iteration: the original prunes in 100 rounds along the exponential schedule (each round scores
the network the last one pruned, so that no layer is cut off); those are the defaults,
``options={"rounds": 100, "schedule": "exponential"}``, run inside the method (:mod:`.iterate`).

The input shape comes from ``options={"input_shape": [...]}`` or, when that is empty, from the
first layer: a ``Linear`` takes ``(in_features,)``, a convolution is tried with the spatial sizes
of the registered data sets (28, 32, 64, 224) and the first that runs is taken.

Not defined for recurrent networks (LSTM/GRU/RNN: gates multiply sigmoids and tanhs of the
weights, so the |theta| network is no longer a sum of path products), for attention (softmax)
and for token inputs (``Embedding``: there is no "input of ones"): those models are refused.

    >>> from sparsetrain import create_model, prune_at_init
    >>> model = create_model("lenet-300-100")
    >>> mask = prune_at_init(model, "synflow", sparsity=0.9, options={"rounds": 10})
    >>> sum(int(m.sum()) for m in mask.values())  # round(266200 * 0.1), and no batch read
    26620
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from torch.func import functional_call

from ..batches import logits_of
from ..errors import SparsetrainError
from .iterate import run_rounds
from .registry import ScoreContext, register_method
from .snip import _eval_mode

#: Modules for which SynFlow's path-flow argument does not hold, and why.
UNDEFINED = (
    (nn.RNNBase, "recurrent gates multiply sigmoids and tanhs of the weights"),
    (nn.MultiheadAttention, "attention's softmax is not a sum of path products"),
    (nn.Embedding, "its input is token ids, for which an input of ones means nothing"),
)
#: Spatial sizes tried for a convolutional first layer when no input_shape is given.
PROBE_SIZES = (28, 32, 64, 224)


@dataclass(frozen=True)
class SynFlowOptions:
    """``rounds`` and ``schedule``: the original's 100 exponential rounds; ``input_shape``: one
    example's shape, e.g. ``[3, 32, 32]`` (empty: found from the first layer)."""

    rounds: int = 100
    schedule: Literal["exponential", "linear"] = "exponential"
    input_shape: tuple[int, ...] = ()


def check_defined(model: nn.Module) -> None:
    for module in model.modules():
        for kind, why in UNDEFINED:
            if isinstance(module, kind):
                raise SparsetrainError(
                    f"SynFlow is not defined for {type(model).__name__}: it contains a "
                    f"{type(module).__name__}, and {why}. SynFlow needs layers that are linear "
                    "(or ReLU) between weights; prune this model with snip, grasp, force or iter-snip"
                )


def _first_layer(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))), None)


def input_shape_of(model: nn.Module, given: tuple[int, ...]) -> tuple[int, ...]:
    """One example's shape: ``given``, else found from the first layer (module docstring)."""
    if given:
        if any(d < 1 for d in given):
            raise SparsetrainError(f"SynFlow's input_shape must list positive sizes, e.g. [3, 32, 32]; got {list(given)}")
        return tuple(given)
    first = _first_layer(model)
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    if isinstance(first, nn.modules.conv._ConvNd):
        dims = len(first.kernel_size)
        for size in PROBE_SIZES:
            shape = (first.in_channels,) + (size,) * dims
            try:
                with torch.no_grad(), _eval_mode(model):
                    model(torch.zeros((1,) + shape, device=first.weight.device))
                return shape
            except (RuntimeError, ValueError):
                continue
    raise SparsetrainError(
        f"SynFlow could not tell the input shape of {type(model).__name__} (it reads no data): "
        "pass one example's shape, options={'input_shape': [3, 32, 32]} (--option input_shape=3,32,32)"
    )


def flow_scores(model: nn.Module, params: dict[str, nn.Parameter], input_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """|theta| ⊙ dR/d|theta| in float64, R = sum of the outputs of the |theta| network on ones."""
    state = {}
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.is_floating_point():
            state[name] = t.detach().abs().double()
    leaves = {n: state[n].requires_grad_() for n in params}
    device = next(iter(params.values())).device
    ones = torch.ones((1,) + tuple(input_shape), dtype=torch.float64, device=device)  # (1, *input_shape)
    with _eval_mode(model):
        out = logits_of(functional_call(model, state, (ones,)))
    if out is None:
        raise SparsetrainError(f"SynFlow needs {type(model).__name__} to return a tensor (or .logits) for its input")
    grads = torch.autograd.grad(out.sum(), list(leaves.values()), allow_unused=True)
    scores = {}
    for (name, w), g in zip(leaves.items(), grads):
        scores[name] = torch.zeros_like(w) if g is None else (g * w.detach())
    if not all(bool(torch.isfinite(s.sum())) for s in scores.values()):  # scores >= 0: one sum says
        raise SparsetrainError(
            f"SynFlow scores of {type(model).__name__} overflowed even in float64: the network is too deep "
            "or its weights too large for the product of |weights| along its paths"
        )
    return scores


@register_method("synflow", options=SynFlowOptions, data_free=True)
def synflow_scores(ctx: ScoreContext, options: SynFlowOptions) -> dict[str, torch.Tensor]:
    """SynFlow's scores after ``options.rounds`` rounds (see the module docstring)."""
    check_defined(ctx.model)
    shape = input_shape_of(ctx.model, options.input_shape)
    return run_rounds(ctx, "synflow", options.rounds, options.schedule,
                      lambda mask: flow_scores(ctx.model, ctx.params, shape))
