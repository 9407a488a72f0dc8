// attention_tile() with AVX-512 (see kernels_avx512.cpp for how target functions are compiled).
// Two shapes, both with the running-maximum softmax of kernels_attention.cpp over key blocks:
//
// Lanes (16 or more query vectors, prefill): vector lanes run over query vectors. The tile's
// queries are transposed once into qt [head_dim][lanes]; then, per block of keys,
//   scores  st[key][lane] = sum_d K[key][d] * qt[d][lane]    (K rows broadcast, read in place)
//   output  ot[d][lane] += sum_key V[key][d] * st[key][lane]   (V rows broadcast, read in place)
// so neither K nor V is copied or transposed, and every FMA does 16 useful multiplies.
//
// Dots (fewer query vectors, decode): lanes run over head dimensions. Each key row is loaded
// once and dotted with every query vector of the tile (the heads that share it; a tile may span
// several key/value heads, whose columns of a row are then read together), then V rows are
// accumulated into the output rows: reading K and V once is what decode costs. Scores are
// computed 16 keys at a time per query vector and their horizontal sums taken together (sums16):
// one tile over llama-110m's 12 heads and 288 keys, in cache, one thread on a 2-core AVX-512 VM,
// took 104 ns per key this way against 155 with one reduction per key. Tiles over some of a
// row's heads prefetch their K and V columns DOT_PREFETCH_ROWS rows ahead (llama-110m shape at 640
// positions, one thread: 18 -> 29 GB/s; reading 6 heads of each row together: 31); tiles over
// whole rows do not: the hardware prefetchers follow K and V as two contiguous runs, and the
// prefetch instructions cost more than they bring (the same tile: 76 ns per key without them in
// cache, 104 with; 162 against 192-211 with K/V from memory; llama-110m decode +3-7%).
//
// exp: exp_ps (kernels_avx512_math.h), relative error ~2e-7; masked-out keys give exactly 0.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "backprompt/error.h"
#include "tensor/kernels_simd.h"

#if defined(__x86_64__) || defined(__i386__)

#include "tensor/kernels_attention_rounded_kv.h"
#include "tensor/kernels_avx512_math.h"

