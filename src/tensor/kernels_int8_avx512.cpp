// DecodePrecision::INT8 products with AVX512-VNNI (compiled like kernels_avx512.cpp: target
// attributes, handed out only when the CPU has the instructions).
//
// q8_0 weights times activation rows quantized the same way (QuantizedRows): for each pair of
// blocks, one vector holds both blocks' 64 int8 weights, and VNNI's dpbusd sums the products four
// at a time into 16 int32 lanes, 8 per block. dpbusd multiplies unsigned by signed bytes, so the
// activations are stored as u = q + 128 and 128 x (the weights' sum), from a second dpbusd, is
// taken away: exact integers, at most 4 x 255 x 128 per lane. The lanes are then converted to f32
// and scaled by d_weight x d_activation of their block. Per 64 weights that is about 10
// instructions, where converting the weights to f32 exactly (kernels_avx512.cpp) takes about 19;
// measured on a 2-core AVX-512 VM, one thread, 0.2-0.5 MB of rows in cache: 54-56 GB/s of q8_0
// rows against 27-29 for the exact conversion, so decode can run at the memory's bandwidth.
#include <cstdint>

#include "backprompt/error.h"
#include "tensor/dtype.h"
#include "tensor/kernels_simd.h"

#if defined(__x86_64__) || defined(__i386__)

#include "tensor/kernels_avx512_math.h"

namespace backprompt::detail {

#define BP_TARGET_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512vnni")))

namespace {

// Blocks b and b + 1 of a weight row: their 64 weights (block b in the low half), 128 x the sum of
// each lane's four weights (the offset to take away), and each lane's block scale.
struct BlockPair {
  __m512i q, bias;
  __m512 dw;
};

BP_TARGET_AVX512_VNNI inline BlockPair block_pair(const BlockQ8_0* w, int64_t b) {
  BlockPair p;
  p.q = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[b].q))),
                           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[b + 1].q)), 1);
  p.bias = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(static_cast<char>(0x80)), p.q);
  p.dw = _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi16(static_cast<short>(w[b].d))),
                                                 _mm_set1_epi16(static_cast<short>(w[b + 1].d)), 1));
  return p;
}

// acc + d_w d_x (the lane's sum of q_w q_x) for pair p at block b of one activation row (its
// bytes u and block scales d).
BP_TARGET_AVX512_VNNI inline __m512 pair_dot(const BlockPair& p, const uint8_t* u, const float* d, int64_t b, __m512 acc) {
  const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(u + b * Q8_0_BLOCK), p.q);
  const __m512 dx = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(d[b])), _mm256_set1_ps(d[b + 1]), 1);
  return _mm512_fmadd_ps(_mm512_mul_ps(p.dw, dx), _mm512_cvtepi32_ps(_mm512_sub_epi32(s, p.bias)), acc);
}

// The same for block b alone (a row's odd block out), in 8 lanes.
BP_TARGET_AVX512_VNNI inline __m512 block_dot(const BlockQ8_0* w, int64_t b, const uint8_t* u, const float* d, __m512 acc) {
  const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[b].q));
  const __m256i bias = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(static_cast<char>(0x80)), q);
  const __m256 dw = _mm256_cvtph_ps(_mm_set1_epi16(static_cast<short>(w[b].d)));
  const __m256i s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + b * Q8_0_BLOCK)), q);
  const __m256 part = _mm256_mul_ps(_mm256_mul_ps(dw, _mm256_set1_ps(d[b])), _mm256_cvtepi32_ps(_mm256_sub_epi32(s, bias)));
  return _mm512_add_ps(acc, _mm512_zextps256_ps512(part));
}

// One weight row (n_blocks q8_0 blocks) times activation rows j0 ... j0 + NX - 1 of x:
// y[j * ldy] for j < NX.
template <int NX>
BP_TARGET_AVX512_VNNI void row_times_q8(const BlockQ8_0* w, const QuantizedRows& x, int64_t j0, int64_t n_blocks, float* y,
                                        int64_t ldy) {
  const uint8_t* u[NX];
  const float* d[NX];
  __m512 acc[NX];
#pragma GCC unroll 4
  for (int j = 0; j < NX; ++j) {
    u[j] = x.u.data() + (j0 + j) * x.n_in;
    d[j] = x.d.data() + (j0 + j) * n_blocks;
    acc[j] = _mm512_setzero_ps();
  }
  int64_t b = 0;
  for (; b + 2 <= n_blocks; b += 2) {
    const BlockPair p = block_pair(w, b);
#pragma GCC unroll 4
    for (int j = 0; j < NX; ++j) acc[j] = pair_dot(p, u[j], d[j], b, acc[j]);
  }
  if (b < n_blocks) {
#pragma GCC unroll 4
    for (int j = 0; j < NX; ++j) acc[j] = block_dot(w, b, u[j], d[j], acc[j]);
  }
#pragma GCC unroll 4
  for (int j = 0; j < NX; ++j) y[j * ldy] = _mm512_reduce_add_ps(acc[j]);
}

