"""Sparse kernels: ``W @ X`` with ``W`` in compressed sparse row (CSR) form, 32-bit indices.

The one operation sparse execution needs is ``Y[g] = W @ X[g] + bias[:, None]`` with ``W``
(M, K) sparse and ``X`` (G, K, N) dense:

* ``nn.Linear``: ``X = x^T`` (1, in, B), so ``Y[0] = (x @ W^T)^T``;
* ``nn.Conv2d``: ``X = unfold(x)`` (B, C*kh*kw, L), so ``Y`` (B, out, L) is the output image.

Two implementations, same results (up to float summation order):

* a small C++/OpenMP kernel (:func:`load_extension`: ``csr_kernel.cpp`` beside this module,
  plain C++ without torch headers, compiled on first use with ``g++ -O3 -march=native -fopenmp``
  in about a second into ``$SPARSETRAIN_KERNEL_CACHE`` or
  ``~/.cache/sparsetrain/kernels/<key of the CPU flags, compiler flags and source>``, called
  through ctypes; the library's SHA-256 is kept beside it and checked before every load, so a
  truncated or damaged file (a full disk, a killed copy) is rebuilt instead of crashing the
  process with a bus error). Rows are split into chunks of equal nonzero count, run on
  ``torch.get_num_threads()`` threads (one thread below :data:`MIN_PARALLEL_WORK`). For N = 1
  each row is one SIMD gather-reduction (SpMV); for N > 1 the columns of ``X`` are processed in
  blocks of 64 (float32 with AVX-512: four 16-lane registers), then 16/4 held in registers, so
  each nonzero ``w`` is loaded once per block and multiplies a contiguous run of ``X[col, n:n+B]``.
  :func:`csr_linear` on a row-major ``x`` (B, K) (B > 1) uses ``csr_linear_rows`` instead, which
  fuses the (B, K) -> (K, B) transpose: blocks of 16 examples are transposed into a thread-local
  (K, 16) buffer (AVX-512 16x16 register transposes for float32) and consumed at once from cache
  (a block that fits L1).
* a pure-torch path (``torch.sparse_csr_tensor`` with int32 indices, which dispatches to MKL's
  sparse BLAS on CPU), used when the extension cannot be built, for dtypes other than
  float32/float64, off CPU, and by ``backend="torch"``.

    >>> import torch
    >>> from sparsetrain.sparse.kernels import CSRMatrix, csr_linear
    >>> w = torch.tensor([[0., 2., 0.], [1., 0., 3.]])
    >>> W = CSRMatrix.from_dense(w)
    >>> W.nnz, W.crow_indices.tolist(), W.col_indices.tolist()
    (3, [0, 1, 3], [1, 0, 2])
    >>> csr_linear(torch.tensor([[1., 1., 1.]]), W).tolist()
    [[2.0, 4.0]]

Why these choices (fused transpose, 64-column blocks, one thread for small calls) and what they
measured: docs/sparse.md, "Measurement history".
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import os
import platform
import shutil
import subprocess
import sys
import threading
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SparsetrainError
from ..fsio import atomic_write

__all__ = ["CSRMatrix", "csr_linear", "csr_matmul", "extension_available", "load_extension"]

# ----------------------------------------------------------------------------- the C++ kernel

# The source is csr_kernel.cpp beside this file (package data): plain C++ without torch headers,
# so it compiles in about a second, called through ctypes with raw pointers; the Python side checks
# shapes, dtypes and contiguity before every call.
_CPP_FILE = "csr_kernel.cpp"


def _cpp_source() -> str:
    """The kernel's C++ source, read from the installed package."""
    return importlib.resources.files(__package__).joinpath(_CPP_FILE).read_text()

_CXX_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]

_EXTENSION = None
_EXTENSION_ERROR: str | None = None
_LOCK = threading.Lock()

