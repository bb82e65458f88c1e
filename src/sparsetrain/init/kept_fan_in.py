"""A sparse-aware initialisation: each unit's kept incoming weights rescaled by
sqrt(fan_in / kept fan_in), so that the unit's pre-activation variance is the one the dense
initialisation was scaled for (Evci et al. 2022, "Gradient flow in sparse neural networks and how
lottery tickets win", call it sparse-aware init; Lee et al. 2020 motivate it by signal propagation).

A variance-scaling init draws a unit's weights with variance scale / fan_in. After pruning, the unit
sums only its kept inputs, and the variance of its pre-activation falls by kept / fan_in: at 98%
sparsity a LeNet-300-100 unit keeps about 16 of its 784 inputs, and the signal shrinks layer after
layer. Multiplying the kept weights by sqrt(fan_in / kept) gives them variance scale / kept, which
is the variance-scaling law on the network as pruned. The rescale follows whatever law drew the
weights (for fan_avg it restores the fan_in part of the average); units with nothing kept stay zero.

Units are a weight's first dimension (a Linear's outputs, a conv's output channels, a recurrent
layer's gate rows), its fan-in the rest of the tensor; 1-D tensors (biases, norms) and embedding
tables (whose rows are tokens, not units) are left as they are.

    >>> import torch
    >>> layer = torch.nn.Linear(4, 2, bias=False)
    >>> with torch.no_grad():
    ...     _ = layer.weight.fill_(1.0)
    >>> mask = {"weight": torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])}
    >>> summary = rescale_kept_fan_in_(layer, mask)
    >>> layer.weight * mask["weight"]
    tensor([[2., 0., 0., 0.],
            [1., 1., 1., 1.]], grad_fn=<MulBackward0>)
    >>> summary["tensors"], summary["max_gain"]
    (1, 2.0)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn


def rescale_kept_fan_in_(model: nn.Module, mask: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Scale each unit's kept incoming weights of every masked weight of ``model`` by
    sqrt(fan_in / kept fan_in), in place; returns a summary (tensors rescaled, the mean and largest
    gain over units with something kept)."""
    params = dict(model.named_parameters())
    embeddings = {f"{name}.weight" if name else "weight" for name, m in model.named_modules()
                  if isinstance(m, nn.Embedding)}
    gains: list[torch.Tensor] = []
    tensors = 0
    with torch.no_grad():
        for name, keep in mask.items():
            weight = params.get(name)
            if weight is None or weight.dim() < 2 or name in embeddings:
                continue
            keep = keep.to(weight.device, dtype=weight.dtype)
            fan_in = math.prod(weight.shape[1:])
            kept = keep.reshape(weight.shape[0], -1).sum(dim=1)
            gain = torch.where(kept > 0, torch.sqrt(fan_in / kept.clamp(min=1)), torch.ones_like(kept))
            weight.mul_(gain.reshape(-1, *([1] * (weight.dim() - 1))))
            gains.append(gain[kept > 0])
            tensors += 1
    every = torch.cat(gains) if gains else torch.ones(1)
    return {"tensors": tensors, "mean_gain": float(every.mean()), "max_gain": float(every.max())}
