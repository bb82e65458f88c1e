// sparsetrain's CSR kernels: Y[g] = W @ X[g] (+ bias) with W in compressed sparse row form
// (32-bit indices), a fused transpose-and-multiply for row-major Linear inputs, and a tiled
// transpose. Plain C++17 with OpenMP, no torch headers (so it compiles in about a second),
// called through ctypes with raw pointers by sparsetrain/sparse/kernels.py, which checks shapes,
// dtypes and contiguity before every call and compiles this file on first use with
//   g++ -O3 -march=native -fopenmp -shared -fPIC -std=c++17
// Measurements behind the design choices below: docs/sparse.md, "Measurement history".
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
// 98% (37 nonzeros per row), batch 64, one thread: 17 us -> 10.5 us (docs/sparse.md). (A
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
