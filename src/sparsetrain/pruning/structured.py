"""Structured selection: masks sparse hardware can use, from the same scores as unstructured ones.

Methods only score (SNIP, random, magnitude, ...); this module turns the scores into a mask whose
zeros follow a pattern, just as :mod:`.select` does for unstructured masks. Every weight with two
or more dimensions is seen as a 2-D view whose rows are its outputs and whose row entries are its
inputs: for a weight whose input axis is dim 1 (Linear (out, in), Conv (out, in, kh, kw)) the view
``(shape[0], rest)``, (out, in*kh*kw) for a Conv, the row layout cuSPARSELt and
``torch.sparse.to_sparse_semi_structured`` work on; for a weight stored (in, out, ...) (input axis
dim 0, see :mod:`.axes`) the same view of the weight with its first two axes swapped.

``"N:M"`` (``"2:4"``: NVIDIA semi-structured sparsity): in each row, every group of M consecutive
entries keeps its N highest scores; ties go to the first entries of the group. The sparsity is
1 - N/M by construction, so ``sparsity`` must be that value or ``None``. A tensor whose rows are
not a multiple of M long cannot hold the pattern (NVIDIA requires it): it is left dense, with a
:class:`StructureWarning` naming it.

``"blockRxC"`` (``"block32x32"``): the 2-D view is cut into R x C tiles from its top-left corner;
a tile's score is the sum of its entries' scores; exactly kappa = round(b * (1 - sparsity)) of
all b tiles are kept whole (``scope="layerwise"``: round(b_l * (1 - sparsity)) per tensor), ties
going to the first tiles (parameter order, then row-major). Tiles on the right and bottom edges
are smaller when the sizes do not divide; they are kept or dropped whole like the others and
count as one tile each, so the kept fraction of *entries* can differ slightly from 1 - sparsity.

Parameters with fewer than two dimensions (biases with ``include_biases``) have no rows to
structure and are left dense under both kinds of structure.

    >>> import torch
    >>> scores = {"w": torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 0.0, 5.0, 5.0]])}
    >>> select_structured(scores, parse_structure("2:4"))["w"].int().tolist()
    [[1, 0, 1, 0, 0, 0, 1, 1]]
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import SparsetrainError
from .select import SCOPES, check_sparsity, kept_count, top_k

FORMS = '"N:M" with 0 < N < M (e.g. "2:4"), "blockRxC" with R, C >= 1 (e.g. "block32x32"), or "" for none'


class StructureWarning(UserWarning):
    """A tensor could not take the requested structure and was left dense."""


@dataclass(frozen=True)
class NM:
    """Keep ``n`` of every ``m`` consecutive entries of each row."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


@dataclass(frozen=True)
class Blocks:
    """Keep or drop ``rows`` x ``cols`` tiles of the 2-D view whole."""

    rows: int
    cols: int

    def __str__(self) -> str:
        return f"block{self.rows}x{self.cols}"


Structure = NM | Blocks


def parse_structure(text: str | Structure | None) -> Structure | None:
    """``"2:4"`` -> ``NM(2, 4)``, ``"block32x32"`` -> ``Blocks(32, 32)``, ``""``/``None`` -> None
    (unstructured). Anything else raises :class:`SparsetrainError` listing the valid forms."""
    if text is None or isinstance(text, (NM, Blocks)):
        return text
    if not isinstance(text, str):
        raise SparsetrainError(f"structure must be a string ({FORMS}); got {text!r}")
    s = text.strip().lower()
    if not s:
        return None
    if nm := re.fullmatch(r"(\d+)\s*:\s*(\d+)", s):
        n, m = int(nm[1]), int(nm[2])
        if not 0 < n < m:
            raise SparsetrainError(
                f"structure {text!r}: N:M keeps N of every M connections, so it needs 0 < N < M "
                f"(e.g. 2:4); got N={n}, M={m}"
            )
        return NM(n, m)
    if b := re.fullmatch(r"block(\d+)x(\d+)", s):
        rows, cols = int(b[1]), int(b[2])
        if rows < 1 or cols < 1:
            raise SparsetrainError(f"structure {text!r}: block sizes must be at least 1x1 (e.g. block32x32)")
        return Blocks(rows, cols)
    raise SparsetrainError(f"unknown structure {text!r}; valid forms: {FORMS}")


def structured_sparsity(structure: Structure | None, sparsity: float | None) -> float:
    """The sparsity to select with. For N:M it is 1 - N/M; a ``sparsity`` that disagrees is an
    error rather than being silently ignored."""
    if isinstance(structure, NM):
        if sparsity is not None and (
            not isinstance(sparsity, (int, float)) or abs(float(sparsity) - structure.sparsity) > 1e-6
        ):
            raise SparsetrainError(
                f"structure {structure} keeps {structure.n} of every {structure.m} connections, a "
                f"sparsity of {structure.sparsity:.6g}; got sparsity={sparsity!r}. Pass "
                f"sparsity={structure.sparsity:.6g} (or None), or choose another N:M."
            )
        return structure.sparsity
    return check_sparsity(sparsity)


