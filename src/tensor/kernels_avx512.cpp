// The AVX-512 kernel table (F, BW, VL, DQ with FMA and F16C): 16 floats per vector.
//
// Compiled without -march flags: every function that uses these instructions carries
// BP_TARGET_AVX512, and kernel_isa_avx512() hands the table out only when the running CPU has
// them. Keep standard-library templates out of the target functions (their instantiations
// would be shared with generic code); tile loops use their own small helpers.
//
// Decode matvec, one activation row: f32, f16 and bf16 weights are read as four long sequential
// streams per thread (the thread's rows cut into quarters, one row of each summed side by side,
// each row front to back); q8_0 rows too, two blocks per step (q8_rows4_dot). Otherwise (several
// activation rows) a tile of RW weight rows times NX activation rows keeps
// RW * NX vector accumulators in registers; each weight vector is loaded (and converted to f32)
// once per tile and used NX times. Weight values are converted exactly (f16, bf16 -> f32 are exact; a Q8_0
// value d * q is exact in f32), so the only rounding is in the f32 sums.
#include <cstdint>
#include <cstring>
#include <vector>

#include "backprompt/error.h"
#include "tensor/dtype.h"
#include "tensor/kernels_simd.h"

#if defined(__x86_64__) || defined(__i386__)

#include "tensor/kernels_avx512_math.h"

namespace backprompt::detail {

namespace {

constexpr int64_t V = 16;  // f32 lanes per vector

inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

BP_TARGET_AVX512 inline __mmask16 tail_mask(int64_t n_left) {
  return static_cast<__mmask16>((1u << n_left) - 1);  // n_left in [1, 15]
}

// Loaders: 16 weights of a row starting at element k, as f32. `part` loads the first lanes of
// `m` and zeroes the rest (masked loads never touch memory past the row).
struct LoadF32 {
  static constexpr bool Q8 = false;
  static constexpr int BYTES = 4;  // per weight
  BP_TARGET_AVX512 static __m512 full(const uint8_t* row, int64_t k) {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + k);
  }
  BP_TARGET_AVX512 static __m512 part(const uint8_t* row, int64_t k, __mmask16 m) {
    return _mm512_maskz_loadu_ps(m, reinterpret_cast<const float*>(row) + k);
  }
};

struct LoadF16 {
  static constexpr bool Q8 = false;
  static constexpr int BYTES = 2;  // per weight
  BP_TARGET_AVX512 static __m512 full(const uint8_t* row, int64_t k) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * k)));
  }
  BP_TARGET_AVX512 static __m512 part(const uint8_t* row, int64_t k, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, row + 2 * k));
  }
};

struct LoadBF16 {
  static constexpr bool Q8 = false;
  static constexpr int BYTES = 2;  // per weight
  BP_TARGET_AVX512 static __m512 widen(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  BP_TARGET_AVX512 static __m512 full(const uint8_t* row, int64_t k) {
    return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * k)));
  }
  BP_TARGET_AVX512 static __m512 part(const uint8_t* row, int64_t k, __mmask16 m) {
    return widen(_mm256_maskz_loadu_epi16(m, row + 2 * k));
  }
};

// Software prefetch: while a group of 8 weight rows is read (8 interleaved streams), each load
// also prefetches the same position in the next group of rows, i.e. ROW_GROUP * row_bytes further
// in memory (rows are contiguous). The hardware prefetchers alone leave q8_0 rows, read 34 bytes
// at a time, latency-bound: measured on a 2-core AVX-512 machine, one thread, 67 MB of 768-wide
// rows, q8_0 went from 12 to 33 GB/s. Prefetches never fault, even past the matrix's end.
constexpr int64_t ROW_GROUP = 8;

inline void prefetch(const uint8_t* p, int64_t ahead) {  // an address, not a pointer into a row
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(ahead)), _MM_HINT_T0);
}

