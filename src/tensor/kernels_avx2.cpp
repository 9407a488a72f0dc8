// The AVX2 kernel table (with FMA and F16C): 8 floats per vector. Same structure as
// kernels_avx512.cpp (read that file's comments first); differences: 16 vector registers, so
// smaller tiles, and row tails that are not a multiple of 8 finish in scalar code.
#include <cstdint>
#include <cstring>

#include "backprompt/error.h"
#include "tensor/dtype.h"
#include "tensor/kernels_simd.h"

#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#define BP_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace backprompt::detail {

namespace {

constexpr int64_t V = 8;  // f32 lanes per vector

inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

BP_TARGET_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Loaders: 8 weights of a row starting at element k as f32 (`full`), or one (`one`).
struct LoadF32 {
  static constexpr bool Q8 = false;
  static constexpr int BYTES = 4;  // per weight
  BP_TARGET_AVX2 static __m256 full(const uint8_t* row, int64_t k) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + k);
  }
  BP_TARGET_AVX2 static float one(const uint8_t* row, int64_t k) {
    return reinterpret_cast<const float*>(row)[k];
  }
};

struct LoadF16 {
  static constexpr bool Q8 = false;
  static constexpr int BYTES = 2;  // per weight
  BP_TARGET_AVX2 static __m256 full(const uint8_t* row, int64_t k) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * k)));
  }
  BP_TARGET_AVX2 static float one(const uint8_t* row, int64_t k) {
    uint16_t h;
    std::memcpy(&h, row + 2 * k, sizeof h);
    return _cvtsh_ss(h);
  }
};

struct LoadBF16 {
  static constexpr bool Q8 = false;
  static constexpr int BYTES = 2;  // per weight
  BP_TARGET_AVX2 static __m256 full(const uint8_t* row, int64_t k) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  BP_TARGET_AVX2 static float one(const uint8_t* row, int64_t k) {
    uint16_t h;
    std::memcpy(&h, row + 2 * k, sizeof h);
    return bf16_to_f32(h);
  }
};

// Software prefetch of the same position in the next group of ROW_GROUP rows, as in
// kernels_avx512.cpp (measured there: it takes single-thread decode to the memory bandwidth).
constexpr int64_t ROW_GROUP = 8;

inline void prefetch(const uint8_t* p, int64_t ahead) {  // an address, not a pointer into a row
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(ahead)), _MM_HINT_T0);
}

struct LoadQ8_0 {
  static constexpr bool Q8 = true;
  BP_TARGET_AVX2 static __m256 scale(const uint8_t* row, int64_t b) {
    return _mm256_set1_ps(_cvtsh_ss(reinterpret_cast<const BlockQ8_0*>(row)[b].d));
  }
  // Values [8 * s, 8 * s + 8) of block b, times the block's scale d.
  BP_TARGET_AVX2 static __m256 part(const uint8_t* row, int64_t b, int s, __m256 d) {
    const int8_t* q = reinterpret_cast<const BlockQ8_0*>(row)[b].q + V * s;
    const __m256i qi = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
    return _mm256_mul_ps(d, _mm256_cvtepi32_ps(qi));
  }
};

