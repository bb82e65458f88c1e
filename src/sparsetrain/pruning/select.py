"""Selection: from scores to a mask, with exact counts and deterministic ties.

Every pruning method only computes scores; this module alone decides which connections stay.
The ``scope`` (the layer budget) says where the kappa = round(m * (1 - sparsity)) kept entries
of the m prunable ones may lie:

- ``global``: the top kappa scores over all tensors (SNIP's choice: layers end up as sparse as
  their scores make them);
- ``layerwise`` (uniform): every tensor at the same sparsity, kappa_l = m_l * (1 - sparsity)
  rounded;
- ``erk`` (Erdos-Renyi-Kernel, Evci et al. 2020, RigL): density_l proportional to
  sum(shape_l) / prod(shape_l) ((n_in + n_out + k_h + k_w) / (n_in n_out k_h k_w) for a conv),
  scaled so that the kept entries total kappa; a tensor whose density would exceed 1 is kept
  dense and the others are scaled again (RigL's loop, :func:`erk_densities`).

Every budget keeps exactly kappa entries in all. The per-tensor budgets of ``layerwise`` and
``erk`` are real numbers; :func:`layer_budgets` rounds them by largest remainder: each tensor gets
its budget rounded down, and the entries left over go one each to the tensors with the largest
fractional parts (the first tensors among equal parts), so every tensor keeps its budget rounded
down or up and the total is kappa. Inside a tensor (or over all, for ``global``) exactly the
budget is kept: among equal scores at the threshold, the ones that come first (in parameter
order, then in row-major order inside a tensor) win.

    >>> import torch
    >>> scores = {"a": torch.tensor([3.0, 1.0, 2.0]), "b": torch.tensor([2.0, 0.0])}
    >>> {n: m.tolist() for n, m in select_top(scores, sparsity=0.6).items()}  # keep 2 of 5
    {'a': [True, False, True], 'b': [False, False]}

The tied 2.0s are resolved by position: ``a``'s comes first.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..errors import SparsetrainError

SCOPES = ("global", "layerwise", "erk")


def check_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise SparsetrainError(
            f"sparsity must be a fraction in [0, 1) (0.95 prunes 95% of the connections); got {sparsity!r}"
        )
    return float(sparsity)


def kept_count(total: int, sparsity: float) -> int:
    """kappa = round(total * (1 - sparsity)), at least one connection."""
    return max(1, round(total * (1.0 - sparsity)))


# Below this many scores (256 KiB of float32) a full copy is too small to matter: copy and partition.
_SAMPLE_MIN = 1 << 16
_SAMPLE_SIZE = 1 << 13


def _kth_largest_numpy(arrays: list, k: int) -> float:
    """The k-th largest value over the 1-D NumPy ``arrays`` (views of the scores), exact.

    A strided sample of about 8k scores brackets the answer: bounds ``lo`` <= ``hi`` at 5 standard
    deviations of the sample quantile on either side. One pass counts the scores above ``hi``,
    another gathers the few in [lo, hi] (the band: about 2% of the scores), and a partition of
    the band finds the value. The counts are checked, so a bracket that missed (or a sample that
    is not small against the whole) falls back to copying and partitioning every score; the
    result is exact either way.

    Why: no score-sized copy is made, so selection adds little to the peak memory of pruning,
    at about the time of one partition of a full copy (measurements: docs/pruning.md)."""
    m = sum(a.size for a in arrays)
    if m >= _SAMPLE_MIN:
        stride = m // _SAMPLE_SIZE
        sample = np.concatenate([a[::stride] for a in arrays])
        n = sample.size
        q = k / m
        margin = 5.0 * math.sqrt(n * q * (1.0 - q)) + 16
        r_lo, r_hi = math.ceil(q * n + margin), math.floor(q * n - margin)  # ranks from the top
        if r_lo < n:
            sample.sort()  # 8k values: faster than partitioning at two ranks
            lo = sample[n - r_lo]
            hi = sample[n - r_hi] if r_hi >= 1 else None
            above = 0 if hi is None else sum(int(np.count_nonzero(a > hi)) for a in arrays)
            inside = (lambda a: a >= lo) if hi is None else (lambda a: (a >= lo) & (a <= hi))
            band = np.concatenate([a[np.flatnonzero(inside(a))] for a in arrays])
            j = k - above  # the answer is the j-th largest in the band
            if 1 <= j <= band.size:
                band.partition(band.size - j)
                return float(band[band.size - j])
    flat = np.concatenate(arrays)  # the fallback: one score-sized copy, partitioned in place
    flat.partition(m - k)
    return float(flat[m - k])


def top_k(tensors: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Boolean masks keeping exactly the ``k`` largest entries over all of ``tensors``; ties go
    to the first entries (tensor order, then row-major). Linear time: one k-th value selection,
    no sort; comparisons run per tensor. On CPU the work runs in NumPy on views of the scores,
    which measured several times faster than ``torch.cat`` and ``torch.ge`` on these 1-D passes
    (docs/pruning.md)."""
    m = sum(t.numel() for t in tensors)
    if k >= m:
        return [torch.ones_like(t, dtype=torch.bool) for t in tensors]
    if all(t.device.type == "cpu" and t.dtype != torch.bfloat16 for t in tensors):
        arrays = [t.detach().reshape(-1).numpy() for t in tensors]
        threshold = _kth_largest_numpy(arrays, k)
        keep_np = [a >= threshold for a in arrays]
        if sum(int(np.count_nonzero(x)) for x in keep_np) == k:  # the usual case: no tie straddles
            return [torch.from_numpy(x).view(t.shape) for x, t in zip(keep_np, tensors)]
        thr = torch.tensor(threshold, dtype=tensors[0].dtype)
    else:
        flat = torch.cat([t.flatten() for t in tensors])  # GPU (or bfloat16): one score-sized copy
        thr = torch.kthvalue(flat, m - k + 1).values
        del flat
        keep = [t >= thr for t in tensors]
        if sum(int(torch.count_nonzero(x)) for x in keep) == k:
            return keep
    room = k - sum(int(torch.count_nonzero(t > thr)) for t in tensors)
    out = []
    for t in tensors:
        ties = (t == thr).flatten()
        take = torch.cumsum(ties, 0) <= room
        room -= min(room, int(torch.count_nonzero(ties)))
        out.append((t > thr) | (ties & take).view_as(t))
    return out


