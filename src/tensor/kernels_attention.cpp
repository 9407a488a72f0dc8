// attention_tile(): the dispatcher, and the portable implementation (plain C++, any CPU; the
// reference the AVX-512 one is tested against).
//
// Portable algorithm, per query vector: keys in blocks of ATTN_BLOCK, scores of a block, then a
// running-maximum ("online") softmax update of the output accumulator:
//   m' = max(m, max_j s_j),  l' = l e^(m - m') + sum_j e^(s_j - m'),  o' = o e^(m - m') + sum_j e^(s_j - m') v_j
// and out = o / l at the end. Equal to softmax(s) V up to f32 rounding.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "backprompt/error.h"
#include "tensor/kernels_simd.h"

namespace backprompt {

namespace detail {

namespace {

constexpr int64_t ATTN_BLOCK = 64;  // keys per block

float dot(const float* a, const float* b, int32_t n) {
  float acc[8] = {};
  int32_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

void attention_tile_portable(const AttentionTile& t) {
  const int32_t hd = t.head_dim;
  thread_local std::vector<float> o;  // [head_dim] output accumulator of one query vector
  o.resize(static_cast<size_t>(hd));
  float s[ATTN_BLOCK];  // scores, then probabilities, of one key block
  const int32_t n_heads = t.n_kv_heads * t.n_group, n_q = t.n_rows * n_heads;
  for (int32_t i = 0; i < n_q; ++i) {
    const int32_t row = i / n_heads, head = i % n_heads;
    const float* q = t.q + row * t.ldq + static_cast<int64_t>(head) * hd;
    const int64_t col = static_cast<int64_t>(head / t.n_group) * hd;  // its key/value head
    const int64_t n_visible = t.n_keys0 + row;
    float m = -INFINITY, l = 0.0f;
    std::fill(o.begin(), o.end(), 0.0f);
    int64_t key0 = 0;  // index of the source's first key among all keys
    for (int32_t src = 0; src < t.n_kv && key0 < n_visible; ++src) {
      const KvRowsView& kv = t.kv[src];
      const int64_t n_use = std::min(kv.n, n_visible - key0);
      for (int64_t j0 = 0; j0 < n_use; j0 += ATTN_BLOCK) {
        const int64_t n_block = std::min(ATTN_BLOCK, n_use - j0);
        float m_block = -INFINITY;
        for (int64_t j = 0; j < n_block; ++j) {
          s[j] = dot(q, kv.k + (j0 + j) * t.kv_stride + col, hd) * t.scale;
          m_block = std::max(m_block, s[j]);
        }
        const float m_new = std::max(m, m_block);
        const float alpha = std::exp(m - m_new);  // 0 for the first block (m = -inf)
        l *= alpha;
        for (int32_t d = 0; d < hd; ++d) o[static_cast<size_t>(d)] *= alpha;
        for (int64_t j = 0; j < n_block; ++j) {
          const float p = std::exp(s[j] - m_new);
          l += p;
          const float* v = kv.v + (j0 + j) * t.kv_stride + col;
          for (int32_t d = 0; d < hd; ++d) o[static_cast<size_t>(d)] += p * v[d];
        }
        m = m_new;
      }
      key0 += kv.n;
    }
    if (t.partial != nullptr) {
      float* part = t.partial + static_cast<int64_t>(i) * (hd + 2);
      part[0] = m;
      part[1] = l;
      std::copy(o.begin(), o.end(), part + 2);
      continue;
    }
    float* out = t.out + row * t.ldo + static_cast<int64_t>(head) * hd;
    const float inv_l = 1.0f / l;
    for (int32_t d = 0; d < hd; ++d) out[d] = o[static_cast<size_t>(d)] * inv_l;
  }
}

}  // namespace detail

void attention_merge(const AttentionTile& t, const float* const* parts, int n_parts) {
  BP_ASSERT(n_parts >= 1 && t.head_dim >= 1);
  const int32_t hd = t.head_dim, n_heads = t.n_kv_heads * t.n_group, n_q = t.n_rows * n_heads;
  for (int32_t i = 0; i < n_q; ++i) {
    const int64_t at = static_cast<int64_t>(i) * (hd + 2);
    float m = -INFINITY;
    for (int p = 0; p < n_parts; ++p) m = std::max(m, parts[p][at]);
    float* out = t.out + (i / n_heads) * t.ldo + static_cast<int64_t>(i % n_heads) * hd;
    std::fill(out, out + hd, 0.0f);
    float l = 0.0f;
    for (int p = 0; p < n_parts; ++p) {
      const float* part = parts[p] + at;
      const float w = std::exp(part[0] - m);  // 1 for the part holding the maximum
      l += part[1] * w;
      for (int32_t d = 0; d < hd; ++d) out[d] += part[2 + d] * w;
    }
    const float inv_l = 1.0f / l;
    for (int32_t d = 0; d < hd; ++d) out[d] *= inv_l;
  }
}

uint64_t next_kv_epoch() {
  static std::atomic<uint64_t> last{0};
  return last.fetch_add(1, std::memory_order_relaxed) + 1;
}

void attention_tile(const AttentionTile& t) {
  BP_ASSERT(t.n_rows >= 0 && t.n_kv_heads >= 1 && t.n_group >= 1 && t.head_dim >= 1 && t.n_keys0 >= 1);
  if (t.n_rows == 0) return;
  detail::kernel_isa().attention_tile(t);
}

}  // namespace backprompt