// y[j * ldy + i] = dot(row i of w, x row j) for i < RW, j < NX; x rows are ldx apart.
template <class L, int RW, int NX>
BP_TARGET_AVX2 void tile(const uint8_t* const* w, const float* x, int64_t ldx, int64_t n_in,
                         float* y, int64_t ldy, int64_t ahead) {
  __m256 acc[RW][NX];
#pragma GCC unroll 8
  for (int i = 0; i < RW; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NX; ++j) acc[i][j] = _mm256_setzero_ps();
  }
  int64_t k = 0;
  if constexpr (L::Q8) {
    const int64_t n_blocks = n_in / Q8_0_BLOCK;
    for (int64_t b = 0; b < n_blocks; ++b) {
      __m256 d[RW];
#pragma GCC unroll 8
      for (int i = 0; i < RW; ++i) d[i] = L::scale(w[i], b);
#pragma GCC unroll 8
      for (int i = 0; i < RW; ++i) prefetch(w[i] + b * sizeof(BlockQ8_0), ahead);
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) {
        __m256 xv[NX];
#pragma GCC unroll 4
        for (int j = 0; j < NX; ++j) xv[j] = _mm256_loadu_ps(x + j * ldx + b * Q8_0_BLOCK + s * V);
#pragma GCC unroll 8
        for (int i = 0; i < RW; ++i) {
          const __m256 wv = L::part(w[i], b, s, d[i]);
#pragma GCC unroll 4
          for (int j = 0; j < NX; ++j) acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]);
        }
      }
    }
    k = n_in;
  } else {
    for (; k + V <= n_in; k += V) {
      __m256 xv[NX];
#pragma GCC unroll 4
      for (int j = 0; j < NX; ++j) xv[j] = _mm256_loadu_ps(x + j * ldx + k);
#pragma GCC unroll 8
      for (int i = 0; i < RW; ++i) {
        prefetch(w[i] + k * L::BYTES, ahead);
        const __m256 wv = L::full(w[i], k);
#pragma GCC unroll 4
        for (int j = 0; j < NX; ++j) acc[i][j] = _mm256_fmadd_ps(wv, xv[j], acc[i][j]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < RW; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NX; ++j) {
      float sum = hsum(acc[i][j]);
      if constexpr (!L::Q8) {
        for (int64_t t = k; t < n_in; ++t) sum += L::one(w[i], t) * x[j * ldx + t];
      }
      y[j * ldy + i] = sum;
    }
  }
}

// n_rows (<= 8) weight rows starting at r times NX activation rows, in tiles that fit the 16
// registers: RW * NX accumulators + NX activation vectors + one weight vector.
template <class L, int NX>
BP_TARGET_AVX2 void rows_times_x(const MatrixView& w, int64_t r, int64_t n_rows, const float* x,
                                 float* y) {
  constexpr int RW = NX == 1 ? 8 : NX == 2 ? 4 : 2;
  const uint8_t* rows[ROW_GROUP];
  for (int64_t i = 0; i < n_rows; ++i) rows[i] = w.row(r + i);
  int64_t i = 0;
  const int64_t ahead = ROW_GROUP * static_cast<int64_t>(w.row_bytes());
  for (; i + RW <= n_rows; i += RW) tile<L, RW, NX>(rows + i, x, w.n_in, w.n_in, y + i, w.n_out, ahead);
  for (; i < n_rows; ++i) tile<L, 1, NX>(rows + i, x, w.n_in, w.n_in, y + i, w.n_out, ahead);
}

// dot(row, x) for one activation row, the row read front to back with four accumulators (as
// row_dot in kernels_avx512.cpp: q8_0 rows under ROW_DOT_MAX_BYTES, and the rows left over after
// rows4_dot's quarters).

template <class L>
BP_TARGET_AVX2 float row_dot(const uint8_t* row, const float* x, int64_t n_in) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  if constexpr (L::Q8) {
    for (int64_t b = 0; b < n_in / Q8_0_BLOCK; ++b) {
      const __m256 d = L::scale(row, b);
      const float* xb = x + b * Q8_0_BLOCK;
      a0 = _mm256_fmadd_ps(L::part(row, b, 0, d), _mm256_loadu_ps(xb), a0);
      a1 = _mm256_fmadd_ps(L::part(row, b, 1, d), _mm256_loadu_ps(xb + V), a1);
      a2 = _mm256_fmadd_ps(L::part(row, b, 2, d), _mm256_loadu_ps(xb + 2 * V), a2);
      a3 = _mm256_fmadd_ps(L::part(row, b, 3, d), _mm256_loadu_ps(xb + 3 * V), a3);
    }
    k = n_in;
  } else {
    for (; k + 4 * V <= n_in; k += 4 * V) {
      a0 = _mm256_fmadd_ps(L::full(row, k), _mm256_loadu_ps(x + k), a0);
      a1 = _mm256_fmadd_ps(L::full(row, k + V), _mm256_loadu_ps(x + k + V), a1);
      a2 = _mm256_fmadd_ps(L::full(row, k + 2 * V), _mm256_loadu_ps(x + k + 2 * V), a2);
      a3 = _mm256_fmadd_ps(L::full(row, k + 3 * V), _mm256_loadu_ps(x + k + 3 * V), a3);
    }
    for (; k + V <= n_in; k += V) a0 = _mm256_fmadd_ps(L::full(row, k), _mm256_loadu_ps(x + k), a0);
  }
  float sum = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  if constexpr (!L::Q8) {
    for (; k < n_in; ++k) sum += L::one(row, k) * x[k];
  }
  return sum;
}

// y[r[s]] = dot(row r[s], x) for four rows a quarter of a thread's share apart, each read front
// to back and prefetched ROWS4_PREFETCH_BYTES ahead (as rows4_dot in kernels_avx512.cpp: four
// long streams per thread). The prefetch, alternating decode runs with BACKPROMPT_ISA=avx2 on an
// AVX-512 machine, 3-4 pairs, tok/s: llama-110m f32 74-84 -> 89-94, f16 117-124 -> 124-126.
template <class L>
BP_TARGET_AVX2 void rows4_dot(const MatrixView& w, const int64_t* r, const float* x, float* y) {
  const uint8_t* row[4] = {w.row(r[0]), w.row(r[1]), w.row(r[2]), w.row(r[3])};
  const int64_t n_in = w.n_in;
  __m256 a[4][2];
#pragma GCC unroll 4
  for (int s = 0; s < 4; ++s) a[s][0] = a[s][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 2 * V <= n_in; k += 2 * V) {
    const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + V);
    // This step reads 2 * V * BYTES bytes of each row: one cache line (f32) or half of one.
    const bool new_line = (k * L::BYTES) % 64 == 0;
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) {
      if (new_line) prefetch(row[s] + k * L::BYTES, ROWS4_PREFETCH_BYTES);
      a[s][0] = _mm256_fmadd_ps(L::full(row[s], k), x0, a[s][0]);
      a[s][1] = _mm256_fmadd_ps(L::full(row[s], k + V), x1, a[s][1]);
    }
  }
  for (; k + V <= n_in; k += V) {
    const __m256 xv = _mm256_loadu_ps(x + k);
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) a[s][0] = _mm256_fmadd_ps(L::full(row[s], k), xv, a[s][0]);
  }
