"""Sparse kernels: ``W @ X`` with ``W`` in compressed sparse row (CSR) form, 32-bit indices.

The one operation sparse execution needs is ``Y[g] = W @ X[g] + bias[:, None]`` with ``W``
(M, K) sparse and ``X`` (G, K, N) dense:

* ``nn.Linear``: ``X = x^T`` (1, in, B), so ``Y[0] = (x @ W^T)^T``;
* ``nn.Conv2d``: ``X = unfold(x)`` (B, C*kh*kw, L), so ``Y`` (B, out, L) is the output image.

Two implementations, same results (up to float summation order):

* a small C++/OpenMP kernel (:func:`load_extension`: plain C++ without torch headers, compiled
  on first use with ``g++ -O3 -march=native -fopenmp`` in about a second into
  ``$SPARSETRAIN_KERNEL_CACHE`` or ``~/.cache/sparsetrain/kernels/<cpu key>``, called through
  ctypes). Rows are split into chunks of equal nonzero count, run on
  ``torch.get_num_threads()`` threads (one thread below :data:`MIN_PARALLEL_WORK`). For N = 1
  each row is one SIMD gather-reduction (SpMV); for N > 1 the columns of ``X`` are processed in
  blocks of 64 (float32 with AVX-512: four 16-lane registers), then 16/4 held in registers, so
  each nonzero ``w`` is loaded once per block and multiplies a contiguous run of ``X[col, n:n+B]``.
  :func:`csr_linear` on a row-major ``x`` (B, K) (B > 1) uses ``csr_linear_rows`` instead, which
  fuses the (B, K) -> (K, B) transpose: blocks of 16 examples are transposed into a thread-local
  (K, 16) buffer (AVX-512 16x16 register transposes for float32) and consumed at once from cache
  (blocks of 64 in a (K, 64) buffer were measured: no faster at batch 64, 20% slower at 1024,
  where the buffer no longer fits L1).
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

Measured (LeNet-300-100, SNIP 98%, batch 64, 1 thread, Xeon with AVX-512 while a training job
kept both cores busy; medians of interleaved rounds in one process):

* whole model (``to_sparse(model, mask, batch_size=64, input_shape=(1, 28, 28))``) vs the dense
  model: before 2.5x (105-115 us vs 266-290 us), after 4.2-4.6x (60-65 us). With 2 threads on
  the loaded machine: before 1.2-1.4x, after 1.6-2.3x (both very noisy). The gains:
* first layer (300x784, 1017 nonzeros) with its (64, 784) row-major input: separate tiled
  transpose 16 us + kernel 10 us + Python 9 us = 36 us -> fused ``csr_linear_rows`` 9.6 us +
  Python 3 us. Measured and dropped: one SpMV per example gathering from the contiguous
  ``x[b]`` (41 us scalar, 60 us SIMD: rows of ~3 nonzeros leave the lanes idle), and blocks of
  64 examples per row (the 64 accumulators spill: 3x slower on the 100x300 layer).
* per-call Python overhead, 10x100 layer: 15.4 us -> 7.8 us for the module call (no bias copy,
  no ``.contiguous()`` / ``unsqueeze`` / ``.t()`` views, output allocated with its final strides,
  buffers read from ``Module._buffers`` instead of ``__getattr__``).
* :func:`~sparsetrain.sparse.to_sparse` now times each layer on the layout it really receives
  (a previous sparse Linear's transposed view): the 100x300 layer, dense 38 us vs sparse 25 us,
  had been kept dense after being timed on a contiguous input (transpose included).

Then (same model, batch 64, idle machine): blocks of 64 columns in four AVX-512
accumulators (independent FMA chains; one 16-wide accumulator per row made every FMA wait for the
previous one): the 100x300 layer 17 -> 10.5 us on one thread; and calls under 2**20
multiply-adds kept on one thread (:data:`MIN_PARALLEL_WORK`): whole model with 2 threads 2.5x ->
3.4x faster than dense.

4096x4096 weight, batch 1, 1 thread (the SpMV path, unchanged but for the Python overhead): 95%
sparse 5.0-7.5x, 99% sparse 18-27x faster than ``F.linear`` (before: 4.7-6.8x and 15-21x in the
same runs; the spread is ``F.linear`` flipping between 2.4 and 3.9 ms with the load). With 2
threads on the loaded machine every OpenMP/torch parallel region waits for a busy core, so
2-thread timings there (dense included) swung between runs by up to 100x: not conclusive.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SparsetrainError

__all__ = ["CSRMatrix", "csr_linear", "csr_matmul", "extension_available", "load_extension"]

# ----------------------------------------------------------------------------- the C++ kernel

# Plain C++ (no torch headers, so it compiles in about a second) called through ctypes with raw
# pointers; the Python side checks shapes, dtypes and contiguity before every call.
_CPP_SOURCE = r"""
#include <stdint.h>
#include <algorithm>
#include <vector>
#include <type_traits>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