namespace backprompt::detail {

namespace {

#define BP_TARGET_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16")))

constexpr int L = 16;                     // f32 lanes per vector
constexpr int MAX_HEAD_DIM = 128;         // wider heads take the portable path
constexpr int LANE_BLOCK = 64;            // keys per block, lanes shape
constexpr int DOT_BLOCK = 128;            // keys per block, dots shape
constexpr int64_t DOT_PREFETCH_ROWS = 8;  // dots shape: K and V rows prefetched this far ahead
constexpr int DOT_MAX_Q = 16;             // query vectors in the dots shape (more: lanes shape)

inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

BP_TARGET_AVX512 inline __mmask16 head_mask(int32_t head_dim, int v) {  // lanes of vector v in the head
  const int n = head_dim - v * L;
  return n >= L ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// r[c] <- column c of the 16 x 16 matrix whose rows are r[0..15].
BP_TARGET_AVX512 inline void transpose16(__m512* r) {
  __m512 t[16], u[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {  // u[4k + j]: in 128-bit lane c4, rows 4k..4k+3 of column 4 c4 + j
    const __m512d a = _mm512_castps_pd(t[4 * k]), b = _mm512_castps_pd(t[4 * k + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * k + 1]), d = _mm512_castps_pd(t[4 * k + 3]);
    u[4 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    u[4 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    u[4 * k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    u[4 * k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int j = 0; j < 4; ++j) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88), v1 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xDD);
    const __m512 w0 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88), w1 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xDD);
    r[j] = _mm512_shuffle_f32x4(v0, w0, 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
    r[4 + j] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
  }
}

// qt[d][lane] = scale * query vector `lane`'s element d for the tile's n_q query vectors, 0 in the
// other lanes up to NL: 16 x 16 blocks transposed in registers (scalar stores down the columns
// of qt, one cache line apart, cost a fifth of a prefill tile's time).
template <int NL>
BP_TARGET_AVX512 void queries_transposed(const AttentionTile& t, float* qt) {
  const int32_t hd = t.head_dim, n_q = t.n_rows * t.n_group;
  const __m512 scale = _mm512_set1_ps(t.scale);
  for (int32_t u = 0; u < NL; u += L) {
    for (int32_t d0 = 0; d0 < hd; d0 += L) {
      const __mmask16 mk = head_mask(hd, d0 / L);
      __m512 r[L];
      for (int32_t i = 0; i < L; ++i) {
        const int32_t lane = u + i;
        const float* q = t.q + (lane / t.n_group) * t.ldq + static_cast<int64_t>(lane % t.n_group) * hd + d0;
        r[i] = lane < n_q ? _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, q), scale) : _mm512_setzero_ps();
      }
      transpose16(r);
      for (int32_t c = 0; c < L && d0 + c < hd; ++c) _mm512_store_ps(qt + (d0 + c) * NL + u, r[c]);
    }
  }
}

// out of query vector `lane` = ot[.][lane] * inv_l[lane] for the tile's n_q query vectors (the
// transpose of queries_transposed, same reason).
template <int NL>
BP_TARGET_AVX512 void outputs_transposed(const AttentionTile& t, const float* ot, const float* inv_l) {
  const int32_t hd = t.head_dim, n_q = t.n_rows * t.n_group;
  for (int32_t u = 0; u < NL && u < n_q; u += L) {
    for (int32_t d0 = 0; d0 < hd; d0 += L) {
      const __mmask16 mk = head_mask(hd, d0 / L);
      __m512 r[L];
      for (int32_t c = 0; c < L; ++c) r[c] = d0 + c < hd ? _mm512_load_ps(ot + (d0 + c) * NL + u) : _mm512_setzero_ps();
      transpose16(r);
      for (int32_t i = 0; i < L && u + i < n_q; ++i) {
        const int32_t lane = u + i;
        float* out = t.out + (lane / t.n_group) * t.ldo + static_cast<int64_t>(lane % t.n_group) * hd + d0;
        _mm512_mask_storeu_ps(out, mk, _mm512_mul_ps(r[i], _mm512_set1_ps(inv_l[lane])));
      }
    }
  }
}

// The running softmax of a lanes tile, per vector of 16 query vectors: lim, the keys each lane
// sees (unused lanes: as many as the last row; their values are not used); m, the running
// maximum; l, the running sum.
template <int NQV>
BP_TARGET_AVX512 void lanes_start(const AttentionTile& t, __m512i* lim, __m512* m, __m512* l) {
  const int32_t n_q = t.n_rows * t.n_group;
  for (int u = 0; u < NQV; ++u) {
    alignas(64) int32_t n_seen[L];
    for (int32_t i = 0; i < L; ++i) {
      const int32_t q = u * L + i < n_q ? u * L + i : n_q - 1;
      n_seen[i] = static_cast<int32_t>(t.n_keys0 + q / t.n_group);
    }
    lim[u] = _mm512_load_si512(n_seen);
    m[u] = _mm512_set1_ps(-INFINITY);
    l[u] = _mm512_setzero_ps();
  }
}

// One vector's step of the online softmax over a block of scores st[j * NL] (j < n_block): the new
// maximum m, with the sum l and the accumulators ot[d * NL] (d < head_dim) scaled by e^(m - m_new)
// to it. Returns m_new. Every lane sees key 0, so m is finite after the first block.
template <int NL>
BP_TARGET_AVX512 __m512 lanes_new_max(const float* st, int32_t n_block, int32_t head_dim, __m512& m, __m512& l, float* ot) {
  __m512 m_block = _mm512_set1_ps(-INFINITY);
  for (int32_t j = 0; j < n_block; ++j) m_block = _mm512_max_ps(m_block, _mm512_load_ps(st + j * NL));
  const __m512 m_new = _mm512_max_ps(m, m_block);
  const __m512 alpha = exp_ps(_mm512_sub_ps(m, m_new));
  l = _mm512_mul_ps(l, alpha);
  for (int32_t d = 0; d < head_dim; ++d) _mm512_store_ps(ot + d * NL, _mm512_mul_ps(_mm512_load_ps(ot + d * NL), alpha));
  m = m_new;
  return m_new;
}

// Prefetches columns [c0, c1) of the row ahead_floats after `row` (an address, which may lie past
// the end of the rows: prefetches never fault).
BP_TARGET_AVX512 inline void prefetch_row(const float* row, int64_t ahead_floats, int64_t c0, int64_t c1) {
  const uintptr_t at = reinterpret_cast<uintptr_t>(row) + static_cast<uintptr_t>(ahead_floats + c0) * sizeof(float);
  for (int64_t b = 0; b < (c1 - c0) * static_cast<int64_t>(sizeof(float)); b += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(at + static_cast<uintptr_t>(b)), _MM_HINT_T0);
  }
}

// Prefetches a bf16 lanes tile's queries and its first block of keys and values, which the tile
// then reads row by row, kv_stride apart (the block loop prefetches each next block itself).
// Attention alone, llama-110m's shape, 512-token prefill, 2 threads on a 2-core AVX-512 VM:
// bf16 tiles 15.0-16.3 -> 14.1-14.8 ms for the 12 layers (3 alternating pairs); the f32 tiles
// (tile_lanes) ran even with it (24.7-25.6 vs 24.1-25.2 ms), so they do without.
BP_TARGET_AVX512 void prefetch_tile_start(const AttentionTile& t) {
  for (int32_t i = 0; i < t.n_rows; ++i) prefetch_row(t.q + i * t.ldq, 0, 0, int64_t{t.n_group} * t.head_dim);
  if (t.n_kv == 0) return;
  const int64_t n_first = min_i64(min_i64(LANE_BLOCK, t.kv[0].n), t.n_keys0 + t.n_rows - 1);
  for (int64_t j = 0; j < n_first; ++j) {
    prefetch_row(t.kv[0].k + j * t.kv_stride, 0, 0, t.head_dim);
    prefetch_row(t.kv[0].v + j * t.kv_stride, 0, 0, t.head_dim);
  }
}

// ---------------------------------------------------------------------------------------------
// Lanes shape: NQV vectors of 16 query vectors each.

// st[r][lane] = acc[r][lane / 16][lane % 16] for RK keys from key0, or -inf where the lane's row
// does not see the key (key0 + r >= lim[lane]).
template <int NQV, int RK>
BP_TARGET_AVX512 inline void store_scores(const __m512 (&acc)[RK][NQV], int32_t key0, const __m512i* lim, float* st) {
  constexpr int NL = NQV * L;
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
#pragma GCC unroll 4
  for (int r = 0; r < RK; ++r) {
    const __m512i key = _mm512_set1_epi32(key0 + r);
#pragma GCC unroll 4
    for (int v = 0; v < NQV; ++v) {
      const __mmask16 seen = _mm512_cmpgt_epi32_mask(lim[v], key);
      _mm512_store_ps(st + r * NL + v * L, _mm512_mask_blend_ps(seen, neg_inf, acc[r][v]));
    }
  }
}

// st[r][lane] for RK keys from row k (stride ks): scores, or -inf where the lane's row does not
// see the key (key index key0 + r >= lim[lane]).
template <int NQV, int RK>
BP_TARGET_AVX512 void lane_scores(const float* qt, int32_t head_dim, const float* k, int64_t ks,
                                  int32_t key0, const __m512i* lim, float* st) {
  constexpr int NL = NQV * L;
  __m512 acc[RK][NQV];
#pragma GCC unroll 4
  for (int r = 0; r < RK; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NQV; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int32_t d = 0; d < head_dim; ++d) {
    __m512 qv[NQV];
#pragma GCC unroll 4
    for (int v = 0; v < NQV; ++v) qv[v] = _mm512_load_ps(qt + d * NL + v * L);
#pragma GCC unroll 4
    for (int r = 0; r < RK; ++r) {
      const __m512 kb = _mm512_set1_ps(k[r * ks + d]);
#pragma GCC unroll 4
      for (int v = 0; v < NQV; ++v) acc[r][v] = _mm512_fmadd_ps(kb, qv[v], acc[r][v]);
    }
  }
  store_scores<NQV, RK>(acc, key0, lim, st);
}

// ot[d][lane] += sum_j V[j][d] * st[j][lane] for RD dims from d0, over n_block keys.
template <int NQV, int RD>
BP_TARGET_AVX512 void lane_pv(const float* st, int32_t n_block, const float* v, int64_t vs, float* ot) {
  constexpr int NL = NQV * L;
  __m512 acc[RD][NQV];
#pragma GCC unroll 4
  for (int r = 0; r < RD; ++r) {
#pragma GCC unroll 4
    for (int u = 0; u < NQV; ++u) acc[r][u] = _mm512_load_ps(ot + r * NL + u * L);
  }
  for (int32_t j = 0; j < n_block; ++j) {
    __m512 p[NQV];
#pragma GCC unroll 4
    for (int u = 0; u < NQV; ++u) p[u] = _mm512_load_ps(st + j * NL + u * L);
#pragma GCC unroll 4
    for (int r = 0; r < RD; ++r) {
      const __m512 vb = _mm512_set1_ps(v[j * vs + r]);
#pragma GCC unroll 4
      for (int u = 0; u < NQV; ++u) acc[r][u] = _mm512_fmadd_ps(vb, p[u], acc[r][u]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RD; ++r) {
#pragma GCC unroll 4
    for (int u = 0; u < NQV; ++u) _mm512_store_ps(ot + r * NL + u * L, acc[r][u]);
  }
}

template <int NQV>
BP_TARGET_AVX512 void tile_lanes(const AttentionTile& t) {
  constexpr int NL = NQV * L;
  const int32_t hd = t.head_dim;
  alignas(64) float qt[MAX_HEAD_DIM * NL];  // [head_dim][NL] scaled queries, 0 in unused lanes
  alignas(64) float ot[MAX_HEAD_DIM * NL];  // [head_dim][NL] output accumulators
  alignas(64) float st[LANE_BLOCK * NL];    // [LANE_BLOCK][NL] scores, then probabilities
  queries_transposed<NL>(t, qt);
  for (int32_t x = 0; x < hd * NL; x += L) _mm512_store_ps(ot + x, _mm512_setzero_ps());

  __m512i lim[NQV];
  __m512 m[NQV], l[NQV];
  lanes_start<NQV>(t, lim, m, l);

  const int64_t n_keys = t.n_keys0 + t.n_rows - 1;  // keys the last row sees
  int64_t key0 = 0;
  for (int32_t src = 0; src < t.n_kv && key0 < n_keys; ++src) {
    const KvRowsView& kv = t.kv[src];
    const int64_t n_use = min_i64(kv.n, n_keys - key0);
    for (int64_t j0 = 0; j0 < n_use; j0 += LANE_BLOCK) {
      const int32_t n_block = static_cast<int32_t>(min_i64(LANE_BLOCK, n_use - j0));
      const float* k = kv.k + j0 * t.kv_stride;
      const int32_t key = static_cast<int32_t>(key0 + j0);
      int32_t j = 0;
      for (; j + 4 <= n_block; j += 4) lane_scores<NQV, 4>(qt, hd, k + j * t.kv_stride, t.kv_stride, key + j, lim, st + j * NL);
      for (; j < n_block; ++j) lane_scores<NQV, 1>(qt, hd, k + j * t.kv_stride, t.kv_stride, key + j, lim, st + j * NL);

      // Online softmax: every lane sees key 0, so m is finite after the first block.
      for (int u = 0; u < NQV; ++u) {
        const __m512 m_new = lanes_new_max<NL>(st + u * L, n_block, hd, m[u], l[u], ot + u * L);
        __m512 sum = _mm512_setzero_ps();
        for (int32_t jj = 0; jj < n_block; ++jj) {
          const __m512 p = exp_ps(_mm512_sub_ps(_mm512_load_ps(st + jj * NL + u * L), m_new));
          _mm512_store_ps(st + jj * NL + u * L, p);
          sum = _mm512_add_ps(sum, p);
        }
        l[u] = _mm512_add_ps(l[u], sum);
      }

      const float* v = kv.v + j0 * t.kv_stride;
      int32_t d = 0;
      for (; d + 4 <= hd; d += 4) lane_pv<NQV, 4>(st, n_block, v + d, t.kv_stride, ot + d * NL);
      for (; d < hd; ++d) lane_pv<NQV, 1>(st, n_block, v + d, t.kv_stride, ot + d * NL);
    }
    key0 += kv.n;
  }

  alignas(64) float inv_l[NL];
  for (int u = 0; u < NQV; ++u) _mm512_store_ps(inv_l + u * L, _mm512_div_ps(_mm512_set1_ps(1.0f), l[u]));
  outputs_transposed<NL>(t, ot, inv_l);
}

// ---------------------------------------------------------------------------------------------
// Lanes shape with bf16 products (AttentionTile::bf16, CPUs with AVX512_BF16): the same blocks
// and f32 softmax, but queries, keys, probabilities and values are rounded to bf16 (nearest
// even) and multiplied in pairs with vdpbf16ps (f32 sums), half the instructions of the f32
// FMAs. A pair is two bf16 in one 32-bit lane, the first in the low half:
//   scores: pairs of head dimensions (2p, 2p + 1): qt2[p][lane] of the queries, and the key
//           block rounded row by row into kb[key][head_dim], whose pair p is read as one 32-bit
//           broadcast;
//   values: pairs of keys (2i, 2i + 1): pt2[i][lane] of the probabilities, and the value block
//           transposed into vt2[i][d] = (V[2i][d], V[2i + 1][d]) (a missing last key is 0).

// 16 x 32-bit pairs (lo[i] in the low half, hi[i] in the high half), both rounded to bf16.
// One conversion of both (lo in the low 16 words, hi in the high 16), then one interleave.
BP_TARGET_AVX512_BF16 inline __m512i bf16_pairs(__m512 lo, __m512 hi) {
  const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5,
                                              20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(interleave, both);
}

// st[r][lane] for RK keys of the rounded block kb (rows of head_dim bf16): as lane_scores.
template <int NQV, int RK>
BP_TARGET_AVX512_BF16 void lane_scores_bf16(const __m512i* qt2, int32_t n_pairs, const uint16_t* kb, int32_t head_dim,
                                            int32_t key0, const __m512i* lim, float* st) {
  __m512 acc[RK][NQV];
#pragma GCC unroll 4
  for (int r = 0; r < RK; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NQV; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int32_t p = 0; p < n_pairs; ++p) {
    __m512bh qv[NQV];
#pragma GCC unroll 4
    for (int v = 0; v < NQV; ++v) qv[v] = reinterpret_cast<__m512bh>(_mm512_load_si512(qt2 + p * NQV + v));
#pragma GCC unroll 4
    for (int r = 0; r < RK; ++r) {
      uint32_t pair;
      std::memcpy(&pair, kb + r * head_dim + 2 * p, sizeof(pair));
      const __m512bh kp = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair)));
#pragma GCC unroll 4
      for (int v = 0; v < NQV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], kp, qv[v]);
    }
  }
  store_scores<NQV, RK>(acc, key0, lim, st);
}

