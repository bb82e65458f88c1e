"""Rounds: prune in R steps to the final sparsity, each scored under the mask of the last.

``schedule="exponential"`` keeps density_k = density^(k/R) after round k = 1..R (iterative SNIP,
SynFlow), ``"linear"`` sparsity_k = sparsity * k/R; an explicit list gives the R sparsities
(non-decreasing, the last one the final sparsity).

    >>> round_sparsities(0.99, 2)
    [0.9, 0.99]
    >>> round_sparsities(0.9, 3, "linear")
    [0.3, 0.6, 0.9]
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from ..errors import SparsetrainError

SCHEDULES = ("exponential", "linear")


def round_sparsities(sparsity: float, rounds: int = 1, schedule: str | Sequence[float] = "exponential") -> list[float]:
    """The sparsity to select at after each of ``rounds`` rounds (the last is ``sparsity``)."""
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise SparsetrainError(f"rounds must be an integer >= 1; got {rounds!r}")
    if not isinstance(schedule, str):
        steps = [float(s) for s in schedule]
        if len(steps) != rounds or any(b < a for a, b in zip(steps, steps[1:])) or abs(steps[-1] - sparsity) > 1e-9:
            raise SparsetrainError(
                f"an explicit schedule lists one sparsity per round ({rounds}), non-decreasing, ending "
                f"at the final sparsity {sparsity}; got {list(schedule)}"
            )
        if any(not 0.0 <= s < 1.0 for s in steps):
            raise SparsetrainError(f"every sparsity of the schedule must be in [0, 1); got {steps}")
        return steps[:-1] + [sparsity]
    if schedule == "exponential":
        steps = [1.0 - (1.0 - sparsity) ** (k / rounds) for k in range(1, rounds + 1)]
    elif schedule == "linear":
        steps = [sparsity * k / rounds for k in range(1, rounds + 1)]
    else:
        raise SparsetrainError(
            f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)} or give a list of sparsities"
        )
    return [round(s, 12) for s in steps[:-1]] + [sparsity]


@contextlib.contextmanager
def masked_weights(params: dict[str, nn.Parameter], mask: dict[str, torch.Tensor]) -> Iterator[None]:
    """The pruned entries of ``params`` zero inside the block, their values restored after it
    (exceptions included), so that a round scores the network its mask describes."""
    saved = {}
    with torch.no_grad():
        for name, keep in mask.items():
            if not bool(keep.all()):
                p = params[name]
                saved[name] = p.detach().clone()
                p.mul_(keep.to(p.device))
    try:
        yield
    finally:
        with torch.no_grad():
            for name, values in saved.items():
                params[name].copy_(values)


def never_revive(scores: dict[str, torch.Tensor], mask: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scores with the entries already pruned at -inf, so that no selection keeps them while any
    kept entry remains (kappa never grows from round to round)."""
    out = {}
    for name, s in scores.items():
        keep = mask[name].to(s.device)
        if not s.is_floating_point():
            s = s.double()
        out[name] = s if bool(keep.all()) else s.masked_fill(~keep, -math.inf)
    return out