struct LoadQ8_0 {
  static constexpr bool Q8 = true;
  BP_TARGET_AVX512 static __m512 scale(const uint8_t* row, int64_t b) {
    const uint16_t* d = &reinterpret_cast<const BlockQ8_0*>(row)[b].d;
    return _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(*d)));
  }
  // Values [16 * s, 16 * s + 16) of block b, without the scale.
  BP_TARGET_AVX512 static __m512 values(const uint8_t* row, int64_t b, int s) {
    const int8_t* q = reinterpret_cast<const BlockQ8_0*>(row)[b].q + V * s;
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
  }
  // Values [16 * s, 16 * s + 16) of block b, times the block's scale d.
  BP_TARGET_AVX512 static __m512 half(const uint8_t* row, int64_t b, int s, __m512 d) {
    const int8_t* q = reinterpret_cast<const BlockQ8_0*>(row)[b].q + V * s;
    const __m512i qi = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    return _mm512_mul_ps(d, _mm512_cvtepi32_ps(qi));
  }
};

// y[j * ldy + i] = dot(row i of w, x row j) for i < RW, j < NX; x rows are ldx apart.
template <class L, int RW, int NX>
BP_TARGET_AVX512 void tile(const uint8_t* const* w, const float* x, int64_t ldx, int64_t n_in,
                           float* y, int64_t ldy, int64_t ahead) {
  __m512 acc[RW][NX];  // in registers once unrolled
#pragma GCC unroll 8
  for (int i = 0; i < RW; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NX; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  if constexpr (L::Q8) {
    // Per block: the 32 products q_k x_k summed in f32, then scaled by the block's d once.
    const int64_t n_blocks = n_in / Q8_0_BLOCK;
    for (int64_t b = 0; b < n_blocks; ++b) {
#pragma GCC unroll 8
      for (int i = 0; i < RW; ++i) prefetch(w[i] + b * sizeof(BlockQ8_0), ahead);
      __m512 x0[NX], x1[NX];
#pragma GCC unroll 4
      for (int j = 0; j < NX; ++j) {
        x0[j] = _mm512_loadu_ps(x + j * ldx + b * Q8_0_BLOCK);
        x1[j] = _mm512_loadu_ps(x + j * ldx + b * Q8_0_BLOCK + V);
      }
#pragma GCC unroll 8
      for (int i = 0; i < RW; ++i) {
        const __m512 d = L::scale(w[i], b);
        const __m512 q0 = L::values(w[i], b, 0), q1 = L::values(w[i], b, 1);
#pragma GCC unroll 4
        for (int j = 0; j < NX; ++j) {
          acc[i][j] = _mm512_fmadd_ps(d, _mm512_fmadd_ps(q1, x1[j], _mm512_mul_ps(q0, x0[j])), acc[i][j]);
        }
      }
    }
  } else {
    int64_t k = 0;
    for (; k + V <= n_in; k += V) {
      __m512 xv[NX];
#pragma GCC unroll 4
      for (int j = 0; j < NX; ++j) xv[j] = _mm512_loadu_ps(x + j * ldx + k);
#pragma GCC unroll 8
      for (int i = 0; i < RW; ++i) {
        prefetch(w[i] + k * L::BYTES, ahead);
        const __m512 wv = L::full(w[i], k);
#pragma GCC unroll 4
        for (int j = 0; j < NX; ++j) acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
      }
    }
    if (k < n_in) {
      const __mmask16 m = tail_mask(n_in - k);
      __m512 xv[NX];
#pragma GCC unroll 4
      for (int j = 0; j < NX; ++j) xv[j] = _mm512_maskz_loadu_ps(m, x + j * ldx + k);
#pragma GCC unroll 8
      for (int i = 0; i < RW; ++i) {
        const __m512 wv = L::part(w[i], k, m);
#pragma GCC unroll 4
        for (int j = 0; j < NX; ++j) acc[i][j] = _mm512_fmadd_ps(wv, xv[j], acc[i][j]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < RW; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NX; ++j) y[j * ldy + i] = _mm512_reduce_add_ps(acc[i][j]);
  }
}

// n_rows (<= 8) weight rows starting at r, times NX activation rows: tiles of RW rows, then
// single rows. One activation row gets 8-row tiles (8 independent FMA chains); more get 4.
template <class L, int NX>
BP_TARGET_AVX512 void rows_times_x(const MatrixView& w, int64_t r, int64_t n_rows, const float* x,
                                   float* y) {
  constexpr int RW = NX == 1 ? 8 : 4;
  const uint8_t* rows[ROW_GROUP];
  for (int64_t i = 0; i < n_rows; ++i) rows[i] = w.row(r + i);
  int64_t i = 0;
  const int64_t ahead = ROW_GROUP * static_cast<int64_t>(w.row_bytes());
  for (; i + RW <= n_rows; i += RW) tile<L, RW, NX>(rows + i, x, w.n_in, w.n_in, y + i, w.n_out, ahead);
  for (; i < n_rows; ++i) tile<L, 1, NX>(rows + i, x, w.n_in, w.n_in, y + i, w.n_out, ahead);
}

// acc + d_b * (the 32 products of block b with x's values at the same positions).
BP_TARGET_AVX512 inline __m512 q8_block_dot(const uint8_t* row, int64_t b, const float* x, __m512 acc) {
  const float* xb = x + b * Q8_0_BLOCK;
  const __m512 sum = _mm512_fmadd_ps(LoadQ8_0::values(row, b, 1), _mm512_loadu_ps(xb + V),
                                     _mm512_mul_ps(LoadQ8_0::values(row, b, 0), _mm512_loadu_ps(xb)));
  return _mm512_fmadd_ps(LoadQ8_0::scale(row, b), sum, acc);
}

// dot(row, x) over n_in values, summed in four vector accumulators (blocks b % 4 for Q8_0).
// Reading a row front to back and then the next one makes a thread's reads one sequential
// stream, which the hardware prefetchers follow across rows, where 8-row tiles read 8 streams
// each only a row long. Measured on a 2-core AVX-512 VM, from memory: 1 GiB of 2048-wide f16 rows
// (4 KiB), 8-row tiles read 47-54 GB/s with two threads and 26-28 with one, this order 64-81
// and 39; decode of llama-110m f16 and bf16 (rows of 1.5 and 4 KiB) went from 210-236 to
// 270-288 tok/s, gpt2-124m f32 from 102-109 to 121. With rows of 8 KiB (tinyllama-1.1b f32)
// the tiles did as well or better (decode 5.7-9.5 vs 6.4-7.2 tok/s in alternating runs). Used
// for the rows the four-stream order leaves over (rows4_dot, q8_rows4_dot).
template <class L>
BP_TARGET_AVX512 float row_dot(const uint8_t* row, const float* x, int64_t n_in) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  if constexpr (L::Q8) {
    const int64_t n_blocks = n_in / Q8_0_BLOCK;
    int64_t b = 0;
    for (; b + 4 <= n_blocks; b += 4) {
      a0 = q8_block_dot(row, b, x, a0);
      a1 = q8_block_dot(row, b + 1, x, a1);
      a2 = q8_block_dot(row, b + 2, x, a2);
      a3 = q8_block_dot(row, b + 3, x, a3);
    }
    for (; b < n_blocks; ++b) a0 = q8_block_dot(row, b, x, a0);
  } else {
    int64_t k = 0;
    for (; k + 4 * V <= n_in; k += 4 * V) {
      a0 = _mm512_fmadd_ps(L::full(row, k), _mm512_loadu_ps(x + k), a0);
      a1 = _mm512_fmadd_ps(L::full(row, k + V), _mm512_loadu_ps(x + k + V), a1);
      a2 = _mm512_fmadd_ps(L::full(row, k + 2 * V), _mm512_loadu_ps(x + k + 2 * V), a2);
      a3 = _mm512_fmadd_ps(L::full(row, k + 3 * V), _mm512_loadu_ps(x + k + 3 * V), a3);
    }
    for (; k + V <= n_in; k += V) a0 = _mm512_fmadd_ps(L::full(row, k), _mm512_loadu_ps(x + k), a0);
    if (k < n_in) {
      const __mmask16 m = tail_mask(n_in - k);
      a1 = _mm512_fmadd_ps(L::part(row, k, m), _mm512_maskz_loadu_ps(m, x + k), a1);
    }
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

// y[r[s]] = dot(row r[s], x) for four f32, f16 or bf16 rows, each read front to back with two
// accumulators (q8_0: q8_rows4_dot).
// Called with rows a quarter of a thread's share apart, so each of the four is a stream that
// runs on across rows. Measured on a 2-core AVX-512 VM, 1 GiB of f32 rows from memory, two
// threads: 73-83 GB/s (one thread 42) where one stream read 59-70 (27) and 8-row tiles 62-69
// (30). Decode, alternating runs against one stream / tiles: llama-110m f32 84-93 -> 96-99
// tok/s, tinyllama f16 15.0-16.5 -> 17.6-19.1, tinyllama f32 even (7.9-9.4 vs 8.1-8.5). q8_0
// rows take q8_rows4_dot.
//
// Each stream also prefetches ROWS4_PREFETCH_BYTES ahead of its reads (past a row's end that is
// the start of the stream's next row): a thread's share of one of llama-110m's matrices is
// 1.2-3 MB, and the hardware prefetchers take part of every such run to pick the streams up.
// Alternating decode runs, 3 pairs each, tok/s: llama-110m f32 113-124 -> 127-139, f16 182-193
// -> 189-200, bf16 193-200 -> 197-206, tinyllama f16 19-24 -> 20-29, tinyllama f32 (8 KiB rows)
// 14.2-14.4 -> 16.4 (two pairs; a third, in a slow minute, 9.8 -> 13.0); 512 bytes ahead did worse
// than 1024, 2048 and 4096 no better.
template <class L>
BP_TARGET_AVX512 void rows4_dot(const MatrixView& w, const int64_t* r, const float* x, float* y) {
  const uint8_t* row[4] = {w.row(r[0]), w.row(r[1]), w.row(r[2]), w.row(r[3])};
  const int64_t n_in = w.n_in;
  __m512 a[4][2];
#pragma GCC unroll 4
  for (int s = 0; s < 4; ++s) a[s][0] = a[s][1] = _mm512_setzero_ps();
  static_assert(!L::Q8, "q8_0 rows: q8_rows4_dot");
  int64_t k = 0;
  for (; k + 2 * V <= n_in; k += 2 * V) {
    const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + V);
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) {
      // This step reads 2 * V * BYTES bytes of the row: one cache line (f16, bf16) or two (f32).
      for (int64_t line = 0; line < 2 * V * L::BYTES; line += 64) prefetch(row[s] + k * L::BYTES + line, ROWS4_PREFETCH_BYTES);
      a[s][0] = _mm512_fmadd_ps(L::full(row[s], k), x0, a[s][0]);
      a[s][1] = _mm512_fmadd_ps(L::full(row[s], k + V), x1, a[s][1]);
    }
  }
  for (; k < n_in; k += V) {
    const __mmask16 m = n_in - k >= V ? static_cast<__mmask16>(0xFFFF) : tail_mask(n_in - k);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) a[s][0] = _mm512_fmadd_ps(L::part(row[s], k, m), xv, a[s][0]);
  }
#pragma GCC unroll 4
  for (int s = 0; s < 4; ++s) y[r[s]] = _mm512_reduce_add_ps(_mm512_add_ps(a[s][0], a[s][1]));
}

// Decode of q8_0 rows (one activation row), two blocks at a time without widening shuffles.
// The 32 + 32 int8 values of blocks 2p and 2p + 1 are loaded as 16 dwords, four values each; byte j
// of every dword is moved to the dword's top byte and the rest set to 0 (a shift, a mask or a byte
// shuffle), which makes the dword q * 2^24 exactly, and converted to f32. It meets the activations
// at the same positions, which x_pairs_q8 arranges once per call. Each block's scale d multiplies
// its lanes, and the sum is scaled by 2^-24 at the end (a power of two: exact unless the result is
// subnormal). Measured on a 2-core AVX-512 (Zen 5) VM, one thread, one stream: 40 GB/s against 30
// for row_dot's sign-extending shuffles (vpmovsxbd, 16 values at a time) with the rows in cache, 23
// against 20.5 from memory; tinyllama-1.1b q8_0 decode (four streams) 43.5-44.5 -> 45.5-49 tok/s in
// alternating runs. Four streams had lost to one for small thread shares while the conversion was
// slower (llama-110m 285-321 -> 252-281 tok/s); with pairs of blocks they win: llama-110m decode
// after a 512-token prompt 236-286 -> 263-301 tok/s (4 alternating pairs), without a prompt even
// (351-356 vs 351-363). Bytes 1 and 2 take one byte shuffle each instead of a shift and a mask:
// 2048-wide rows, one thread in cache 35 -> 37.5 GB/s, two threads from memory 65-70 -> 70-77;
// decode of tinyllama q8_0 1.04x (6 of 6 alternating pairs), llama-110m after a 512-token prompt
// 1.02x (4 of 6).
constexpr float Q8_PAIR_UNSCALE = 1.0f / 16777216.0f;  // 2^-24

// xp[64 p + 16 j + l] = x[32 (2p + l / 8) + 4 (l % 8) + j] for each pair p of blocks: vector j of
// pair p holds the activations that byte j of the pair's dwords multiplies (lanes 0-7 block 2p).
BP_TARGET_AVX512 void x_pairs_q8(const float* x, int64_t n_pairs, float* xp) {
  alignas(64) int32_t idx[4][V];
  for (int j = 0; j < 4; ++j) {
    for (int l = 0; l < V; ++l) idx[j][l] = j + 4 * (l % 8);
  }
  for (int64_t p = 0; p < n_pairs; ++p) {
    const float* a = x + 64 * p;
    const __m512 a0 = _mm512_loadu_ps(a), a1 = _mm512_loadu_ps(a + V), b0 = _mm512_loadu_ps(a + 2 * V),
                 b1 = _mm512_loadu_ps(a + 3 * V);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512i ij = _mm512_load_si512(idx[j]);
      const __m512 lo = _mm512_permutex2var_ps(a0, ij, a1), hi = _mm512_permutex2var_ps(b0, ij, b1);
      _mm512_storeu_ps(xp + 64 * p + V * j, _mm512_mask_blend_ps(0xFF00, lo, hi));
    }
  }
}