def select_structured(
    scores: dict[str, torch.Tensor],
    structure: Structure | str,
    sparsity: float | None = None,
    scope: str = "global",
    input_dims: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Mask with ``structure`` keeping the highest scores (see the module docstring).
    ``input_dims``: ``{name: 0 or 1}``, the input axis of each weight (default 1)."""
    dims = input_dims or {}
    bad = {n: d for n, d in dims.items() if d not in (0, 1)}
    if bad:
        raise SparsetrainError(f"input axes must be 0 or 1; got {bad}")
    views = {n: _rows_view(s, dims.get(n, 1)) for n, s in scores.items()}
    mask = _select_rows(views, structure, sparsity, scope)
    return {n: _rows_view(m, dims.get(n, 1)).contiguous() for n, m in mask.items()}


def _rows_view(t: torch.Tensor, input_dim: int) -> torch.Tensor:
    """The tensor with its input axis at dim 1 (its own inverse)."""
    return t.transpose(0, 1) if input_dim == 0 and t.dim() >= 2 else t


def _select_rows(scores, structure, sparsity, scope) -> dict[str, torch.Tensor]:
    structure = parse_structure(structure)
    if structure is None:
        raise SparsetrainError(f"select_structured needs a structure ({FORMS}); use select_top for none")
    sparsity = structured_sparsity(structure, sparsity)
    if scope not in SCOPES:
        raise SparsetrainError(f"unknown selection scope {scope!r}; choose one of {', '.join(SCOPES)}")
    if scope == "erk":
        raise SparsetrainError(f"scope 'erk' budgets single entries; with structure {structure} choose scope "
                               "'global' or 'layerwise'")
    mask = {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}  # dense by default
    matrices = {n: s for n, s in scores.items() if s.dim() >= 2}
    if isinstance(structure, NM):
        fits = {n: s for n, s in matrices.items() if s[0].numel() % structure.m == 0}
        _require_some(fits, structure, scores)
        for n, s in matrices.items():
            if n not in fits:
                warnings.warn(
                    f"{n} {tuple(s.shape)} is left dense: its rows (one per output) have {s[0].numel()} input entries, not a "
                    f"multiple of {structure.m}, so it cannot hold {structure} sparsity",
                    StructureWarning,
                    stacklevel=4,
                )
        mask.update({n: nm_mask(s, structure.n, structure.m) for n, s in fits.items()})
    else:
        _require_some(matrices, structure, scores)
        mask.update(_block_masks(matrices, structure, sparsity, scope))
    return mask


def _require_some(structurable: dict, structure: Structure, scores: dict) -> None:
    if not structurable:
        raise SparsetrainError(
            f"none of the pruned parameters ({', '.join(scores) or 'none'}) can take {structure} "
            "structure (it needs weights with 2+ dimensions"
            + (f" whose rows are a multiple of {structure.m} long" if isinstance(structure, NM) else "")
            + "); prune without a structure, or choose other parameters"
        )


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive scores along each row of the 2-D view
    (the row length must be a multiple of ``m``); among equal scores the first in the group wins."""
    groups = scores.reshape(-1, m)  # (rows * row_length / m, m)
    # A stable sort keeps equal scores in their original order, so the first ones come first.
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]  # (groups, n)
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    return keep.scatter_(1, order, True).view(scores.shape)


def block_scores(scores: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Sum of the scores in each ``rows`` x ``cols`` tile of the 2-D view; edge tiles may be
    smaller. (R, C) -> (ceil(R / rows), ceil(C / cols))."""
    flat = scores.reshape(scores.shape[0], -1)  # (R, C)
    r, c = flat.shape
    padded = F.pad(flat, (0, -c % cols, 0, -r % rows))  # zeros add nothing to a sum
    return padded.view(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols).sum((1, 3))


def expand_blocks(keep: torch.Tensor, rows: int, cols: int, shape: torch.Size) -> torch.Tensor:
    """A (tile rows, tile cols) mask back to an element mask of ``shape``."""
    br, bc = keep.shape
    full = keep[:, None, :, None].expand(br, rows, bc, cols).reshape(br * rows, bc * cols)
    return full[: shape[0], : shape.numel() // shape[0]].reshape(shape)


def _block_masks(matrices: dict[str, torch.Tensor], blocks: Blocks, sparsity: float, scope: str):
    tiles = [block_scores(s, blocks.rows, blocks.cols) for s in matrices.values()]
    if scope == "layerwise":
        kept = [top_k([t], kept_count(t.numel(), sparsity))[0] for t in tiles]
    else:
        kept = top_k(tiles, kept_count(sum(t.numel() for t in tiles), sparsity))
    return {
        n: expand_blocks(k, blocks.rows, blocks.cols, s.shape)
        for (n, s), k in zip(matrices.items(), kept)
    }