// Four weight rows times activation row 0 of x: y[r[s]] for s < 4. Called with rows a quarter of
// a thread's share apart (rows_in_quarters), so that the thread reads four streams, each
// prefetched ROWS4_PREFETCH_BYTES ahead, as kernels_avx512.cpp's rows4_dot does for f32, f16 and
// bf16: one stream per thread read 24.5 GB/s from memory on a 2-core AVX-512 VM (1 thread, 500 MB
// of 768-wide rows), where the kernel itself runs at 43 in cache. Each row's sums are those
// row_times_q8<1> makes.
BP_TARGET_AVX512_VNNI void rows4_q8(const MatrixView& w, const int64_t* r, const QuantizedRows& x, float* y) {
  const int64_t n_blocks = w.n_in / Q8_0_BLOCK;
  const BlockQ8_0* row[4];
  __m512 acc[4];
#pragma GCC unroll 4
  for (int s = 0; s < 4; ++s) {
    row[s] = reinterpret_cast<const BlockQ8_0*>(w.row(r[s]));
    acc[s] = _mm512_setzero_ps();
  }
  const uint8_t* u = x.u.data();
  const float* d = x.d.data();
  int64_t b = 0;
  for (; b + 2 <= n_blocks; b += 2) {
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) {
      // This step reads 68 bytes of the row: two prefetches cover them.
      const auto* at = reinterpret_cast<const char*>(row[s] + b) + ROWS4_PREFETCH_BYTES;
      _mm_prefetch(at, _MM_HINT_T0);
      _mm_prefetch(at + 64, _MM_HINT_T0);
      acc[s] = pair_dot(block_pair(row[s], b), u, d, b, acc[s]);
    }
  }
  if (b < n_blocks) {
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) acc[s] = block_dot(row[s], b, u, d, acc[s]);
  }
#pragma GCC unroll 4
  for (int s = 0; s < 4; ++s) y[r[s]] = _mm512_reduce_add_ps(acc[s]);
}

}  // namespace

void matvec_q8_int8_avx512(const MatrixView& w, const QuantizedRows& x, float* y, int64_t r0, int64_t r1) {
  BP_ASSERT(w.type == DType::Q8_0 && x.n_in == w.n_in);
  const int64_t n_blocks = w.n_in / Q8_0_BLOCK;
  if (x.n == 1) {
    rows_in_quarters(
        r0, r1, [&](const int64_t* r) { rows4_q8(w, r, x, y); },
        [&](int64_t r) { row_times_q8<1>(reinterpret_cast<const BlockQ8_0*>(w.row(r)), x, 0, n_blocks, y + r, w.n_out); });
    return;
  }
  // Each weight row times the activation rows 4 at a time (the row stays in L1 between them).
  for (int64_t r = r0; r < r1; ++r) {
    const auto* row = reinterpret_cast<const BlockQ8_0*>(w.row(r));
    for (int64_t j = 0; j < x.n; j += 4) {
      float* yj = y + j * w.n_out + r;
      switch (x.n - j) {
        case 1: row_times_q8<1>(row, x, j, n_blocks, yj, w.n_out); break;
        case 2: row_times_q8<2>(row, x, j, n_blocks, yj, w.n_out); break;
        case 3: row_times_q8<3>(row, x, j, n_blocks, yj, w.n_out); break;
        default: row_times_q8<4>(row, x, j, n_blocks, yj, w.n_out); break;
      }
    }
  }
}

// 16 values v times inv, rounded to nearest even, clamped to +-127, plus 128, as bytes.
static BP_TARGET_AVX512_VNNI inline __m128i quantized16(__m512 v, __m512 inv) {
  const __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(v, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 clamped = _mm512_min_ps(_mm512_set1_ps(127.0f), _mm512_max_ps(_mm512_set1_ps(-127.0f), q));
  return _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(clamped), _mm512_set1_epi32(128)));
}

// quantize_rows_q8's rule with the same f32 operations (so the same results): per block, the
// largest |x|, inv = 127 / it, q = x inv rounded to nearest even and clamped to +-127.
BP_TARGET_AVX512_VNNI void quantize_rows_q8_avx512(const float* x, int64_t n, int64_t n_in, QuantizedRows& out) {
  const int64_t n_blocks = out.reset(n, n_in);
  for (int64_t k = 0; k < n * n_blocks; ++k) {
    const float* xb = x + k * Q8_0_BLOCK;
    uint8_t* ub = out.u.data() + k * Q8_0_BLOCK;
    const __m512 a = _mm512_loadu_ps(xb), b = _mm512_loadu_ps(xb + 16);
    // Finite lanes: |v| <= FLT_MAX (false for infinities and NaN).
    const __m512 flt_max = _mm512_set1_ps(3.40282347e38f);
    const __mmask16 fa = _mm512_cmp_ps_mask(_mm512_abs_ps(a), flt_max, _CMP_LE_OQ);
    const __mmask16 fb = _mm512_cmp_ps_mask(_mm512_abs_ps(b), flt_max, _CMP_LE_OQ);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    if (fa != 0xFFFF || fb != 0xFFFF || amax == 0.0f) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ub), _mm256_set1_epi8(static_cast<char>(0x80)));
      out.d[static_cast<size_t>(k)] = fa != 0xFFFF || fb != 0xFFFF ? __builtin_nanf("") : 0.0f;
      continue;
    }
    const __m512 inv = _mm512_set1_ps(127.0f / amax);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(ub), quantized16(a, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(ub + 16), quantized16(b, inv));
    out.d[static_cast<size_t>(k)] = amax / 127.0f;
  }
}

bool cpu_has_avx512_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni");
}

}  // namespace backprompt::detail

#else  // not x86

namespace backprompt::detail {
bool cpu_has_avx512_vnni() { return false; }
}  // namespace backprompt::detail

#endif