# Below this many multiply-adds a call runs on one thread. A parallel region costs more than its
# own wake-up: our OpenMP runtime's spinning worker then competes with torch's for the cores, and
# the next op pays; timed alone, each small layer looked faster on 2 threads, but the whole model
# was slower (the numbers: docs/sparse.md, "Measurement history").
MIN_PARALLEL_WORK = 1 << 20


def _cache_dir() -> Path:
    root = os.environ.get("SPARSETRAIN_KERNEL_CACHE") or Path.home() / ".cache" / "sparsetrain" / "kernels"
    # -march=native code must not be reused on another CPU: key the folder by the CPU flags.
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    # ... and by the source's hash, so an edited or upgraded kernel is compiled anew.
    key = hashlib.sha1(f"{flags}|{_CXX_FLAGS}|{_cpp_source()}".encode()).hexdigest()[:16]
    return Path(root) / key


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checksum_file(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def _damage(lib: Path) -> str | None:
    """Why the cached library cannot be trusted (no checksum, a checksum that differs: a truncated
    or damaged file), or ``None`` when its SHA-256 is the one recorded when it was built."""
    try:
        recorded = _checksum_file(lib).read_text().split()[0] if _checksum_file(lib).is_file() else None
    except (OSError, IndexError):
        recorded = None
    if recorded is None:
        return "it has no recorded checksum"
    try:
        actual = _sha256(lib)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    if actual != recorded:
        return f"its SHA-256 differs from the one recorded when it was built ({lib.stat().st_size:,} bytes now)"
    return None


def _build(folder: Path) -> Path:
    """``folder/csr_kernel.so``: reused when its SHA-256 is the one recorded beside it
    (``csr_kernel.so.sha256``), else compiled anew (said once on stderr when a damaged file is
    replaced). The library is compiled to a temporary name and renamed (``fsio.atomic_write``,
    site ``"kernel"``), then its checksum written the same way: two processes building at once
    both end with a complete, verified file, and a build cut short leaves no file that verifies."""
    lib = folder / "csr_kernel.so"
    if lib.is_file():
        why = _damage(lib)
        if why is None:
            return lib
        print(f"sparsetrain: the compiled sparse kernel {lib} cannot be trusted ({why}); rebuilding it",
              file=sys.stderr, flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "csr_kernel.cpp"
    tmp_src = folder / f".src.{os.getpid()}.{uuid.uuid4().hex[:8]}.cpp"
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or "c++"

    def compile_to(tmp: Path) -> None:
        proc = subprocess.run([cxx, *_CXX_FLAGS, str(tmp_src), "-o", str(tmp)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-500:]}")

    try:
        tmp_src.write_text(_cpp_source())
        atomic_write(lib, compile_to, what="kernel")
        digest = _sha256(lib)
        atomic_write(_checksum_file(lib), lambda tmp: tmp.write_text(f"{digest}  {lib.name}\n"), what="kernel")
        os.replace(tmp_src, src)  # the source it was built from, for reference
    finally:
        tmp_src.unlink(missing_ok=True)
    return lib


def load_extension():
    """The compiled C++ kernel (a ``ctypes.CDLL``), or ``None`` when it cannot be built: no C++
    compiler, no OpenMP, a read-only cache folder (the reason is in :func:`extension_error`).
    Compiles once per machine (about a second), then loads from the cache folder.
    ``SPARSETRAIN_NO_KERNEL=1`` disables it, so the pure-torch path is used."""
    global _EXTENSION, _EXTENSION_ERROR
    if _EXTENSION is not None or _EXTENSION_ERROR is not None:
        return _EXTENSION
    with _LOCK:
        if _EXTENSION is not None or _EXTENSION_ERROR is not None:
            return _EXTENSION
        if os.environ.get("SPARSETRAIN_NO_KERNEL", "") not in ("", "0"):
            _EXTENSION_ERROR = "disabled by SPARSETRAIN_NO_KERNEL"
            return None
        try:
            path = _build(_cache_dir())
            if _damage(path) is not None:
                # Another process built it at the same time and the two checksums crossed (the
                # library and its checksum cannot be replaced together): build once more.
                path = _build(_cache_dir())
                if _damage(path) is not None:
                    raise RuntimeError(f"{path} keeps changing after it is built and verified; not loaded")
            lib = ctypes.CDLL(str(path))
            p, i64 = ctypes.c_void_p, ctypes.c_int64
            for fn in (lib.csr_matmul_f32, lib.csr_matmul_f64):
                fn.argtypes = [p, p, p, p, p, i64, i64, i64, i64, p, i64, i64, i64, i64, i64]
                fn.restype = None
            for fn in (lib.csr_linear_rows_f32, lib.csr_linear_rows_f64):
                fn.argtypes = [p, p, p, p, p, i64, i64, i64, p, i64, i64, i64, i64]
                fn.restype = None
            for fn in (lib.transpose_f32, lib.transpose_f64):
                fn.argtypes = [p, i64, i64, p, i64]
                fn.restype = None
            _EXTENSION = lib
        except Exception as exc:  # fall back to torch, and say why (once)
            _EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"
            _EXTENSION = None
            print(f"sparsetrain: the C++ sparse kernel is unavailable ({_EXTENSION_ERROR}); sparse layers use "
                  "torch's CSR path instead (correct, often slower). SPARSETRAIN_NO_KERNEL=1 skips the build",
                  file=sys.stderr, flush=True)
        return _EXTENSION


def extension_available() -> bool:
    """Whether the C++ kernel is usable here (builds it on first call)."""
    return load_extension() is not None


def extension_error() -> str | None:
    """Why the C++ kernel is unavailable (``None`` if it loaded or was not tried yet)."""
    return _EXTENSION_ERROR


def _kernel_call(W: "CSRMatrix", bias, X: torch.Tensor, Y: torch.Tensor, sg: int, sr: int, sn: int) -> None:
    """Y <- W @ X[g] (+ bias) through the C++ kernel. X (G, K, N) contiguous, same dtype as W."""
    G, K, N = X.shape
    fn = _EXTENSION.csr_matmul_f32 if X.dtype == torch.float32 else _EXTENSION.csr_matmul_f64
    fn(
        W.crow_indices.data_ptr(), W.col_indices.data_ptr(), W.values.data_ptr(),
        None if bias is None else bias.data_ptr(), X.data_ptr(),
        G, W.shape[0], K, N, Y.data_ptr(), sg, sr, sn, torch.get_num_threads(), MIN_PARALLEL_WORK,
    )


# ----------------------------------------------------------------------------- the CSR matrix


@dataclass
class CSRMatrix:
    """A sparse (M, K) matrix: ``crow_indices`` (M+1,) int32, ``col_indices`` (nnz,) int32 (sorted
    within each row), ``values`` (nnz,). Stored bytes = 4 (M + 1) + (4 + itemsize) nnz."""

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]
    _torch: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        M, K = self.shape
        c, i, v = self.crow_indices, self.col_indices, self.values
        if c.dtype != torch.int32 or i.dtype != torch.int32 or c.shape != (M + 1,) or i.dim() != 1 or v.shape != i.shape:
            raise SparsetrainError(
                f"invalid CSR arrays for a {M}x{K} matrix: crow_indices {tuple(c.shape)} {c.dtype} (need ({M + 1},) "
                f"int32), col_indices {tuple(i.shape)} {i.dtype} (need (nnz,) int32), values {tuple(v.shape)} (need (nnz,))"
            )
        if not (c.is_contiguous() and i.is_contiguous() and v.is_contiguous()):
            self.crow_indices, self.col_indices, self.values = c.contiguous(), i.contiguous(), v.contiguous()

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> "CSRMatrix":
        """The nonzeros of a 2-D tensor (exact zeros are dropped)."""
        if weight.dim() != 2:
            raise SparsetrainError(f"CSRMatrix.from_dense needs a 2-D tensor, got shape {tuple(weight.shape)}")
        M, K = weight.shape
        if weight.numel() >= 2**31 or K >= 2**31:
            raise SparsetrainError(f"a {M}x{K} matrix is too large for 32-bit CSR indices")
        w = weight.detach()
        nz = w != 0  # (M, K)
        rows, cols = nz.nonzero(as_tuple=True)  # row-major order: sorted by row, then column
        counts = torch.bincount(rows, minlength=M) if rows.numel() else torch.zeros(M, dtype=torch.long, device=w.device)
        crow = torch.zeros(M + 1, dtype=torch.int64, device=w.device)
        crow[1:] = counts.cumsum(0)
        return cls(crow.to(torch.int32), cols.to(torch.int32), w[rows, cols].contiguous(), (int(M), int(K)))

    @property
    def nnz(self) -> int:
        return int(self.col_indices.numel())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.crow_indices, self.col_indices, self.values))

    def to_dense(self) -> torch.Tensor:
        M, K = self.shape
        out = torch.zeros(M, K, dtype=self.values.dtype, device=self.values.device)
        rows = torch.repeat_interleave(
            torch.arange(M, device=self.values.device), (self.crow_indices[1:] - self.crow_indices[:-1]).long()
        )
        out[rows, self.col_indices.long()] = self.values
        return out

    def to_torch(self) -> torch.Tensor:
        """The same matrix as a ``torch.sparse_csr_tensor`` (shares memory; built once)."""
        if self._torch is not None:
            return self._torch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta", "invariant checks disabled"
            self._torch = torch.sparse_csr_tensor(
                self.crow_indices, self.col_indices, self.values, self.shape, check_invariants=False
            )
        return self._torch

    def validate(self) -> None:
        """Raise unless the arrays describe a valid CSR matrix (needed before the C++ kernel reads
        arrays that came from a file: out-of-range indices would read outside memory)."""
        M, K = self.shape
        c, i = self.crow_indices.long(), self.col_indices.long()
        ok = bool(c[0] == 0) and int(c[-1]) == i.numel() and bool((c[1:] >= c[:-1]).all())
        ok = ok and (i.numel() == 0 or (int(i.min()) >= 0 and int(i.max()) < K))
        if not ok:
            raise SparsetrainError(
                f"corrupt CSR arrays for a {M}x{K} matrix: row pointers must rise from 0 to nnz and column "
                f"indices lie in [0, {K}); the file may be damaged, convert the model again"
            )