// acc[0:BB] = init; acc += w_j * X[col_j, n0:n0+BB] over the row's nonzeros; store with stride sn.
template <typename T, int BB>
inline void row_block(const int32_t* __restrict cols, const T* __restrict vals, int64_t lo, int64_t hi,
                      const T* __restrict X, int64_t N, int64_t n0, T init, T* __restrict y, int64_t sn) {
  T acc[BB];
  for (int b = 0; b < BB; ++b) acc[b] = init;
  for (int64_t j = lo; j < hi; ++j) {
    const T v = vals[j];
    const T* __restrict xr = X + static_cast<int64_t>(cols[j]) * N + n0;
#pragma omp simd
    for (int b = 0; b < BB; ++b) acc[b] += v * xr[b];
  }
  for (int b = 0; b < BB; ++b) y[(n0 + b) * sn] = acc[b];
}

#ifdef __AVX512F__
// 64 float columns at once: four 16-lane accumulators, so four independent FMA chains per
// nonzero. With one 16-column block at a time every FMA waited for the previous one's result
// (4 cycles), and rows of tens of nonzeros ran latency-bound: LeNet-300-100's 100x300 layer at
// 98% (37 nonzeros per row), batch 64, one thread: 17 us -> see the module docstring. (A
// generic ``T acc[64]`` loop spilled its accumulators: hence the intrinsics.)
inline void row_block64_f32(const int32_t* __restrict cols, const float* __restrict vals, int64_t lo, int64_t hi,
                            const float* __restrict X, int64_t N, int64_t n0, float init, float* __restrict y,
                            int64_t sn) {
  __m512 a0 = _mm512_set1_ps(init), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t j = lo; j < hi; ++j) {
    const __m512 v = _mm512_set1_ps(vals[j]);
    const float* __restrict xr = X + static_cast<int64_t>(cols[j]) * N + n0;
    a0 = _mm512_fmadd_ps(v, _mm512_loadu_ps(xr), a0);
    a1 = _mm512_fmadd_ps(v, _mm512_loadu_ps(xr + 16), a1);
    a2 = _mm512_fmadd_ps(v, _mm512_loadu_ps(xr + 32), a2);
    a3 = _mm512_fmadd_ps(v, _mm512_loadu_ps(xr + 48), a3);
  }
  if (sn == 1) {
    _mm512_storeu_ps(y + n0, a0);
    _mm512_storeu_ps(y + n0 + 16, a1);
    _mm512_storeu_ps(y + n0 + 32, a2);
    _mm512_storeu_ps(y + n0 + 48, a3);
  } else {
    alignas(64) float out[64];
    _mm512_store_ps(out, a0);
    _mm512_store_ps(out + 16, a1);
    _mm512_store_ps(out + 32, a2);
    _mm512_store_ps(out + 48, a3);
    for (int b = 0; b < 64; ++b) y[(n0 + b) * sn] = out[b];
  }
}
#endif

// One column n of X: a SIMD gather-reduction over the row (sparse matrix-vector product).
template <typename T>
inline void row_single(const int32_t* __restrict cols, const T* __restrict vals, int64_t lo, int64_t hi,
                       const T* __restrict X, int64_t N, int64_t n, T init, T* __restrict y, int64_t sn) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = lo; j < hi; ++j) acc += vals[j] * X[static_cast<int64_t>(cols[j]) * N + n];
  y[n * sn] = init + acc;
}

template <typename T, int BB>
inline void rows_blocked(const int32_t* crow, const int32_t* cols, const T* vals, const T* bias, const T* X,
                         int64_t N, int64_t& n0, T* Y, int64_t sr, int64_t sn, int64_t r0, int64_t r1) {
  // Column blocks outermost: X[:, n0:n0+BB] stays in cache across the chunk's rows.
  for (; n0 + BB <= N; n0 += BB)
    for (int64_t r = r0; r < r1; ++r)
      row_block<T, BB>(cols, vals, crow[r], crow[r + 1], X, N, n0, bias ? bias[r] : T(0), Y + r * sr, sn);
}