// acc + 2^24 * (the products of blocks 2p and 2p + 1 of row with x), xp from x_pairs_q8.
BP_TARGET_AVX512 inline __m512 q8_pair_dot(const uint8_t* row, int64_t p, const float* xp, __m512 acc) {
  const BlockQ8_0* blk = reinterpret_cast<const BlockQ8_0*>(row) + 2 * p;
  const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk[0].q))),
                                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk[1].q)), 1);
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0xFF000000u));
  // Byte shuffles moving byte 1 (2) of every dword to its top byte and zeroing the other three (an
  // index with its high bit set gives 0); indices count within each 16-byte lane.
  const __m512i to_top1 = _mm512_broadcast_i32x4(_mm_set_epi32(0x0D808080, 0x09808080, 0x05808080, 0x01808080));
  const __m512i to_top2 = _mm512_broadcast_i32x4(_mm_set_epi32(0x0E808080, 0x0A808080, 0x06808080, 0x02808080));
  const float* xb = xp + 64 * p;
  __m512 s = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, top)), _mm512_loadu_ps(xb + 3 * V));
  s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_shuffle_epi8(v, to_top2)), _mm512_loadu_ps(xb + 2 * V), s);
  s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_shuffle_epi8(v, to_top1)), _mm512_loadu_ps(xb + V), s);
  s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_slli_epi32(v, 24)), _mm512_loadu_ps(xb), s);
  const __m256i d = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi16(static_cast<short>(blk[0].d))),
                                            _mm_set1_epi16(static_cast<short>(blk[1].d)), 1);
  return _mm512_fmadd_ps(_mm512_cvtph_ps(d), s, acc);
}

