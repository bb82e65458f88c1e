"""Structured sparse layouts: block-sparse rows (BSR) and NVIDIA's 2:4 semi-structured sparsity.

CSR (:mod:`.kernels`) runs any mask but pays an index and an irregular gather per kept weight.
Masks with structure (``prune_at_init(..., structure="block32x32")`` or ``structure="2:4"``) can
use kernels that pay per tile or per group instead:

* **BSR** (:class:`SparseBlockLinear`, :class:`SparseBlockConv2d`): the weight's 2-D view is cut
  into R x C tiles; only the tiles holding a nonzero are stored, as ``values`` (nblocks, R, C) with
  ``crow_indices`` (M/R + 1,) and ``col_indices`` (nblocks,) over tile rows and columns, both
  **int32** (torch accepts 32-bit indices for BSR products on CPU, where MKL runs them, and
  cuSPARSE needs them on CUDA). The product is ``torch.addmm(bias[:, None], W_bsr, x^T)`` with
  ``W_bsr`` a ``torch.sparse_bsr_tensor``: on CPU that is MKL's block-sparse BLAS, on CUDA torch's
  Triton or cuSPARSE block kernels. ``F.linear(x, W_bsr, bias)`` gives the same numbers but
  was 4-5x slower on CPU (1024x1024, 90% block32x32, batch 64, 1 thread: 2.06 ms against
  0.43 ms for the ``addmm`` form, dense 1.30 ms), because it goes through the transposed (BSC)
  weight; ``(W_bsr @ x^T)^T`` plus a separate bias add was within noise of ``addmm``.
* **2:4 semi-structured** (:class:`SparseSemiStructuredLinear`): every group of 4 consecutive
  weights of a row holds at most 2 nonzeros; sparse tensor cores (compute capability 8.0+, float16
  or bfloat16) skip the zeros through ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt or
  CUTLASS). CUDA only: on other devices the module can be built, saved and loaded (its arrays are
  plain tensors), but not run.

Whether a weight qualifies: :func:`detect_block_size` (square tiles of 64, 32, 16 or 8 that cover
the nonzeros with at most 2x as many stored entries) and :func:`semi_structured_problem` (``None``
when it can run as 2:4 here, else why not).

    >>> import torch
    >>> w = torch.zeros(16, 16); w[8:, :8] = 1.0          # one nonzero 8x8 tile
    >>> detect_block_size(w)
    (8, 8)
    >>> W = BlockMatrix.from_dense(w, (8, 8))
    >>> W.nblocks, W.crow_indices.tolist(), W.col_indices.tolist()
    (1, [0, 0, 1], [0])
    >>> x = torch.randn(3, 16)
    >>> bool(torch.allclose(SparseBlockLinear(W)(x), x @ w.t()))
    True
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SparsetrainError
from .unfold import UnfoldedConv, convertible_conv

__all__ = [
    "BLOCK_SIZES",
    "BlockMatrix",
    "SEMI_DTYPES",
    "SparseBlockConv2d",
    "SparseBlockLinear",
    "SparseSemiStructuredLinear",
    "compress_2to4",
    "conv_matrix",
    "decompress_2to4",
    "detect_block_size",
    "is_2to4",
    "semi_structured_problem",
]

BLOCK_SIZES = (64, 32, 16, 8)  # tried largest first: bigger tiles mean fewer, denser kernel steps
MAX_BLOCK_OVERHEAD = 2.0  # stored entries (nonzero tiles x R x C) at most this many times the nonzeros

SEMI_DTYPES = (torch.float16, torch.bfloat16)
# torch's two 2:4 backends want both weight dimensions to be multiples of a minimum: cuSPARSELt
# (16, 16), CUTLASS (32, 64) for float16/bfloat16. Which one runs depends on the build and on
# SparseSemiStructuredTensor._FORCE_CUTLASS, so the stricter pair is required.
SEMI_MIN_ROWS, SEMI_MIN_COLS = 32, 64


def _require_inference(module: nn.Module, x: torch.Tensor) -> None:
    if x.requires_grad and torch.is_grad_enabled():
        raise SparsetrainError(
            f"{type(module).__name__} is for inference and has no gradients; run it under torch.no_grad() "
            "or torch.inference_mode(), and train the dense masked model instead"
        )


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() < 2:
        raise SparsetrainError(f"a weight with 2+ dimensions is needed, got shape {tuple(weight.shape)}")
    return weight.detach().reshape(weight.shape[0], -1)


# ----------------------------------------------------------------------------- BSR


def detect_block_size(weight: torch.Tensor) -> tuple[int, int] | None:
    """The largest square tile (R, R), R in :data:`BLOCK_SIZES`, that divides both dimensions of
    ``weight``'s 2-D view (out, rest) and whose nonzero tiles store at most 2x the nonzero count
    (nonzero tiles x R x R <= 2 nnz); ``None`` if no size qualifies.

    The 2x bound keeps BSR's padding (zeros stored inside kept tiles) from costing more memory
    and work than it saves: an exact block32x32 mask gives (32, 32) (1x), while an unstructured
    90%-sparse mask touches nearly every tile (10x) and gives ``None``. An all-zero weight gives
    the largest dividing size (no tiles at all)."""
    w = _as_matrix(weight)
    M, K = w.shape
    nz = w != 0  # (M, K)
    nnz = int(nz.sum())
    for r in BLOCK_SIZES:
        if M % r or K % r:
            continue
        tiles = nz.view(M // r, r, K // r, r).any(dim=3).any(dim=1)  # (M/r, K/r): tile has a nonzero
        if int(tiles.sum()) * r * r <= MAX_BLOCK_OVERHEAD * nnz:
            return (r, r)
    return None


def block_problem(weight: torch.Tensor) -> str:
    """Why :func:`detect_block_size` found no block size (for error messages)."""
    M, K = _as_matrix(weight).shape
    sizes = [r for r in BLOCK_SIZES if M % r == 0 and K % r == 0]
    if not sizes:
        return f"its {M}x{K} matrix is not divisible into square tiles of {', '.join(map(str, BLOCK_SIZES))}"
    return (f"its zeros are not blocky: for every tile size {sizes} the tiles holding a nonzero would store "
            f"more than {MAX_BLOCK_OVERHEAD:g}x its nonzeros")


def _bsr_tensor(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sparse BSR tensor support is in beta state"
        return torch.sparse_bsr_tensor(crow, col, values, shape, check_invariants=False)


@dataclass
class BlockMatrix:
    """A block-sparse (M, K) matrix of R x C tiles: ``crow_indices`` (M/R + 1,) int32,
    ``col_indices`` (nblocks,) int32 tile columns (sorted within each tile row), ``values``
    (nblocks, R, C). Stored bytes = 4 (M/R + 1) + 4 nblocks + nblocks R C itemsize."""

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]
    _torch: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        M, K = self.shape
        c, i, v = self.crow_indices, self.col_indices, self.values
        R, C = (v.shape[1], v.shape[2]) if v.dim() == 3 else (0, 0)
        if (
            c.dtype != torch.int32 or i.dtype != torch.int32 or v.dim() != 3 or R < 1 or C < 1
            or M % R or K % C or c.shape != (M // R + 1,) or i.shape != (v.shape[0],)
        ):
            raise SparsetrainError(
                f"invalid BSR arrays for a {M}x{K} matrix: crow_indices {tuple(c.shape)} {c.dtype}, col_indices "
                f"{tuple(i.shape)} {i.dtype}, values {tuple(v.shape)}; need int32 (M/R + 1,) and (nblocks,) indices "
                "and (nblocks, R, C) values with R, C dividing M, K"
            )
        if not (c.is_contiguous() and i.is_contiguous() and v.is_contiguous()):
            self.crow_indices, self.col_indices, self.values = c.contiguous(), i.contiguous(), v.contiguous()

    @classmethod
    def from_dense(cls, weight: torch.Tensor, block: tuple[int, int]) -> "BlockMatrix":
        """The tiles of a 2-D tensor that hold a nonzero (all-zero tiles are dropped)."""
        if weight.dim() != 2:
            raise SparsetrainError(f"BlockMatrix.from_dense needs a 2-D tensor, got shape {tuple(weight.shape)}")
        M, K = weight.shape
        R, C = block
        if R < 1 or C < 1 or M % R or K % C:
            raise SparsetrainError(f"a {M}x{K} matrix cannot be cut into {R}x{C} tiles: both must divide its sizes")
        w = weight.detach()
        tiles = w.reshape(M // R, R, K // C, C).transpose(1, 2)  # (M/R, K/C, R, C)
        keep = (tiles != 0).flatten(2).any(dim=2)  # (M/R, K/C)
        rows, cols = keep.nonzero(as_tuple=True)  # row-major: sorted by tile row, then tile column
        counts = torch.bincount(rows, minlength=M // R)
        crow = torch.zeros(M // R + 1, dtype=torch.int64, device=w.device)
        crow[1:] = counts.cumsum(0)
        return cls(crow.to(torch.int32), cols.to(torch.int32), tiles[rows, cols].contiguous(), (int(M), int(K)))

    @property
    def block(self) -> tuple[int, int]:
        return (int(self.values.shape[1]), int(self.values.shape[2]))

    @property
    def nblocks(self) -> int:
        return int(self.values.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.crow_indices, self.col_indices, self.values))

    def to_dense(self) -> torch.Tensor:
        (M, K), (R, C) = self.shape, self.block
        out = torch.zeros(M // R, K // C, R, C, dtype=self.values.dtype, device=self.values.device)
        rows = torch.repeat_interleave(
            torch.arange(M // R, device=self.values.device), (self.crow_indices[1:] - self.crow_indices[:-1]).long()
        )
        out[rows, self.col_indices.long()] = self.values
        return out.transpose(1, 2).reshape(M, K)

    def to_torch(self) -> torch.Tensor:
        """The same matrix as a ``torch.sparse_bsr_tensor`` (shares memory; built once)."""
        if self._torch is None:
            self._torch = _bsr_tensor(self.crow_indices, self.col_indices, self.values, self.shape)
        return self._torch

    def validate(self) -> None:
        """Raise unless the arrays describe a valid BSR matrix. Needed before torch reads arrays
        that came from a file: the tensor is built without torch's invariant checks (they cost
        a pass per call), and out-of-range indices would read outside memory."""
        (M, K), (_, C) = self.shape, self.block
        c, i = self.crow_indices.long(), self.col_indices.long()
        ok = bool(c[0] == 0) and int(c[-1]) == i.numel() and bool((c[1:] >= c[:-1]).all())
        ok = ok and (i.numel() == 0 or (int(i.min()) >= 0 and int(i.max()) < K // C))
        if ok and i.numel() > 1:  # strictly increasing tile columns within each tile row
            row_of = torch.repeat_interleave(torch.arange(c.numel() - 1, device=c.device), c[1:] - c[:-1])
            same_row = row_of[1:] == row_of[:-1]
            ok = bool((i[1:][same_row] > i[:-1][same_row]).all())
        if not ok:
            raise SparsetrainError(
                f"corrupt BSR arrays for a {M}x{K} matrix: tile-row pointers must rise from 0 to nblocks and tile "
                f"columns increase within a row and lie in [0, {K // C}); the file may be damaged, convert the model again"
            )


def _bsr_mm(W: torch.Tensor, X: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``W @ X + bias[:, None]``: W a torch BSR (M, K), X (K, N) strided -> (M, N) contiguous."""
    if bias is None:
        return torch.mm(W, X)
    return torch.addmm(bias.unsqueeze(1), W, X)