template <typename T>
void run_rows(const int32_t* crow, const int32_t* cols, const T* vals, const T* bias, const T* X, int64_t N,
              T* Y, int64_t sr, int64_t sn, int64_t r0, int64_t r1) {
  int64_t n0 = 0;
  if (N == 1) {  // sparse matrix-vector product: 32-bit gather indices, 16 lanes
    for (int64_t r = r0; r < r1; ++r) {
      T acc = 0;
      const int64_t hi = crow[r + 1];
#pragma omp simd reduction(+ : acc)
      for (int64_t j = crow[r]; j < hi; ++j) acc += vals[j] * X[cols[j]];
      Y[r * sr] = (bias ? bias[r] : T(0)) + acc;
    }
    return;
  }
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, float>) {  // blocks of 64 columns in four registers
    for (; n0 + 64 <= N; n0 += 64)
      for (int64_t r = r0; r < r1; ++r)
        row_block64_f32(cols, vals, crow[r], crow[r + 1], X, N, n0, bias ? bias[r] : 0.0f, Y + r * sr, sn);
  }
#endif
  // Blocks of 16 columns: generic code, one accumulator chain per row (wider generic blocks spill).
  rows_blocked<T, 16>(crow, cols, vals, bias, X, N, n0, Y, sr, sn, r0, r1);
  rows_blocked<T, 4>(crow, cols, vals, bias, X, N, n0, Y, sr, sn, r0, r1);
  for (; n0 < N; ++n0)
    for (int64_t r = r0; r < r1; ++r)
      row_single<T>(cols, vals, crow[r], crow[r + 1], X, N, n0, bias ? bias[r] : T(0), Y + r * sr, sn);
}

// Y[g] = W @ X[g] (+ bias[:, None]) for g < G; W (M, K) CSR, X (G, K, N) contiguous, Y element
// (g, r, n) at g*sg + r*sr + n*sn. Rows are split into chunks of about equal nonzero count.
template <typename T>
void csr_matmul(const int32_t* crow, const int32_t* cols, const T* vals, const T* bias, const T* X, int64_t G,
                int64_t M, int64_t K, int64_t N, T* Y, int64_t sg, int64_t sr, int64_t sn, int64_t threads,
                int64_t min_work) {
  const int64_t nnz = crow[M];
  const int64_t work = std::max<int64_t>(nnz, M) * N * G;
  if (threads < 1 || work < min_work) threads = 1;
  const int64_t chunks = threads == 1 ? 1 : std::min<int64_t>(std::max<int64_t>(M, 1), threads * 4);
  std::vector<int64_t> bounds(chunks + 1, M);
  bounds[0] = 0;
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t target = nnz * c / chunks;
    bounds[c] = std::max<int64_t>(bounds[c - 1], std::lower_bound(crow, crow + M + 1, (int32_t)target) - crow);
  }
  const int64_t tasks = chunks * G;
  if (threads == 1) {
    for (int64_t t = 0; t < tasks; ++t)
      run_rows<T>(crow, cols, vals, bias, X + (t / chunks) * K * N, N, Y + (t / chunks) * sg, sr, sn,
                  bounds[t % chunks], bounds[t % chunks + 1]);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t t = 0; t < tasks; ++t)
    run_rows<T>(crow, cols, vals, bias, X + (t / chunks) * K * N, N, Y + (t / chunks) * sg, sr, sn,
                bounds[t % chunks], bounds[t % chunks + 1]);
}

// dst (C, R) = src (R, C)^T, both contiguous, in 16x16 tiles (torch's strided copy is several
// times slower for the (batch, features) -> (features, batch) transposes a linear layer needs).
template <typename T>
void transpose(const T* __restrict src, int64_t R, int64_t C, T* __restrict dst, int64_t threads) {
  constexpr int64_t TB = 16;
  const int64_t col_tiles = (C + TB - 1) / TB;
  if (R * C < 65536) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t ct = 0; ct < col_tiles; ++ct) {
    const int64_t c0 = ct * TB, c1 = std::min(C, c0 + TB);
    for (int64_t r0 = 0; r0 < R; r0 += TB) {
      const int64_t r1 = std::min(R, r0 + TB);
      if (c1 - c0 == TB && r1 - r0 == TB) {  // full tile: fixed trip counts let the compiler vectorise
        T tile[TB][TB];
        for (int64_t r = 0; r < TB; ++r)
          for (int64_t c = 0; c < TB; ++c) tile[c][r] = src[(r0 + r) * C + c0 + c];
        for (int64_t c = 0; c < TB; ++c)
          for (int64_t r = 0; r < TB; ++r) dst[(c0 + c) * R + r0 + r] = tile[c][r];
      } else {
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t r = r0; r < r1; ++r) dst[c * R + r] = src[r * C + c];
      }
    }
  }
}