// ot[d][lane] += sum_i vt2[i][d] · pt2[i][lane] for RD dims from d0 (vt2 rows of head_dim pairs).
template <int NQV, int RD>
BP_TARGET_AVX512_BF16 void lane_pv_bf16(const __m512i* pt2, int32_t n_pairs, const uint32_t* vt2, int32_t head_dim,
                                        float* ot) {
  constexpr int NL = NQV * L;
  __m512 acc[RD][NQV];
#pragma GCC unroll 4
  for (int r = 0; r < RD; ++r) {
#pragma GCC unroll 4
    for (int u = 0; u < NQV; ++u) acc[r][u] = _mm512_load_ps(ot + r * NL + u * L);
  }
  for (int32_t i = 0; i < n_pairs; ++i) {
    __m512bh p[NQV];
#pragma GCC unroll 4
    for (int u = 0; u < NQV; ++u) p[u] = reinterpret_cast<__m512bh>(_mm512_load_si512(pt2 + i * NQV + u));
#pragma GCC unroll 4
    for (int r = 0; r < RD; ++r) {
      const __m512bh vp = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(vt2[i * head_dim + r])));
#pragma GCC unroll 4
      for (int u = 0; u < NQV; ++u) acc[r][u] = _mm512_dpbf16_ps(acc[r][u], vp, p[u]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RD; ++r) {
#pragma GCC unroll 4
    for (int u = 0; u < NQV; ++u) _mm512_store_ps(ot + r * NL + u * L, acc[r][u]);
  }
}