// rows4_dot for q8_0: four rows side by side, pairs of blocks, each stream prefetched ahead.
BP_TARGET_AVX512 void q8_rows4_dot(const MatrixView& w, const int64_t* r, const float* x, const float* xp, float* y) {
  const uint8_t* row[4] = {w.row(r[0]), w.row(r[1]), w.row(r[2]), w.row(r[3])};
  const int64_t n_blocks = w.n_in / Q8_0_BLOCK, n_pairs = n_blocks / 2;
  __m512 a[4][2];
#pragma GCC unroll 4
  for (int s = 0; s < 4; ++s) a[s][0] = a[s][1] = _mm512_setzero_ps();
  // Even pairs into a[s][0], odd ones into a[s][1]: two pairs a step, so that the accumulators'
  // indices are constants and they stay in registers. Indexed by p & 1 they lived on the stack,
  // a load and a store around every pair's FMA: 2048-wide q8_0 rows, 2-core AVX-512 VM, 35 MB
  // from memory 49-50 -> 54-55 GB/s with two threads, 31 -> 33 with one; 0.6 MB in cache, one
  // thread, 31-32 -> 33-34 (same sums, same order).
  auto step = [&](int64_t p, int half) BP_TARGET_AVX512 {
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) {
      prefetch(row[s] + 2 * p * int64_t{sizeof(BlockQ8_0)}, ROWS4_PREFETCH_BYTES);
      prefetch(row[s] + 2 * p * int64_t{sizeof(BlockQ8_0)} + 64, ROWS4_PREFETCH_BYTES);
      a[s][half] = q8_pair_dot(row[s], p, xp, a[s][half]);
    }
  };
  int64_t p = 0;
  for (; p + 2 <= n_pairs; p += 2) {
    step(p, 0);
    step(p + 1, 1);
  }
  if (p < n_pairs) step(p, 0);
