"""Masks: one boolean tensor per prunable parameter, keyed by the parameter's name.

A mask is plain state (``dict[str, torch.Tensor]``), not code: pruning produces one, training
keeps the masked weights at zero through an after-backward hook, and it saves to and loads from a
safetensors file.

    >>> import torch
    >>> from sparsetrain.masks import apply_mask_, mask_summary
    >>> model = torch.nn.Linear(4, 2)
    >>> mask = {"weight": torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)}
    >>> _ = apply_mask_(model, mask)
    >>> int((model.weight == 0).sum())
    5
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .errors import SparsetrainError

Mask = dict[str, torch.Tensor]

# Layers whose weights (and optionally biases) are prunable by default: the connections of the
# network. Normalisation layers are never pruned (as snip-public).
PRUNABLE_LAYERS = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.RNNBase,
    nn.Embedding,
    nn.MultiheadAttention,
)


def prunable_parameters(model: nn.Module, include_biases: bool = False) -> dict[str, nn.Parameter]:
    """The parameters a mask may cover: weights of Linear, Conv*, RNN/LSTM/GRU, Embedding and
    MultiheadAttention layers (``weight``, ``weight_ih_l0``, ``in_proj_weight``, ...), plus their
    biases when ``include_biases``. Raises if the model has none."""
    found: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_LAYERS):
            continue
        for leaf, param in module.named_parameters(recurse=False):
            is_weight = "weight" in leaf
            if param.requires_grad and (is_weight or (include_biases and "bias" in leaf)):
                found[f"{module_name}.{leaf}" if module_name else leaf] = param
    if not found:
        raise SparsetrainError(
            f"{type(model).__name__} has no prunable parameters: sparsetrain prunes the weights of "
            f"{', '.join(t.__name__ for t in PRUNABLE_LAYERS)} layers. Pass the parameter names to "
            "prune explicitly with params=[...]."
        )
    return found


def check_mask(mask: Mask, model: nn.Module) -> None:
    """Raise a clear error unless ``mask`` fits ``model``: known names, equal shapes, bool dtype."""
    params = dict(model.named_parameters())
    problems = []
    for name, m in mask.items():
        if name not in params:
            problems.append(f"{name!r} is not a parameter of the model")
        elif tuple(m.shape) != tuple(params[name].shape):
            problems.append(f"{name!r} has shape {tuple(m.shape)}, the parameter {tuple(params[name].shape)}")
        elif m.dtype != torch.bool:
            problems.append(f"{name!r} has dtype {m.dtype}, expected torch.bool")
    if problems:
        raise SparsetrainError(
            "the mask does not fit the model: " + "; ".join(problems[:5])
            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
            + ". Prune this model again, or load the model the mask was made for."
        )


def apply_mask_(model: nn.Module, mask: Mask) -> nn.Module:
    """Zero the pruned entries of ``model``'s parameters in place."""
    check_mask(mask, model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, m in mask.items():
            params[name].mul_(m.to(params[name].device))
    return model


class GradientMask:
    """Keeps pruned weights exactly zero during training by zeroing their gradients.

    With a pruned weight at 0 and its gradient at 0, SGD (momentum, Nesterov, weight decay), Adam
    and AdamW all leave it at 0 and their state for it at 0, so one multiply per parameter after
    each backward pass is all masked training costs. ``after_step`` re-applies the mask for
    optimizers that move zero-gradient weights (set ``reapply=True``)."""

    def __init__(self, model: nn.Module, mask: Mask, reapply: bool = False):
        check_mask(mask, model)
        params = dict(model.named_parameters())
        self.params = [params[n] for n in mask]
        self.masks = [mask[n].to(device=params[n].device, dtype=params[n].dtype) for n in mask]
        self.reapply = reapply

    def after_backward(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if len(grads) == len(self.params):
            torch._foreach_mul_(grads, self.masks)
        else:
            for p, m in zip(self.params, self.masks):
                if p.grad is not None:
                    p.grad.mul_(m)

    @torch.no_grad()
    def after_step(self) -> None:
        if self.reapply:
            torch._foreach_mul_(self.params, self.masks)


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    shape: tuple[int, ...]
    kept: int
    total: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.total


def mask_summary(mask: Mask) -> list[LayerSparsity]:
    return [LayerSparsity(n, tuple(m.shape), int(m.sum()), m.numel()) for n, m in mask.items()]


def overall_sparsity(mask: Mask) -> float:
    total = sum(m.numel() for m in mask.values())
    return 1.0 - sum(int(m.sum()) for m in mask.values()) / total


def format_sparsity_table(mask: Mask) -> str:
    rows = mask_summary(mask)
    width = max([len(r.name) for r in rows] + [5])
    lines = [f"{'layer':<{width}}  {'shape':<18} {'kept':>9} {'total':>9} {'sparsity':>9}"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {str(r.shape):<18} {r.kept:>9} {r.total:>9} {r.sparsity:>9.2%}")
    kept, total = sum(r.kept for r in rows), sum(r.total for r in rows)
    lines.append(f"{'all':<{width}}  {'':<18} {kept:>9} {total:>9} {1 - kept / total:>9.2%}")
    return "\n".join(lines)


def save_mask(path: str | Path, mask: Mask, metadata: dict[str, str] | None = None) -> None:
    from .state_io import save_tensors

    # safetensors sorts names; the parameter order (which breaks ties) travels in the metadata
    meta = dict(metadata or {}) | {"sparsetrain.mask_order": json.dumps(list(mask))}
    save_tensors(path, {n: m.to(torch.bool).cpu().contiguous() for n, m in mask.items()}, meta)


def load_mask(path: str | Path, model: nn.Module | None = None) -> Mask:
    """Load a mask file; with ``model``, check that it fits (clear error otherwise)."""
    from .state_io import load_tensors

    tensors, metadata = load_tensors(path)
    order = json.loads(metadata.get("sparsetrain.mask_order", "[]"))
    names = order if sorted(order) == sorted(tensors) else list(tensors)
    mask = {n: tensors[n].to(torch.bool) for n in names}
    if model is not None:
        check_mask(mask, model)
    return mask