// qt2[p][lane]: pairs of head dimensions (2p, 2p + 1) of the tile's scaled queries (0 in unused
// lanes), rounded to bf16.
template <int NQV>
BP_TARGET_AVX512_BF16 void query_pairs(const AttentionTile& t, __m512i* qt2) {
  constexpr int NL = NQV * L;
  alignas(64) float qt[MAX_HEAD_DIM * NL];  // [head_dim][NL] scaled queries, as tile_lanes
  queries_transposed<NL>(t, qt);
  for (int32_t p = 0; p < t.head_dim / 2; ++p) {
    for (int v = 0; v < NQV; ++v) {
      qt2[p * NQV + v] = bf16_pairs(_mm512_load_ps(qt + 2 * p * NL + v * L), _mm512_load_ps(qt + (2 * p + 1) * NL + v * L));
    }
  }
}

template <int NQV>
BP_TARGET_AVX512_BF16 void tile_lanes_bf16(const AttentionTile& t) {
  constexpr int NL = NQV * L;
  const int32_t hd = t.head_dim, n_dpairs = hd / 2;
  alignas(64) __m512i qt2[MAX_HEAD_DIM / 2 * NQV];       // [head_dim / 2][NQV]: scaled query pairs, 0 in unused lanes
  alignas(64) float ot[MAX_HEAD_DIM * NL];                // [head_dim][NL] output accumulators
  alignas(64) float st[LANE_BLOCK * NL];                  // [LANE_BLOCK][NL] scores, then probabilities
  alignas(64) __m512i pt2[LANE_BLOCK / 2 * NQV];          // [LANE_BLOCK / 2][NQV] probability pairs
  alignas(64) uint16_t kb[LANE_BLOCK * MAX_HEAD_DIM];     // [LANE_BLOCK][head_dim] the key block as bf16
  alignas(64) uint32_t vt2[LANE_BLOCK / 2 * MAX_HEAD_DIM];  // [LANE_BLOCK / 2][head_dim] value pairs
  prefetch_tile_start(t);
  // The queries are transposed after the first block's keys and values are rounded: that gives
  // their prefetches time to arrive (the rows were mostly written by the other core).
  bool have_queries = false;
  for (int32_t x = 0; x < hd * NL; x += L) _mm512_store_ps(ot + x, _mm512_setzero_ps());

  __m512i lim[NQV];
  __m512 m[NQV], l[NQV];
  lanes_start<NQV>(t, lim, m, l);
  const __mmask16 tail = head_mask(hd, (hd - 1) / L);  // lanes of a row's last 16-float vector

  const int64_t n_keys = t.n_keys0 + t.n_rows - 1;
  RoundedKv* const kept = rounded_kv(t, LANE_BLOCK);
  int32_t block = 0;  // the block's place in the walk over the sources
  int64_t key0 = 0;
  for (int32_t src = 0; src < t.n_kv && key0 < n_keys; ++src) {
    const KvRowsView& kv = t.kv[src];
    const int64_t n_use = min_i64(kv.n, n_keys - key0);
    for (int64_t j0 = 0; j0 < n_use; j0 += LANE_BLOCK, ++block) {
      const int32_t n_block = static_cast<int32_t>(min_i64(LANE_BLOCK, n_use - j0));
      const int32_t n_kpairs = (n_block + 1) / 2;
      const float* k = kv.k + j0 * t.kv_stride;
      const float* v = kv.v + j0 * t.kv_stride;
      // The block's keys as bf16 rows, its values as pairs of rows (an odd block's last with 0):
      // kept by an earlier tile of this thread when it rounded exactly these (or more, in whole
      // pairs), else rounded here, into the thread's store when the block fits there.
      uint16_t* kbb = kb;
      uint32_t* vtb = vt2;
      bool round = true;
      if (kept != nullptr && block < kept->n_blocks) {
        const int32_t done = kept->n_done[static_cast<size_t>(block)];
        if (done == n_block || (done > n_block && n_block % 2 == 0)) {
          kbb = kept->keys(block);
          vtb = kept->pairs(block);
          round = false;
        } else if (done < n_block) {
          kbb = kept->keys(block);
          vtb = kept->pairs(block);
          kept->n_done[static_cast<size_t>(block)] = n_block;
        }
      }
      const int64_t ahead = int64_t{LANE_BLOCK} * t.kv_stride;  // the next block's rows, for the cache
      for (int32_t j = 0; round && j < n_block; ++j) {
        prefetch_row(k + j * t.kv_stride, ahead, 0, hd);
        prefetch_row(v + j * t.kv_stride, ahead, 0, hd);
        for (int32_t d = 0; d < hd; d += L) {
          const __mmask16 mk = d + L <= hd ? static_cast<__mmask16>(0xFFFF) : tail;
          const __m256i b = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, k + j * t.kv_stride + d)));
          _mm256_mask_storeu_epi16(kbb + j * hd + d, mk, b);
        }
      }
      for (int32_t i = 0; round && i < n_kpairs; ++i) {
        const float* v0 = v + 2 * i * t.kv_stride;
        const bool has_second = 2 * i + 1 < n_block;
        for (int32_t d = 0; d < hd; d += L) {
          const __mmask16 mk = d + L <= hd ? static_cast<__mmask16>(0xFFFF) : tail;
          const __m512 a = _mm512_maskz_loadu_ps(mk, v0 + d);
          const __m512 b = has_second ? _mm512_maskz_loadu_ps(mk, v0 + t.kv_stride + d) : _mm512_setzero_ps();
          _mm512_mask_storeu_epi32(vtb + i * hd + d, mk, bf16_pairs(a, b));
        }
      }

      if (!have_queries) {
        query_pairs<NQV>(t, qt2);
        have_queries = true;
      }
      const int32_t key = static_cast<int32_t>(key0 + j0);
      int32_t j = 0;
      for (; j + 4 <= n_block; j += 4) lane_scores_bf16<NQV, 4>(qt2, n_dpairs, kbb + j * hd, hd, key + j, lim, st + j * NL);
      for (; j < n_block; ++j) lane_scores_bf16<NQV, 1>(qt2, n_dpairs, kbb + j * hd, hd, key + j, lim, st + j * NL);

      // Online softmax in f32, as tile_lanes; then the probabilities in pairs of keys.
      for (int u = 0; u < NQV; ++u) {
        const __m512 m_new = lanes_new_max<NL>(st + u * L, n_block, hd, m[u], l[u], ot + u * L);
        __m512 sum = _mm512_setzero_ps();
        for (int32_t i = 0; i < n_kpairs; ++i) {
          const __m512 p0 = exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(st + 2 * i * NL + u * L), m_new));
          const __m512 p1 = 2 * i + 1 < n_block
                                ? exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(st + (2 * i + 1) * NL + u * L), m_new))
                                : _mm512_setzero_ps();
          pt2[i * NQV + u] = bf16_pairs(p0, p1);
          sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
        }
        l[u] = _mm512_add_ps(l[u], sum);
      }

      int32_t d = 0;
      for (; d + 4 <= hd; d += 4) lane_pv_bf16<NQV, 4>(pt2, n_kpairs, vtb + d, hd, ot + d * NL);
      for (; d < hd; ++d) lane_pv_bf16<NQV, 1>(pt2, n_kpairs, vtb + d, hd, ot + d * NL);
    }
    key0 += kv.n;
  }

  alignas(64) float inv_l[NL];
  for (int u = 0; u < NQV; ++u) _mm512_store_ps(inv_l + u * L, _mm512_div_ps(_mm512_set1_ps(1.0f), l[u]));
  outputs_transposed<NL>(t, ot, inv_l);
}