#pragma GCC unroll 4
  for (int s = 0; s < 4; ++s) {
    float sum = _mm512_reduce_add_ps(_mm512_add_ps(a[s][0], a[s][1])) * Q8_PAIR_UNSCALE;
    if (n_blocks % 2 != 0) sum += _mm512_reduce_add_ps(q8_block_dot(row[s], n_blocks - 1, x, _mm512_setzero_ps()));
    y[r[s]] = sum;
  }
}

// A thread's buffer of at least n floats for x_pairs_q8, kept between calls (no target
// attribute: the standard library stays out of target functions).
float* x_pairs_scratch(int64_t n) {
  thread_local std::vector<float> kept;
  if (kept.size() < static_cast<size_t>(n)) kept.resize(static_cast<size_t>(n));
  return kept.data();
}

// One activation row times rows [r0, r1) of a q8_0 matrix: four streams of pairs of blocks (the
// rows the quarters leave over one at a time).
BP_TARGET_AVX512 void q8_matvec_streams(const MatrixView& w, const float* x, float* y, int64_t r0, int64_t r1) {
  float* xp = x_pairs_scratch(w.n_in);
  x_pairs_q8(x, w.n_in / Q8_0_BLOCK / 2, xp);
  rows_in_quarters(
      r0, r1, [&](const int64_t* r) { q8_rows4_dot(w, r, x, xp, y); },
      [&](int64_t r) { y[r] = row_dot<LoadQ8_0>(w.row(r), x, w.n_in); });
}