#pragma GCC unroll 4
  for (int s = 0; s < 4; ++s) {
    float sum = hsum(_mm256_add_ps(a[s][0], a[s][1]));
    for (int64_t t = k; t < n_in; ++t) sum += L::one(row[s], t) * x[t];
    y[r[s]] = sum;
  }
}

template <class L>
BP_TARGET_AVX2 void matvec_typed(const MatrixView& w, const float* x, int64_t n, float* y,
                                 int64_t r0, int64_t r1) {
  if constexpr (!L::Q8) {
    if (n == 1) {
      rows_in_quarters(
          r0, r1, [&](const int64_t* r) { rows4_dot<L>(w, r, x, y); },
          [&](int64_t r) { y[r] = row_dot<L>(w.row(r), x, w.n_in); });
      return;
    }
  }
  if (n == 1 && w.row_bytes() < ROW_DOT_MAX_BYTES) {
    for (int64_t r = r0; r < r1; ++r) y[r] = row_dot<L>(w.row(r), x, w.n_in);
    return;
  }
  for (int64_t r = r0; r < r1; r += ROW_GROUP) {
    const int64_t n_rows = min_i64(ROW_GROUP, r1 - r);
    for (int64_t j = 0; j < n; j += 4) {
      const float* xj = x + j * w.n_in;  // [nx][n_in]
      float* yj = y + j * w.n_out + r;   // [nx][n_out], from column r
      switch (min_i64(4, n - j)) {
        case 1: rows_times_x<L, 1>(w, r, n_rows, xj, yj); break;
        case 2: rows_times_x<L, 2>(w, r, n_rows, xj, yj); break;
        case 3: rows_times_x<L, 3>(w, r, n_rows, xj, yj); break;
        default: rows_times_x<L, 4>(w, r, n_rows, xj, yj); break;
      }
    }
  }
}

BP_TARGET_AVX2 void matvec_avx2(const MatrixView& w, const float* x, int64_t n, float* y,
                                int64_t r0, int64_t r1) {
  switch (w.type) {
    case DType::F32: matvec_typed<LoadF32>(w, x, n, y, r0, r1); return;
    case DType::F16: matvec_typed<LoadF16>(w, x, n, y, r0, r1); return;
    case DType::BF16: matvec_typed<LoadBF16>(w, x, n, y, r0, r1); return;
    case DType::Q8_0: matvec_typed<LoadQ8_0>(w, x, n, y, r0, r1); return;
  }
  BP_ASSERT(false && "unknown dtype");
}

template <class L>
BP_TARGET_AVX2 void dequantize_elem(const void* src, float* dst, int64_t n) {
  const auto* row = static_cast<const uint8_t*>(src);
  int64_t k = 0;
  for (; k + V <= n; k += V) _mm256_storeu_ps(dst + k, L::full(row, k));
  for (; k < n; ++k) dst[k] = L::one(row, k);
}

BP_TARGET_AVX2 void dequantize_row_avx2(DType t, const void* src, float* dst, int64_t n) {
  BP_ASSERT(n >= 0 && n % dtype_block_size(t) == 0);
  switch (t) {
    case DType::F32: std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float)); return;
    case DType::F16: dequantize_elem<LoadF16>(src, dst, n); return;
    case DType::BF16: dequantize_elem<LoadBF16>(src, dst, n); return;
    case DType::Q8_0: {
      const auto* row = static_cast<const uint8_t*>(src);
      for (int64_t b = 0; b < n / Q8_0_BLOCK; ++b) {
        const __m256 d = LoadQ8_0::scale(row, b);
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s) {
          _mm256_storeu_ps(dst + b * Q8_0_BLOCK + s * V, LoadQ8_0::part(row, b, s, d));
        }
      }
      return;
    }
  }
  BP_ASSERT(false && "unknown dtype");
}

const KernelIsa AVX2 = {"avx2", matvec_avx2, dequantize_row_avx2, attention_tile_portable,
                        silu_mul_portable, gelu_tanh_portable, rms_norm_row_portable, layer_norm_row_portable,
                        rotate_pairs_portable, add_to_portable, nullptr, nullptr};

}  // namespace

const KernelIsa* kernel_isa_avx2() {
  __builtin_cpu_init();
  const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  cpu_has_f16c();
  return ok ? &AVX2 : nullptr;
}

}  // namespace backprompt::detail

#else  // not x86

namespace backprompt::detail {
const KernelIsa* kernel_isa_avx2() { return nullptr; }
}  // namespace backprompt::detail

#endif