#ifdef __AVX512F__
// dst[c * 16 + i] = src[i * ld + c] for a 16x16 float tile, in registers (unpack/shuffle network).
inline void transpose16x16(const float* __restrict src, int64_t ld, float* __restrict dst) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    _mm512_storeu_ps(dst + j * 16, _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88));
    _mm512_storeu_ps(dst + (8 + j) * 16, _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd));
  }
}
#endif

// xt[k * BB + i] = xb[i * K + k] for i < nb (lanes i >= nb zero): one block of examples transposed.
template <typename T, int64_t BB>
inline void transpose_block(const T* __restrict xb, int64_t nb, int64_t K, T* __restrict xt) {
  int64_t k0 = 0;
  if (nb == BB) {
#ifdef __AVX512F__
    if constexpr (std::is_same_v<T, float> && BB == 16)
      for (; k0 + 16 <= K; k0 += 16) transpose16x16(xb + k0, K, xt + k0 * BB);
#endif
    for (; k0 + BB <= K; k0 += BB)  // fixed trip counts, which the compiler vectorises
      for (int64_t i = 0; i < BB; ++i)
        for (int64_t c = 0; c < BB; ++c) xt[(k0 + c) * BB + i] = xb[i * K + k0 + c];
  }
  for (int64_t k = k0; k < K; ++k)
    for (int64_t i = 0; i < BB; ++i) xt[k * BB + i] = i < nb ? xb[i * K + k] : T(0);
}

// One block of nb <= BB examples: Y[r, b0:b0+nb] (element (r, b) at r*sr + b*sb) for all rows.
template <typename T, int64_t BB>
void linear_block(const int32_t* __restrict crow, const int32_t* __restrict cols, const T* __restrict vals,
                  const T* __restrict bias, const T* __restrict xt, int64_t nb, int64_t M, T* __restrict Y,
                  int64_t sr, int64_t sb) {
  for (int64_t r = 0; r < M; ++r) {
    T acc[BB];
    const T init = bias ? bias[r] : T(0);
    for (int64_t i = 0; i < BB; ++i) acc[i] = init;
    const int64_t hi = crow[r + 1];
    for (int64_t j = crow[r]; j < hi; ++j) {
      const T v = vals[j];
      const T* __restrict xr = xt + static_cast<int64_t>(cols[j]) * BB;
#pragma omp simd
      for (int64_t i = 0; i < BB; ++i) acc[i] += v * xr[i];
    }
    T* __restrict y = Y + r * sr;
    if (nb == BB && sb == 1) {
      for (int64_t i = 0; i < BB; ++i) y[i] = acc[i];
    } else {  // via a copy: indexing acc with a variable bound would keep it out of registers
      T out[BB];
      for (int64_t i = 0; i < BB; ++i) out[i] = acc[i];
      for (int64_t i = 0; i < nb; ++i) y[i * sb] = out[i];
    }
  }
}

// Y = W @ X^T (+ bias[:, None]) for a row-major X (B, K), the layout a linear layer's input
// usually has; Y element (r, b) at r*sr + b*sb. Examples go in blocks of BB = 16 (one AVX-512
// register of floats): the block is transposed into a thread-local xt (K, BB) (K*64 bytes for
// float: 50 KB for K = 784, L2-resident), then each row adds w_j * xt[col_j, 0:BB] over its
// nonzeros, one vector FMA per nonzero. This fuses the (B, K) -> (K, B) transpose that a separate
// pass would need into the kernel. Threads take whole blocks.
template <typename T>
void csr_linear_rows(const int32_t* crow, const int32_t* cols, const T* vals, const T* bias, const T* X, int64_t B,
                     int64_t M, int64_t K, T* Y, int64_t sr, int64_t sb, int64_t threads, int64_t min_work) {
  constexpr int64_t BB = 16;
  const int64_t blocks = (B + BB - 1) / BB;
  if (threads < 1 || (crow[M] + K) * B < min_work) threads = 1;
  threads = std::min(threads, blocks);
  auto run = [&](int64_t blk, T* xt) {
    const int64_t b0 = blk * BB, nb = std::min(BB, B - b0);
    transpose_block<T, BB>(X + b0 * K, nb, K, xt);
    linear_block<T, BB>(crow, cols, vals, bias, xt, nb, M, Y + b0 * sb, sr, sb);
  };
  static thread_local std::vector<T> buf;  // reused across calls: no allocation per call
  if (threads == 1) {
    if (static_cast<int64_t>(buf.size()) < K * BB) buf.resize(K * BB);
    for (int64_t blk = 0; blk < blocks; ++blk) run(blk, buf.data());
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    if (static_cast<int64_t>(buf.size()) < K * BB) buf.resize(K * BB);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) run(blk, buf.data());
  }
}

}  // namespace