template <class L>
BP_TARGET_AVX512 void matvec_typed(const MatrixView& w, const float* x, int64_t n, float* y,
                                   int64_t r0, int64_t r1) {
  if (n == 1) {
    if constexpr (L::Q8) {
      q8_matvec_streams(w, x, y, r0, r1);
    } else {
      rows_in_quarters(
          r0, r1, [&](const int64_t* r) { rows4_dot<L>(w, r, x, y); },
          [&](int64_t r) { y[r] = row_dot<L>(w.row(r), x, w.n_in); });
    }
    return;
  }
  // Rows in groups of 8 (read from memory once), each group times the activations in groups
  // of up to 4 (the group's rows stay in L1/L2 between activation groups).
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

BP_TARGET_AVX512 void matvec_avx512(const MatrixView& w, const float* x, int64_t n, float* y,
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
BP_TARGET_AVX512 void dequantize_elem(const void* src, float* dst, int64_t n) {
  const auto* row = static_cast<const uint8_t*>(src);
  int64_t k = 0;
  for (; k + V <= n; k += V) _mm512_storeu_ps(dst + k, L::full(row, k));
  if (k < n) {
    const __mmask16 m = tail_mask(n - k);
    _mm512_mask_storeu_ps(dst + k, m, L::part(row, k, m));
  }
}

BP_TARGET_AVX512 void dequantize_row_avx512(DType t, const void* src, float* dst, int64_t n) {
  BP_ASSERT(n >= 0 && n % dtype_block_size(t) == 0);
  switch (t) {
    case DType::F32: std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float)); return;
    case DType::F16: dequantize_elem<LoadF16>(src, dst, n); return;
    case DType::BF16: dequantize_elem<LoadBF16>(src, dst, n); return;
    case DType::Q8_0: {
      const auto* row = static_cast<const uint8_t*>(src);
      for (int64_t b = 0; b < n / Q8_0_BLOCK; ++b) {
        const __m512 d = LoadQ8_0::scale(row, b);
        _mm512_storeu_ps(dst + b * Q8_0_BLOCK, LoadQ8_0::half(row, b, 0, d));
        _mm512_storeu_ps(dst + b * Q8_0_BLOCK + V, LoadQ8_0::half(row, b, 1, d));
      }
      return;
    }
  }
  BP_ASSERT(false && "unknown dtype");
}