// ---------------------------------------------------------------------------------------------
// Dots shape: up to DOT_MAX_Q query vectors, NV vectors of 16 head dimensions each. Query vector i
// reads columns col[i] .. col[i] + head_dim of the K/V rows (its key/value head); a tile over
// several key/value heads reads each key row's heads together, contiguously.

// o[i] += sum_j p[i][j] V[j][col[i] ...] over n_block keys, for NI query vectors.
template <int NV, int NI>
BP_TARGET_AVX512 void dot_pv(const float* p, const int64_t* col, int32_t n_block, const float* v, int64_t vs,
                             __mmask16 last, float* o) {
  constexpr int NP = NV * L;
  __m512 acc[NI][NV];
#pragma GCC unroll 8
  for (int i = 0; i < NI; ++i) {
#pragma GCC unroll 8
    for (int u = 0; u < NV; ++u) acc[i][u] = _mm512_load_ps(o + i * NP + u * L);
  }
  for (int32_t j = 0; j < n_block; ++j) {
    const float* vj = v + j * vs;
#pragma GCC unroll 8
    for (int i = 0; i < NI; ++i) {
      const __m512 pb = _mm512_set1_ps(p[i * DOT_BLOCK + j]);
#pragma GCC unroll 8
      for (int u = 0; u < NV; ++u) {
        const __m512 vv = u + 1 < NV ? _mm512_loadu_ps(vj + col[i] + u * L) : _mm512_maskz_loadu_ps(last, vj + col[i] + u * L);
        acc[i][u] = _mm512_fmadd_ps(pb, vv, acc[i][u]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < NI; ++i) {
#pragma GCC unroll 8
    for (int u = 0; u < NV; ++u) _mm512_store_ps(o + i * NP + u * L, acc[i][u]);
  }
}

// The horizontal sums of 16 vectors as one vector: lane i = the sum of a[i]'s 16 lanes. Pairs of
// vectors are interleaved and added, halving the lanes each vector sums over: 45 instructions,
// where 16 separate reductions take 128.
BP_TARGET_AVX512 inline __m512 sums16(const __m512* a) {
  __m512 t[8], u[4], w[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: [a0 + a2, b0 + b2, a1 + a3, b1 + b3]
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the four vectors' sums over that lane
    const __m512d x = _mm512_castps_pd(t[2 * i]), y = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {  // 128-bit lanes added in pairs
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88), _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}

// Scores of query vector i (qs: its NV scaled vectors) against the n (<= 16) keys whose rows
// start at k, kv_stride apart, reading columns col ... col + head_dim: one vector of 16 lanes,
// lane j for key j (lanes from n on: 0).
template <int NV>
BP_TARGET_AVX512 inline __m512 scores16(const float* qs, const float* k, int64_t kv_stride, int32_t n, __mmask16 last) {
  __m512 q[NV], acc[L];
#pragma GCC unroll 8
  for (int u = 0; u < NV; ++u) q[u] = _mm512_load_ps(qs + u * L);
#pragma GCC unroll 16
  for (int j = 0; j < L; ++j) {
    if (j >= n) {
      acc[j] = _mm512_setzero_ps();
      continue;
    }
    const float* kj = k + j * kv_stride;
    acc[j] = _mm512_mul_ps(NV > 1 ? _mm512_loadu_ps(kj) : _mm512_maskz_loadu_ps(last, kj), q[0]);
#pragma GCC unroll 8
    for (int u = 1; u < NV; ++u) {
      const __m512 kk = u + 1 < NV ? _mm512_loadu_ps(kj + u * L) : _mm512_maskz_loadu_ps(last, kj + u * L);
      acc[j] = _mm512_fmadd_ps(kk, q[u], acc[j]);
    }
  }
  return sums16(acc);
}

template <int NV>
BP_TARGET_AVX512 void tile_dots(const AttentionTile& t) {
  constexpr int NP = NV * L;
  constexpr int NI_MAX = 24 / NV < 8 ? 24 / NV : 8;  // query vectors per PV pass: NI * NV accumulators
  const int32_t hd = t.head_dim, n_heads = t.n_kv_heads * t.n_group, n_q = t.n_rows * n_heads;
  const __mmask16 last = head_mask(hd, NV - 1);
  alignas(64) float qs[DOT_MAX_Q * NP];         // [n_q][NP] scaled queries, zero-padded
  alignas(64) float o[DOT_MAX_Q * NP];          // [n_q][NP] output accumulators
  alignas(64) float s[DOT_MAX_Q * DOT_BLOCK];   // [n_q][DOT_BLOCK] scores, then probabilities
  float m[DOT_MAX_Q], l[DOT_MAX_Q];
  int64_t n_seen[DOT_MAX_Q], col[DOT_MAX_Q];
  for (int32_t i = 0; i < n_q; ++i) {
    const int32_t head = i % n_heads;
    const float* q = t.q + (i / n_heads) * t.ldq + static_cast<int64_t>(head) * hd;
    for (int u = 0; u < NV; ++u) {
      const __mmask16 mk = head_mask(hd, u);
      _mm512_store_ps(qs + i * NP + u * L, _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, q + u * L), _mm512_set1_ps(t.scale)));
      _mm512_store_ps(o + i * NP + u * L, _mm512_setzero_ps());
    }
    m[i] = -INFINITY;
    l[i] = 0.0f;
    n_seen[i] = t.n_keys0 + i / n_heads;
    col[i] = static_cast<int64_t>(head / t.n_group) * hd;
  }
  const int64_t span = static_cast<int64_t>(t.n_kv_heads) * hd;  // columns of a row the tile reads
  const int64_t ahead = DOT_PREFETCH_ROWS * t.kv_stride;
  // A tile over every key/value head reads whole rows, K and V each one contiguous run that the
  // hardware prefetchers follow; prefetching them as well only costs instructions.
  const bool prefetch = span < t.kv_stride;

  const int64_t n_keys = t.n_keys0 + t.n_rows - 1;
  int64_t key0 = 0;
  for (int32_t src = 0; src < t.n_kv && key0 < n_keys; ++src) {
    const KvRowsView& kv = t.kv[src];
    const int64_t n_use = min_i64(kv.n, n_keys - key0);
    for (int64_t j0 = 0; j0 < n_use; j0 += DOT_BLOCK) {
      const int32_t n_block = static_cast<int32_t>(min_i64(DOT_BLOCK, n_use - j0));
      // Scores, 16 keys at a time per query vector (lanes past n_block or past the keys the
      // vector sees: -inf).
      for (int32_t j = 0; j < n_block; j += L) {
        const int32_t n = n_block - j < L ? n_block - j : L;
        const float* k = kv.k + (j0 + j) * t.kv_stride;
        for (int32_t jj = 0; jj < n && prefetch; ++jj) {  // K, and V for the pass over values below
          prefetch_row(k + jj * t.kv_stride, ahead, 0, span);
          prefetch_row(kv.v + (j0 + j + jj) * t.kv_stride, ahead, 0, span);
        }
        const int64_t key = key0 + j0 + j;
        for (int32_t i = 0; i < n_q; ++i) {
          const int64_t seen = min_i64(n, n_seen[i] - key);  // > 0 keys of these this vector sees
          const __mmask16 live = seen <= 0 ? 0 : static_cast<__mmask16>((1u << seen) - 1);
          const __m512 sc = scores16<NV>(qs + i * NP, k + col[i], t.kv_stride, n, last);
          _mm512_store_ps(s + i * DOT_BLOCK + j, _mm512_mask_blend_ps(live, _mm512_set1_ps(-INFINITY), sc));
        }
      }
      // Online softmax per query vector (every one sees key 0: m is finite after block 0).
      for (int32_t i = 0; i < n_q; ++i) {
        float* si = s + i * DOT_BLOCK;
        __m512 mv = _mm512_set1_ps(-INFINITY);
        int32_t j = 0;
        for (; j + L <= n_block; j += L) mv = _mm512_max_ps(mv, _mm512_load_ps(si + j));
        float m_new = _mm512_reduce_max_ps(mv);
        for (; j < n_block; ++j) m_new = si[j] > m_new ? si[j] : m_new;
        m_new = m[i] > m_new ? m[i] : m_new;
        const __m512 mb = _mm512_set1_ps(m_new);
        const __m512 alpha = exp_ps(_mm512_set1_ps(m[i] - m_new));
        __m512 sum = _mm512_setzero_ps();
        for (j = 0; j < n_block; j += L) {
          const __mmask16 mk = n_block - j >= L ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n_block - j)) - 1);
          const __m512 p = _mm512_maskz_mov_ps(mk, exp_ps(_mm512_sub_ps(_mm512_maskz_load_ps(mk, si + j), mb)));
          _mm512_mask_store_ps(si + j, mk, p);
          sum = _mm512_add_ps(sum, p);
        }
        l[i] = l[i] * _mm512_cvtss_f32(alpha) + _mm512_reduce_add_ps(sum);
        m[i] = m_new;
        for (int u = 0; u < NV; ++u) {
          float* ou = o + i * NP + u * L;
          _mm512_store_ps(ou, _mm512_mul_ps(_mm512_load_ps(ou), alpha));
        }
      }
      // Values: the block's V rows, read for NI_MAX query vectors at a time.
      const float* v = kv.v + j0 * t.kv_stride;
      int32_t i = 0;
      for (; i + NI_MAX <= n_q; i += NI_MAX) dot_pv<NV, NI_MAX>(s + i * DOT_BLOCK, col + i, n_block, v, t.kv_stride, last, o + i * NP);
      for (; i + 2 <= n_q; i += 2) dot_pv<NV, 2>(s + i * DOT_BLOCK, col + i, n_block, v, t.kv_stride, last, o + i * NP);
      for (; i < n_q; ++i) dot_pv<NV, 1>(s + i * DOT_BLOCK, col + i, n_block, v, t.kv_stride, last, o + i * NP);
    }
    key0 += kv.n;
  }

  for (int32_t i = 0; i < n_q; ++i) {
    if (t.partial != nullptr) {
      float* part = t.partial + static_cast<int64_t>(i) * (hd + 2);
      part[0] = m[i];
      part[1] = l[i];
      for (int u = 0; u < NV; ++u) _mm512_mask_storeu_ps(part + 2 + u * L, head_mask(hd, u), _mm512_load_ps(o + i * NP + u * L));
      continue;
    }
    float* out = t.out + (i / n_heads) * t.ldo + static_cast<int64_t>(i % n_heads) * hd;
    const __m512 inv_l = _mm512_set1_ps(1.0f / l[i]);
    for (int u = 0; u < NV; ++u) {
      _mm512_mask_storeu_ps(out + u * L, head_mask(hd, u), _mm512_mul_ps(_mm512_load_ps(o + i * NP + u * L), inv_l));
    }
  }
}

}  // namespace