# ----------------------------------------------------------------------------- entry points


def _vector(bias: torch.Tensor | None, W: CSRMatrix) -> torch.Tensor | None:
    if bias is None:
        return None
    if bias.shape != (W.shape[0],):
        raise SparsetrainError(f"bias has shape {tuple(bias.shape)}, expected ({W.shape[0]},)")
    if bias.dtype == W.values.dtype and bias.is_contiguous():  # the usual case: no copy
        return bias
    return bias.to(W.values.dtype).contiguous()


def _transposed(x: torch.Tensor) -> torch.Tensor:
    """``x.t().contiguous()`` for a 2-D CPU tensor, with the kernel's tiled transpose."""
    xt = x.t()
    if xt.is_contiguous():
        return xt
    if not x.is_contiguous():
        return xt.contiguous()
    out = torch.empty(xt.shape, dtype=x.dtype)
    fn = _EXTENSION.transpose_f32 if x.dtype == torch.float32 else _EXTENSION.transpose_f64
    fn(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), torch.get_num_threads())
    return out


def _use_kernel(W: CSRMatrix, X: torch.Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    ok = (
        X.is_cpu
        and W.values.dtype in (torch.float32, torch.float64)
        and X.dtype == W.values.dtype
        and load_extension() is not None
    )
    if backend == "kernel" and not ok:
        raise SparsetrainError(
            "the C++ sparse kernel cannot run here "
            f"({extension_error() or 'needs float32/float64 tensors on the CPU'}); use backend='torch' or 'auto'"
        )
    return ok


def csr_matmul(W: CSRMatrix, X: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """``W @ X[g] + bias[:, None]`` for each g: X (K, N) -> (M, N), or X (G, K, N) -> (G, M, N).

    ``backend``: "auto" (the C++ kernel when available, else torch), "kernel" or "torch".
    No autograd: this is for inference."""
    squeeze = X.dim() == 2
    X3 = X.unsqueeze(0) if squeeze else X
    if X3.dim() != 3 or X3.shape[1] != W.shape[1]:
        raise SparsetrainError(f"csr_matmul: W is {W.shape}, X must be (K={W.shape[1]}, N) or (G, K, N); got {tuple(X.shape)}")
    G, K, N = X3.shape
    M = W.shape[0]
    if _use_kernel(W, X3, backend):
        X3 = X3.contiguous()
        Y = torch.empty(G, M, N, dtype=X3.dtype, device=X3.device)
        _kernel_call(W, _vector(bias, W), X3, Y, M * N, N, 1)
    else:
        A = W.to_torch()
        Y = torch.stack([torch.sparse.mm(A, X3[g]) for g in range(G)]) if G > 1 else torch.sparse.mm(A, X3[0]).unsqueeze(0)
        if bias is not None:
            Y = Y + bias.view(1, M, 1)
    return Y[0] if squeeze else Y


def csr_linear(x: torch.Tensor, W: CSRMatrix, bias: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """``F.linear(x, W.to_dense(), bias)`` computed sparse: x (..., K) -> (..., M).

    For a 2-D ``x`` the result is a transposed view (strides (1, B)), as ``W @ x^T`` is computed
    in that layout; a following sparse layer then reads it without a copy. Call
    ``.contiguous()`` where a contiguous tensor is required.

    With the C++ kernel, a row-major ``x`` (B > 1) goes to ``csr_linear_rows``, which transposes
    blocks of 16 examples in cache as it goes; a transposed view (a previous sparse layer's
    output) is read in place by ``csr_matmul``; one example (B = 1) is a sparse matrix-vector
    product. (Fusing the transpose more than halved the first LeNet-300-100 layer's time at batch
    64: docs/sparse.md.)"""
    M, K = W.shape
    if x.shape[-1] != K:
        raise SparsetrainError(f"csr_linear: input has {x.shape[-1]} features, the weight {W.shape} expects {K}")
    x2 = x if x.dim() == 2 else x.reshape(-1, K)  # (B, K)
    B = x2.shape[0]
    if _use_kernel(W, x2, backend):
        b = _vector(bias, W)
        bp = None if b is None else b.data_ptr()
        y = torch.empty_strided((B, M), (1, B), dtype=x2.dtype)  # y.t() (M, B) is contiguous
        f32 = x2.dtype == torch.float32
        threads = torch.get_num_threads()
        if B > 1 and x2.is_contiguous():  # row-major (B, K): transposed block by block in the kernel
            fn = _EXTENSION.csr_linear_rows_f32 if f32 else _EXTENSION.csr_linear_rows_f64
            fn(W.crow_indices.data_ptr(), W.col_indices.data_ptr(), W.values.data_ptr(), bp, x2.data_ptr(),
               B, M, K, y.data_ptr(), B, 1, threads, MIN_PARALLEL_WORK)
        else:
            xt = _transposed(x2)  # (K, B): free when x2 is itself a transposed view, or B == 1
            fn = _EXTENSION.csr_matmul_f32 if f32 else _EXTENSION.csr_matmul_f64
            fn(W.crow_indices.data_ptr(), W.col_indices.data_ptr(), W.values.data_ptr(), bp, xt.data_ptr(),
               1, M, K, B, y.data_ptr(), 0, B, 1, threads, MIN_PARALLEL_WORK)
    else:
        A = W.to_torch()
        # MKL's sparse matrix-vector product is the fastest measured for one row (torch.mv).
        yt = torch.mv(A, x2[0]).unsqueeze(1) if B == 1 else torch.sparse.mm(A, x2.t())  # (M, B)
        if bias is not None:
            yt = yt + bias.unsqueeze(1)
        y = yt.t()  # (B, M)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], M)