class _BlockBase(nn.Module):
    """Holds one :class:`BlockMatrix` as buffers and rebuilds its torch BSR tensor when ``.to()``
    or loading replaced them."""

    def _init_bsr(self, W: BlockMatrix, bias: torch.Tensor | None) -> None:
        self.register_buffer("crow_indices", W.crow_indices)
        self.register_buffer("col_indices", W.col_indices)
        self.register_buffer("values", W.values)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.matrix_shape = tuple(W.shape)
        self.block = W.block
        self.sparse_choice: dict = {"layout": "bsr", "backend": None, "block": list(W.block)}
        self._bsr: BlockMatrix | None = None

    @property
    def matrix(self) -> BlockMatrix:
        m, b = self._bsr, self._buffers
        if m is None or m.values is not b["values"] or m.col_indices is not b["col_indices"] or m.crow_indices is not b["crow_indices"]:
            m = self._bsr = BlockMatrix(b["crow_indices"], b["col_indices"], b["values"], self.matrix_shape)
        return m

    @property
    def nnz(self) -> int:
        """Nonzero weights (the stored tiles may also hold zeros)."""
        return int((self.values != 0).sum())

    @property
    def nblocks(self) -> int:
        return int(self.values.shape[0])

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.crow_indices, self.col_indices, self.values)) + (
            0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        )