extern "C" {
void transpose_f32(const float* src, int64_t R, int64_t C, float* dst, int64_t threads) {
  transpose<float>(src, R, C, dst, threads);
}
void transpose_f64(const double* src, int64_t R, int64_t C, double* dst, int64_t threads) {
  transpose<double>(src, R, C, dst, threads);
}
void csr_linear_rows_f32(const int32_t* crow, const int32_t* cols, const float* vals, const float* bias,
                         const float* X, int64_t B, int64_t M, int64_t K, float* Y, int64_t sr, int64_t sb,
                         int64_t threads, int64_t min_work) {
  csr_linear_rows<float>(crow, cols, vals, bias, X, B, M, K, Y, sr, sb, threads, min_work);
}
void csr_linear_rows_f64(const int32_t* crow, const int32_t* cols, const double* vals, const double* bias,
                         const double* X, int64_t B, int64_t M, int64_t K, double* Y, int64_t sr, int64_t sb,
                         int64_t threads, int64_t min_work) {
  csr_linear_rows<double>(crow, cols, vals, bias, X, B, M, K, Y, sr, sb, threads, min_work);
}
void csr_matmul_f32(const int32_t* crow, const int32_t* cols, const float* vals, const float* bias, const float* X,
                    int64_t G, int64_t M, int64_t K, int64_t N, float* Y, int64_t sg, int64_t sr, int64_t sn,
                    int64_t threads, int64_t min_work) {
  csr_matmul<float>(crow, cols, vals, bias, X, G, M, K, N, Y, sg, sr, sn, threads, min_work);
}
void csr_matmul_f64(const int32_t* crow, const int32_t* cols, const double* vals, const double* bias, const double* X,
                    int64_t G, int64_t M, int64_t K, int64_t N, double* Y, int64_t sg, int64_t sr, int64_t sn,
                    int64_t threads, int64_t min_work) {
  csr_matmul<double>(crow, cols, vals, bias, X, G, M, K, N, Y, sg, sr, sn, threads, min_work);
}
}
"""

_CXX_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]

_EXTENSION = None
_EXTENSION_ERROR: str | None = None
_LOCK = threading.Lock()

# Below this many multiply-adds a call runs on one thread. A parallel region costs more than its
# own wake-up: our OpenMP runtime's spinning worker then competes with torch's for the cores, and
# the next op pays (LeNet-300-100 at 98%, batch 64, 2 threads, in the model's chain: the ReLU after
# the 300x784 layer took 8 us instead of 4, the 100x300 layer 24 us instead of 15). Timed alone,
# each layer looked faster on 2 threads. With 32768 here the whole model ran 2.9-3.0x faster than
# dense; with 2**20, 3.4x (benchmarks/bench_sparse.py).
MIN_PARALLEL_WORK = 1 << 20


def _cache_dir() -> Path:
    root = os.environ.get("SPARSETRAIN_KERNEL_CACHE") or Path.home() / ".cache" / "sparsetrain" / "kernels"
    # -march=native code must not be reused on another CPU: key the folder by the CPU flags.
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    key = hashlib.sha1(f"{flags}|{_CXX_FLAGS}|{_CPP_SOURCE}".encode()).hexdigest()[:16]
    return Path(root) / key


def _build(folder: Path) -> Path:
    """Compile the kernel into ``folder/csr_kernel.so`` (atomically; reused when present)."""
    lib = folder / "csr_kernel.so"
    if lib.is_file():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "csr_kernel.cpp"
    tag = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp_src, tmp_lib = folder / f".src.{tag}.cpp", folder / f".lib.{tag}.so"
    try:
        tmp_src.write_text(_CPP_SOURCE)
        cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or "c++"
        proc = subprocess.run([cxx, *_CXX_FLAGS, str(tmp_src), "-o", str(tmp_lib)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-500:]}")
        os.replace(tmp_src, src)
        os.replace(tmp_lib, lib)  # two processes building at once both end with a complete file
    finally:
        tmp_src.unlink(missing_ok=True)
        tmp_lib.unlink(missing_ok=True)
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
            lib = ctypes.CDLL(str(_build(_cache_dir())))
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
        except Exception as exc:  # fall back to torch, and say why
            _EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"
            _EXTENSION = None
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
    product. LeNet-300-100 first layer (300x784, 1017 nonzeros), B = 64, 1 thread, loaded
    machine: separate tiled transpose (16 us) + kernel (10 us) -> fused 9.6 us."""
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