// silu(g) * u = g u / (1 + e^-g).
BP_TARGET_AVX512 void silu_mul_avx512(float* gate, const float* up, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += V) {
    const __mmask16 m = n - i >= V ? static_cast<__mmask16>(0xFFFF) : tail_mask(n - i);
    const __m512 g = _mm512_maskz_loadu_ps(m, gate + i), u = _mm512_maskz_loadu_ps(m, up + i);
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g));
    _mm512_mask_storeu_ps(gate + i, m, _mm512_div_ps(_mm512_mul_ps(g, u), _mm512_add_ps(one, e)));
  }
}

// 0.5 x (1 + tanh(y)) = x / (1 + e^(-2y)), y = sqrt(2/pi) (x + 0.044715 x^3).
BP_TARGET_AVX512 void gelu_tanh_avx512(float* x, const float* b, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f), c = _mm512_set1_ps(-2.0f * 0.7978845608028654f), c3 = _mm512_set1_ps(0.044715f);
  for (int64_t i = 0; i < n; i += V) {
    const __mmask16 m = n - i >= V ? static_cast<__mmask16>(0xFFFF) : tail_mask(n - i);
    const __m512 v = b != nullptr ? _mm512_add_ps(_mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, b + i))
                                  : _mm512_maskz_loadu_ps(m, x + i);
    const __m512 y = _mm512_mul_ps(c, _mm512_fmadd_ps(_mm512_mul_ps(c3, v), _mm512_mul_ps(v, v), v));  // -2y
    _mm512_mask_storeu_ps(x + i, m, _mm512_div_ps(v, _mm512_add_ps(one, exp_ps(y))));
  }
}

// The portable norms' sums, 8 doubles a vector: lane k of the vector is their partial sum k, and
// the tail and the final pairwise additions are theirs. Summed: v (Sum::VALUES), v^2
// (Sum::SQUARES) or (v - c)^2 (Sum::SQUARES_ABOUT, c = center).
enum class Sum { VALUES, SQUARES, SQUARES_ABOUT };

// Products that feed an addition use the _round forms: GCC may fuse a plain vector multiply and
// add into one FMA (one rounding instead of the portable code's two).
constexpr int NEAREST = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

template <Sum S>
BP_TARGET_AVX512 inline __m512d sum_term(__m512d v, __m512d center) {
  if constexpr (S == Sum::VALUES) return v;
  if constexpr (S == Sum::SQUARES_ABOUT) v = _mm512_sub_pd(v, center);
  return _mm512_mul_round_pd(v, v, NEAREST);
}

template <Sum S>
BP_TARGET_AVX512 inline double sum_double_avx512(const float* x, int64_t n, double center) {
  const __m512d c = _mm512_set1_pd(center);
  __m512d acc = _mm512_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm512_add_pd(acc, sum_term<S>(_mm512_cvtps_pd(_mm256_loadu_ps(x + i)), c));
  alignas(64) double a[8];
  _mm512_store_pd(a, acc);
  for (; i < n; ++i) {
    alignas(64) double t[8];
    _mm512_store_pd(t, sum_term<S>(_mm512_set1_pd(static_cast<double>(x[i])), c));
    a[0] += t[0];
  }
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

BP_TARGET_AVX512 void rms_norm_row_avx512(const float* x, float* y, int64_t n, const float* w, float eps) {
  const double ss = sum_double_avx512<Sum::SQUARES>(x, n, 0.0);
  const __m512 inv = _mm512_set1_ps(static_cast<float>(1.0 / __builtin_sqrt(ss / static_cast<double>(n) + eps)));
  for (int64_t i = 0; i < n; i += V) {
    const __mmask16 m = n - i >= V ? static_cast<__mmask16>(0xFFFF) : tail_mask(n - i);
    const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), inv), _mm512_maskz_loadu_ps(m, w + i));
    _mm512_mask_storeu_ps(y + i, m, v);
  }
}

