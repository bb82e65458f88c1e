"""The sanity checks of Frankle et al. (2021, "Pruning neural networks at initialization: why are
we missing the mark?") for any mask: does a method's mask beat a random one with the same layer
budgets, and does it need the weights it was scored with?

- :func:`shuffle_layerwise`: permute the mask within each tensor. Every tensor keeps exactly its
  kept count (the method's layer budgets), at random positions; what survives is the method's
  per-layer sparsity alone. In a run: ``prune.shuffle = true`` (``--shuffle-mask``).
- :func:`reinitialize`: keep the mask, draw fresh weights. In a run: ``prune.reinit = <scheme>``
  (e.g. the run's own ``init``), which trains a new draw (seed + 1) under the mask instead of the
  scored weights.

The experiment "does the method's mask beat a random one with the same layer budgets?" is then
three runs that differ in one setting each: the method as it is, the same with
``prune.shuffle = true``, and the same with ``prune.reinit`` set.

    >>> import torch
    >>> mask = {"w": torch.tensor([[True, True, False, False]]), "b": torch.tensor([True, False])}
    >>> shuffled = shuffle_layerwise(mask, seed=0)
    >>> {n: int(m.sum()) for n, m in shuffled.items()}  # per-tensor counts kept exactly
    {'w': 2, 'b': 1}
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from ..errors import SparsetrainError
from ..init import initialize_
from ..masks import Mask, apply_mask_


def shuffle_layerwise(mask: Mapping[str, torch.Tensor], seed: int) -> Mask:
    """A :class:`~sparsetrain.masks.Mask` with each tensor of ``mask`` permuted uniformly at
    random: the same shape and kept count per tensor, new positions. One generator seeded with
    ``seed`` draws the permutations in the mask's tensor order, so the result depends on
    ``seed`` and the mask alone (not on the global torch seed). ``left_out`` and ``notes`` carry
    over; ``metadata`` does not (it describes the mask it came from)."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise SparsetrainError(f"the shuffle seed must be a whole number; got {seed!r}")
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in mask.items():
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise SparsetrainError(
                f"shuffle_layerwise needs a boolean mask tensor for {name!r}; got "
                f"{getattr(m, 'dtype', type(m).__name__)} (threshold scores first, or prune with prune_at_init)"
            )
        flat = m.reshape(-1)
        perm = torch.randperm(flat.numel(), generator=generator).to(flat.device)
        out[name] = flat[perm].view(m.shape).clone()
    return Mask(out, left_out=getattr(mask, "left_out", None), notes=getattr(mask, "notes", None))


def reinitialize(model: nn.Module, scheme: str, seed: int,
                 mask: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Draw every parameter of ``model`` afresh with the init ``scheme`` from ``seed`` and, with
    a ``mask``, zero the pruned entries: the mask kept, the scored weights gone (what
    ``prune.reinit`` does in a run, with the run's seed + 1)."""
    initialize_(model, scheme, seed)
    if mask is not None:
        apply_mask_(model, mask)
    return model