class SparseBlockLinear(_BlockBase):
    """``nn.Linear`` with a block-sparse (BSR) weight: ``y = x @ W^T + b``, x (..., in) -> (..., out).

    For a 2-D input the output is a transposed view (strides (1, B)), like :class:`SparseLinear`'s:
    the product is computed as ``W @ x^T`` (out, B); a following sparse layer reads it without a
    copy. Build it with :meth:`from_dense` or :func:`~sparsetrain.sparse.to_sparse`."""

    def __init__(self, weight: BlockMatrix, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self._init_bsr(weight, bias)

    @classmethod
    def from_dense(cls, linear: nn.Linear, block: tuple[int, int] | None = None) -> "SparseBlockLinear":
        """``block``: the tile size; ``None`` detects it (:func:`detect_block_size`), and a weight
        whose zeros are not blocky is an error."""
        block = block or detect_block_size(linear.weight)
        if block is None:
            raise SparsetrainError(
                f"{linear} cannot run block-sparse: {block_problem(linear.weight)}. Prune it with a block "
                "structure (prune_at_init(..., structure='block32x32')), give block=(R, C) explicitly, or use CSR"
            )
        return cls(BlockMatrix.from_dense(linear.weight.detach(), block), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _require_inference(self, x)
        M, K = self.matrix_shape
        if x.shape[-1] != K:
            raise SparsetrainError(f"SparseBlockLinear: input has {x.shape[-1]} features, the weight {self.matrix_shape} expects {K}")
        x2 = x if x.dim() == 2 else x.reshape(-1, K)  # (B, K)
        y = _bsr_mm(self.matrix.to_torch(), x2.t(), self._buffers["bias"]).t()  # (out, B) -> view (B, out)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], M)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block={self.block[0]}x{self.block[1]}, nblocks={self.nblocks}")


def conv_matrix(conv: nn.Conv2d) -> torch.Tensor:
    """A Conv2d's weight as the (out, C*kh*kw) matrix that multiplies ``F.unfold(x)``; with groups,
    block-diagonal over all input channels (zeros off the groups' blocks)."""
    out_c, cg = conv.out_channels, conv.in_channels // conv.groups
    kg = cg * math.prod(conv.kernel_size)  # columns per group
    w = conv.weight.detach().reshape(out_c, kg)  # (out, Cg*kh*kw)
    if conv.groups == 1:
        return w
    full = w.new_zeros(out_c, conv.groups * kg)
    og = out_c // conv.groups
    for g in range(conv.groups):
        full[g * og:(g + 1) * og, g * kg:(g + 1) * kg] = w[g * og:(g + 1) * og]
    return full


class SparseBlockConv2d(UnfoldedConv, _BlockBase):
    """``nn.Conv2d`` (zero padding) as a BSR matrix (out, C*kh*kw) times ``F.unfold(x)``, the whole
    batch in one product: (out, K) @ (K, B*L). Groups make the matrix block-diagonal."""

    def __init__(
        self,
        weight: BlockMatrix,
        bias: torch.Tensor | None,
        *,
        in_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
    ):
        super().__init__()
        self._init_geometry(weight.shape, in_channels, kernel_size, stride, padding, dilation, groups)
        self._init_bsr(weight, bias)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, block: tuple[int, int] | None = None) -> "SparseBlockConv2d":
        if not convertible_conv(conv):
            raise SparsetrainError(f"{conv} cannot run sparse: only zero padding given as numbers is supported")
        W = conv_matrix(conv)
        block = block or detect_block_size(W)
        if block is None:
            raise SparsetrainError(
                f"{conv} cannot run block-sparse: {block_problem(W)}. Prune it with a block structure "
                "(prune_at_init(..., structure='block32x32')) or use CSR"
            )
        return cls(
            BlockMatrix.from_dense(W, block), conv.bias, in_channels=conv.in_channels, kernel_size=conv.kernel_size,
            stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _require_inference(self, x)
        cols, unbatched, (B, Ho, Wo) = self._unfold(x)  # (B, K, L)
        K, L = cols.shape[1], cols.shape[2]
        y = _bsr_mm(self.matrix.to_torch(), cols.transpose(0, 1).reshape(K, B * L), self._buffers["bias"])  # (out, B*L)
        y = y.view(self.out_channels, B, L).transpose(0, 1).reshape(B, self.out_channels, Ho, Wo)
        return y[0] if unbatched else y

    def extra_repr(self) -> str:
        return f"{self._geometry_repr()}, block={self.block[0]}x{self.block[1]}, nblocks={self.nblocks}"


# ----------------------------------------------------------------------------- 2:4 semi-structured


def is_2to4(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive entries of each row holds at most 2 nonzeros (rows
    whose length is not a multiple of 4 cannot)."""
    w = _as_matrix(weight)
    M, K = w.shape
    return K % 4 == 0 and bool(((w != 0).view(M, K // 4, 4).sum(dim=2) <= 2).all())


def _semi_runtime_problem(device: torch.device, dtype: torch.dtype, shape: tuple[int, ...]) -> str | None:
    """Why a weight of this device, dtype and shape cannot use torch's 2:4 kernels (None: it can).
    The device is checked first, so off CUDA nothing touches the CUDA runtime."""
    if device.type != "cuda":
        return f"it is on {device.type}; 2:4 semi-structured kernels run only on CUDA GPUs"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        return f"the GPU has compute capability {major}.{minor}; 2:4 sparse tensor cores need 8.0+ (Ampere or newer)"
    if dtype not in SEMI_DTYPES:
        return f"its dtype is {dtype}; 2:4 runs on float16 or bfloat16 (convert with model.half() or model.bfloat16())"
    if len(shape) != 2:
        return f"only Linear weights (2-D) run as 2:4, got shape {tuple(shape)}"
    M, K = shape
    if M % SEMI_MIN_ROWS or K % SEMI_MIN_COLS:
        return (f"its shape {M}x{K} is not a multiple of {SEMI_MIN_ROWS}x{SEMI_MIN_COLS} "
                "(the sizes torch's 2:4 kernels accept)")
    return None


def semi_structured_problem(weight: torch.Tensor) -> str | None:
    """``None`` when ``weight`` (a Linear weight) can run as 2:4 semi-structured here: on a CUDA
    GPU of compute capability 8.0+, float16/bfloat16, both sizes multiples of 32x64, and 2:4
    sparse (:func:`is_2to4`); otherwise why not, in words."""
    problem = _semi_runtime_problem(weight.device, weight.dtype, tuple(weight.shape))
    if problem is None and not is_2to4(weight):
        problem = "some group of 4 consecutive weights in a row holds more than 2 nonzeros (prune with structure='2:4')"
    return problem


def compress_2to4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2:4-sparse (M, K) matrix (K a multiple of 8) as ``values`` (M, K/2), the two kept entries
    of each group of 4 in order, and ``meta`` (M, K/8) uint8: per group a 4-bit code p0 | p1 << 2
    of the kept positions p0 < p1, two groups per byte (the low nibble first). A group with fewer
    than 2 nonzeros keeps zeros at its first zero positions.

    This is sparsetrain's own portable form (device- and backend-independent, 2 bits of index per
    kept weight, as NVIDIA's); the backend's compressed tensor is built from it where it runs."""
    if weight.dim() != 2 or weight.shape[1] % 8:
        raise SparsetrainError(f"2:4 compression needs a 2-D weight whose rows are a multiple of 8 long, got {tuple(weight.shape)}")
    if not is_2to4(weight):
        raise SparsetrainError("the weight is not 2:4 sparse: some group of 4 consecutive weights in a row holds "
                               "more than 2 nonzeros; prune with structure='2:4'")
    M, K = weight.shape
    g = weight.detach().reshape(M, K // 4, 4)
    # Nonzeros first (a stable sort keeps their order), then zeros: the first two are the kept pair.
    pos = torch.sort((g == 0).to(torch.int16), dim=2, stable=True).indices[:, :, :2].sort(dim=2).values  # (M, K/4, 2)
    values = g.gather(2, pos).reshape(M, K // 2)
    code = (pos[:, :, 0] | (pos[:, :, 1] << 2)).to(torch.uint8)  # (M, K/4)
    meta = code[:, 0::2] | (code[:, 1::2] << 4)  # (M, K/8)
    return values.contiguous(), meta.contiguous()


def _positions(meta: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    M, K = shape
    codes = torch.stack((meta & 15, meta >> 4), dim=2).reshape(M, K // 4)  # (M, K/4)
    return torch.stack((codes & 3, codes >> 2), dim=2).long()  # (M, K/4, 2)


def decompress_2to4(values: torch.Tensor, meta: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The dense (M, K) matrix of :func:`compress_2to4`'s arrays."""
    M, K = shape
    if values.shape != (M, K // 2) or meta.shape != (M, K // 8) or meta.dtype != torch.uint8 or K % 8:
        raise SparsetrainError(
            f"invalid 2:4 arrays for a {M}x{K} matrix: values {tuple(values.shape)} (need ({M}, {K // 2})), meta "
            f"{tuple(meta.shape)} {meta.dtype} (need ({M}, {K // 8}) uint8)"
        )
    out = values.new_zeros(M, K // 4, 4)
    out.scatter_(2, _positions(meta, shape), values.reshape(M, K // 4, 2))
    return out.reshape(M, K)


class SparseSemiStructuredLinear(nn.Module):
    """``nn.Linear`` with a 2:4 semi-structured weight, run by ``torch.sparse.to_sparse_semi_structured``
    (cuSPARSELt or CUTLASS) on CUDA: x (..., in) -> (..., out), contiguous.

    Buffers: ``values`` (out, in/2) and ``meta`` (out, in/8) uint8 (:func:`compress_2to4`), ``bias``.
    The backend's compressed tensor is built from them on the first call on a CUDA device (and
    again after ``.to()`` or loading replaced them), so the layer holds the weights twice there,
    each about half the dense size. Off CUDA, or with a dtype or shape the kernels do not take,
    calling it is an error that says why (building, saving and loading work anywhere)."""

    def __init__(self, values: torch.Tensor, meta: torch.Tensor, shape: tuple[int, int], bias: torch.Tensor | None = None):
        super().__init__()
        M, K = shape
        if K % 8 or values.shape != (M, K // 2) or meta.shape != (M, K // 8) or meta.dtype != torch.uint8:
            raise SparsetrainError(
                f"invalid 2:4 arrays for a {M}x{K} weight: values {tuple(values.shape)}, meta {tuple(meta.shape)} "
                f"{meta.dtype}; need ({M}, {K // 2}) and ({M}, {K // 8}) uint8 (see compress_2to4)"
            )
        self.out_features, self.in_features = int(M), int(K)
        self.register_buffer("values", values.contiguous())
        self.register_buffer("meta", meta.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.matrix_shape = (int(M), int(K))
        self.sparse_choice: dict = {"layout": "semi", "backend": None}
        self._semi: tuple | None = None  # (values, meta, torch semi-structured tensor)

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> "SparseSemiStructuredLinear":
        if linear.in_features % 8:
            raise SparsetrainError(f"{linear} cannot run as 2:4: in_features must be a multiple of 8")
        values, meta = compress_2to4(linear.weight.detach())
        return cls(values, meta, (linear.out_features, linear.in_features), linear.bias)

    @property
    def nnz(self) -> int:
        return int((self.values != 0).sum())

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.meta)) + (
            0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        )

    def validate(self) -> None:
        """Raise unless ``meta`` holds valid codes (two distinct positions per group)."""
        pos = _positions(self.meta, self.matrix_shape)
        if not bool((pos[:, :, 0] < pos[:, :, 1]).all()):
            raise SparsetrainError("corrupt 2:4 metadata: each group must name two distinct positions in increasing "
                                   "order; the file may be damaged, convert the model again")

    def to_dense_weight(self) -> torch.Tensor:
        """The dense (out, in) weight, zeros included."""
        return decompress_2to4(self.values, self.meta, self.matrix_shape)

    def semi_weight(self) -> torch.Tensor:
        """The backend's semi-structured tensor (built once per set of buffers, on CUDA only)."""
        v, m = self._buffers["values"], self._buffers["meta"]
        if self._semi is not None and self._semi[0] is v and self._semi[1] is m:
            return self._semi[2]
        problem = _semi_runtime_problem(v.device, v.dtype, self.matrix_shape)
        if problem is not None:
            raise SparsetrainError(
                f"SparseSemiStructuredLinear cannot run here: {problem}. Move it to a CUDA GPU in float16/bfloat16, "
                "or rebuild a dense nn.Linear from .to_dense_weight()"
            )
        from torch.sparse import to_sparse_semi_structured

        semi = to_sparse_semi_structured(decompress_2to4(v, m, self.matrix_shape))
        self._semi = (v, m, semi)
        return semi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _require_inference(self, x)
        M, K = self.matrix_shape
        if x.shape[-1] != K:
            raise SparsetrainError(f"SparseSemiStructuredLinear: input has {x.shape[-1]} features, the weight expects {K}")
        W = self.semi_weight()
        y = F.linear(x.reshape(-1, K).contiguous(), W, self._buffers["bias"])  # (B, out)
        return y.reshape(*x.shape[:-1], M)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, sparsity=2:4"