BP_TARGET_AVX512 void layer_norm_row_avx512(const float* x, float* y, int64_t n, const float* w, const float* b, float eps) {
  const double mean = sum_double_avx512<Sum::VALUES>(x, n, 0.0) / static_cast<double>(n);
  const double var = sum_double_avx512<Sum::SQUARES_ABOUT>(x, n, mean) / static_cast<double>(n);
  const __m512 inv = _mm512_set1_ps(static_cast<float>(1.0 / __builtin_sqrt(var + eps)));
  const __m512 mf = _mm512_set1_ps(static_cast<float>(mean));
  for (int64_t i = 0; i < n; i += V) {
    const __mmask16 m = n - i >= V ? static_cast<__mmask16>(0xFFFF) : tail_mask(n - i);
    const __m512 c = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), mf), inv);
    const __m512 v = _mm512_add_ps(_mm512_mul_round_ps(c, _mm512_maskz_loadu_ps(m, w + i), NEAREST), _mm512_maskz_loadu_ps(m, b + i));
    _mm512_mask_storeu_ps(y + i, m, v);
  }
}

// 8 pairs a vector: x = {a0, b0, a1, b1, ...}, cs = {c0, s0, c1, s1, ...}; the result is
// x * {c0, c0, ...} + {-b0, a0, -b1, a1, ...} * {s0, s0, ...}, i.e. a c - b s and a s + b c (b s
// negated after rounding: the portable code's two products and one addition).
BP_TARGET_AVX512 void rotate_pairs_avx512(float* x, const float* cs, int64_t n_pairs) {
  const __m512i odd_lanes_negated = _mm512_set_epi32(0, INT32_MIN, 0, INT32_MIN, 0, INT32_MIN, 0, INT32_MIN, 0, INT32_MIN, 0,
                                                     INT32_MIN, 0, INT32_MIN, 0, INT32_MIN);  // lanes 0, 2, ...: sign bit
  const int64_t n = 2 * n_pairs;
  for (int64_t i = 0; i < n; i += V) {
    const __mmask16 m = n - i >= V ? static_cast<__mmask16>(0xFFFF) : tail_mask(n - i);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i), r = _mm512_maskz_loadu_ps(m, cs + i);
    const __m512 c = _mm512_moveldup_ps(r), s = _mm512_movehdup_ps(r);
    const __m512 swapped = _mm512_permute_ps(v, 0xB1);  // {b0, a0, b1, a1, ...}
    const __m512 bs = _mm512_castsi512_ps(
        _mm512_xor_si512(_mm512_castps_si512(_mm512_mul_round_ps(swapped, s, NEAREST)), odd_lanes_negated));
    _mm512_mask_storeu_ps(x + i, m, _mm512_add_ps(_mm512_mul_round_ps(v, c, NEAREST), bs));
  }
}

BP_TARGET_AVX512 void add_to_avx512(float* x, const float* a, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; i += V) {
    const __mmask16 m = n - i >= V ? static_cast<__mmask16>(0xFFFF) : tail_mask(n - i);
    __m512 v = _mm512_maskz_loadu_ps(m, a + i);
    if (b != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, b + i));
    _mm512_mask_storeu_ps(x + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, x + i), v));
  }
}

const KernelIsa AVX512 = {"avx512",           matvec_avx512,       dequantize_row_avx512, attention_tile_avx512,
                          silu_mul_avx512,    gelu_tanh_avx512,    rms_norm_row_avx512,   layer_norm_row_avx512,
                          rotate_pairs_avx512, add_to_avx512,      nullptr,               nullptr};
// The same with VNNI's int8 products (DecodePrecision::INT8).
const KernelIsa AVX512_VNNI = {"avx512",           matvec_avx512,         dequantize_row_avx512,  attention_tile_avx512,
                               silu_mul_avx512,    gelu_tanh_avx512,      rms_norm_row_avx512,    layer_norm_row_avx512,
                               rotate_pairs_avx512, add_to_avx512,    matvec_q8_int8_avx512,  quantize_rows_q8_avx512};

}  // namespace

const KernelIsa* kernel_isa_avx512() {
  __builtin_cpu_init();
  const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  cpu_has_f16c();
  if (!ok) return nullptr;
  return cpu_has_avx512_vnni() ? &AVX512_VNNI : &AVX512;
}

}  // namespace backprompt::detail

#else  // not x86

namespace backprompt::detail {
const KernelIsa* kernel_isa_avx512() { return nullptr; }
}  // namespace backprompt::detail

#endif