def erk_densities(shapes: Sequence[Sequence[int]], density: float) -> list[float]:
    """ERK's density per tensor for an overall ``density`` (kept / total), as RigL computes it
    (google-research/rigl ``sparse_utils.get_sparsities``, ``erdos_renyi_kernel``): raw_l =
    sum(shape_l) / prod(shape_l); eps solves sum_l eps * raw_l * m_l = density * m over the tensors
    not yet dense; while the largest eps * raw_l exceeds 1, the tensors with that largest raw_l
    become dense (density 1, their entries taken from the budget) and eps is solved again.

        >>> [round(d, 4) for d in erk_densities([(10, 10), (1, 10)], 0.5)]  # raw 0.2 and 1.1
        [0.45, 1.0]

    (eps = 55 / 31 would give the second tensor density 1.95: it is kept dense, and the first
    keeps the other 45 of the 55.)
    """
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / n for s, n in zip(shapes, sizes)]
    dense: set[int] = set()
    while True:
        rest = [i for i in range(len(sizes)) if i not in dense]
        budget = density * sum(sizes) - sum(sizes[i] for i in dense)
        divisor = sum(raw[i] * sizes[i] for i in rest)
        if not rest or divisor <= 0:
            break
        eps = budget / divisor
        top = max(raw[i] for i in rest)
        if eps * top <= 1.0:
            break
        dense |= {i for i in rest if raw[i] == top}
    return [1.0 if i in dense else min(1.0, max(0.0, eps * raw[i])) for i in range(len(sizes))]


def apportion(targets: Sequence[float], caps: Sequence[int], total: int) -> list[int]:
    """Whole counts, each at most its cap, summing to ``total``, from real ``targets``: largest
    remainder (every count is its target rounded down or up; the leftover goes to the largest
    fractional parts, the first among equals).

        >>> apportion([1.5, 1.5, 1.0], [3, 3, 3], 4)
        [2, 1, 1]
    """
    if not 0 <= total <= sum(caps):
        raise SparsetrainError(f"cannot keep {total} entries in tensors holding {sum(caps)}")
    counts = [min(cap, max(0, math.floor(t))) for t, cap in zip(targets, caps)]
    left = total - sum(counts)
    # Leftover first by largest fractional part, then anywhere with room (in order).
    order = sorted(range(len(counts)), key=lambda i: (-(targets[i] - math.floor(targets[i])), i))
    order += list(range(len(counts)))
    for i in order:
        if left == 0:
            break
        if left > 0 and counts[i] < caps[i]:
            counts[i] += 1
            left -= 1
    if left < 0:  # targets summed above total (cannot happen for the budgets here, kept for safety)
        for i in sorted(range(len(counts)), key=lambda i: (targets[i] - math.floor(targets[i]), -i)):
            if left == 0:
                break
            if counts[i] > 0:
                counts[i] -= 1
                left += 1
    return counts


def layer_budgets(shapes: Sequence[Sequence[int]], sparsity: float, scope: str) -> list[int] | None:
    """The kept count of each tensor under ``scope`` (None for ``global``, which has no per-tensor
    budget); they sum to kappa = :func:`kept_count` of all entries.

        >>> layer_budgets([(3,), (3,), (2,)], 0.5, "layerwise")  # kappa 4 of 8: 1.5, 1.5, 1.0
        [2, 1, 1]
    """
    sparsity = check_sparsity(sparsity)
    if scope not in SCOPES:
        raise SparsetrainError(f"unknown selection scope {scope!r}; choose one of {', '.join(SCOPES)}")
    if scope == "global":
        return None
    sizes = [math.prod(s) for s in shapes]
    kappa = kept_count(sum(sizes), sparsity)
    if scope == "layerwise":
        densities = [1.0 - sparsity] * len(sizes)
    else:
        densities = erk_densities(shapes, 1.0 - sparsity)
    return apportion([d * n for d, n in zip(densities, sizes)], sizes, kappa)


def select_top(scores: dict[str, torch.Tensor], sparsity: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """Mask keeping the highest scores (see the module docstring)."""
    sparsity = check_sparsity(sparsity)
    budgets = layer_budgets([tuple(s.shape) for s in scores.values()], sparsity, scope)
    if budgets is not None:
        return {n: top_k([s], k)[0] if k else torch.zeros_like(s, dtype=torch.bool)
                for (n, s), k in zip(scores.items(), budgets)}
    total = sum(s.numel() for s in scores.values())
    return dict(zip(scores, top_k(list(scores.values()), kept_count(total, sparsity))))