BP_TARGET_AVX512 void attention_tile_avx512(const AttentionTile& t) {
  const int32_t n_q = t.n_rows * t.n_kv_heads * t.n_group;
  if (t.head_dim > MAX_HEAD_DIM || n_q > 4 * L || (n_q > DOT_MAX_Q && (t.n_kv_heads > 1 || t.partial != nullptr))) {
    attention_tile_portable(t);
    return;
  }
  if (n_q >= DOT_MAX_Q && t.n_kv_heads == 1 && t.partial == nullptr) {
    static const bool has_bf16 = __builtin_cpu_supports("avx512bf16");
    if (t.bf16 && has_bf16 && t.head_dim % 2 == 0) {
      switch ((n_q + L - 1) / L) {
        case 1: tile_lanes_bf16<1>(t); return;
        case 2: tile_lanes_bf16<2>(t); return;
        case 3: tile_lanes_bf16<3>(t); return;
        default: tile_lanes_bf16<4>(t); return;
      }
    }
    switch ((n_q + L - 1) / L) {
      case 1: tile_lanes<1>(t); return;
      case 2: tile_lanes<2>(t); return;
      case 3: tile_lanes<3>(t); return;
      default: tile_lanes<4>(t); return;
    }
  }
  switch ((t.head_dim + L - 1) / L) {
    case 1: tile_dots<1>(t); return;
    case 2: tile_dots<2>(t); return;
    case 3: tile_dots<3>(t); return;
    case 4: tile_dots<4>(t); return;
    case 5: tile_dots<5>(t); return;
    case 6: tile_dots<6>(t); return;
    case 7: tile_dots<7>(t); return;
    default: tile_dots<8>(t); return;
  }
}

}  // namespace backprompt::detail

#else  // not x86

namespace backprompt::detail {
void attention_tile_avx512(const AttentionTile& t) { attention_tile_portable(t); }
}  // namespace backprompt::detail

#endif
