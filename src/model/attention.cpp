// Attention over a chain of K/V spans, read in place (no copying of prefixes).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "backprompt/error.h"
#include "model/batch.h"

namespace backprompt::detail {

Batch::Batch(const ModelConfig& c, std::span<const ForwardSpan> s) : cfg(c), spans(s) {
  row0.resize(spans.size() + 1);
  for (size_t i = 0; i < spans.size(); ++i) {
    const ForwardSpan& sp = spans[i];
    int64_t n_past = 0;
    for (const KvSpanView& p : sp.past) n_past += p.n_tokens;
    if (n_past != sp.pos0)
      throw Error(ErrorCode::INVALID_ARGUMENT, "forward: span " + std::to_string(i) + " starts at position " +
                                                   std::to_string(sp.pos0) + " but its ancestors hold " +
                                                   std::to_string(n_past) + " tokens");
    if (sp.pos0 + static_cast<int64_t>(sp.tokens.size()) > cfg.n_ctx)
      throw Error(ErrorCode::INVALID_ARGUMENT, "forward: sequence of " + std::to_string(sp.pos0 + sp.tokens.size()) +
                                                   " tokens exceeds the model's context length " + std::to_string(cfg.n_ctx));
    row0[i + 1] = row0[i] + static_cast<int64_t>(sp.tokens.size());
    for (size_t t = 0; t < sp.tokens.size(); ++t) {
      const int32_t id = sp.tokens[t];
      if (id < 0 || id >= cfg.n_vocab)
        throw Error(ErrorCode::INVALID_ARGUMENT, "forward: token id " + std::to_string(id) + " is outside the vocabulary (" +
                                                     std::to_string(cfg.n_vocab) + ")");
      tokens.push_back(id);
      pos.push_back(sp.pos0 + static_cast<int32_t>(t));
    }
  }
  n_rows = row0.back();
}

static int64_t out_stride(const ForwardSpan& sp, int64_t kv_dim) {
  return sp.out_layer_stride ? sp.out_layer_stride : static_cast<int64_t>(sp.tokens.size()) * kv_dim;
}

void store_kv(const Batch& b, int32_t layer, const float* k, const float* v) {
  const int64_t kv_dim = b.cfg.kv_dim();
  for (size_t s = 0; s < b.spans.size(); ++s) {
    const ForwardSpan& sp = b.spans[s];
    const int64_t n = b.row0[s + 1] - b.row0[s];
    const int64_t off = layer * out_stride(sp, kv_dim);
    std::memcpy(sp.k_out + off, k + b.row0[s] * kv_dim, static_cast<size_t>(n * kv_dim) * sizeof(float));
    std::memcpy(sp.v_out + off, v + b.row0[s] * kv_dim, static_cast<size_t>(n * kv_dim) * sizeof(float));
  }
}

namespace {

// Dot product with 8 independent partial sums, so the compiler can keep them in one vector.
inline float dot(const float* a, const float* b, int32_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int32_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// One key/value source for a query: n rows of K and V for one layer, row stride kv_dim.
struct KvRows {
  const float* k;
  const float* v;
  int64_t n;
};

}  // namespace

void attention(const Batch& b, int32_t layer, const float* q, float* out) {
  const ModelConfig& c = b.cfg;
  const int32_t hd = c.head_dim, n_head = c.n_head, group = c.n_head / c.n_kv_head;
  const int64_t kv_dim = c.kv_dim(), q_dim = static_cast<int64_t>(n_head) * hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

  // Per span: where this layer's K/V lie, ancestors first, then the span itself.
  std::vector<std::vector<KvRows>> sources(b.spans.size());
  for (size_t s = 0; s < b.spans.size(); ++s) {
    const ForwardSpan& sp = b.spans[s];
    for (const KvSpanView& p : sp.past) {
      if (p.n_tokens == 0) continue;
      const int64_t stride = p.layer_stride ? p.layer_stride : static_cast<int64_t>(p.n_tokens) * kv_dim;
      sources[s].push_back({p.k + layer * stride, p.v + layer * stride, p.n_tokens});
    }
    const int64_t off = layer * out_stride(sp, kv_dim);
    sources[s].push_back({sp.k_out + off, sp.v_out + off, static_cast<int64_t>(sp.tokens.size())});
  }

  // Work items: (row, head). Rows of one span share their sources.
  std::vector<int32_t> span_of_row(static_cast<size_t>(b.n_rows));
  for (size_t s = 0; s < b.spans.size(); ++s)
    for (int64_t r = b.row0[s]; r < b.row0[s + 1]; ++r) span_of_row[static_cast<size_t>(r)] = static_cast<int32_t>(s);
  const int64_t n_items = b.n_rows * n_head;

#pragma omp parallel
  {
    std::vector<float> scores;  // [n_keys] of the current query
#pragma omp for schedule(dynamic, 4)
    for (int64_t item = 0; item < n_items; ++item) {
      const int64_t r = item / n_head;
      const int32_t h = static_cast<int32_t>(item % n_head);
      const int32_t s = span_of_row[static_cast<size_t>(r)];
      const int64_t self_rows = r - b.row0[static_cast<size_t>(s)] + 1;  // own rows visible: 0 .. r
      const float* qr = q + r * q_dim + static_cast<int64_t>(h) * hd;
      const int64_t kv_off = static_cast<int64_t>(h / group) * hd;
      const std::vector<KvRows>& src = sources[static_cast<size_t>(s)];

      int64_t n_keys = 0;
      for (size_t i = 0; i + 1 < src.size(); ++i) n_keys += src[i].n;
      n_keys += self_rows;
      scores.resize(static_cast<size_t>(n_keys));

      float max_score = -INFINITY;
      int64_t j = 0;
      for (size_t i = 0; i < src.size(); ++i) {
        const int64_t n = (i + 1 == src.size()) ? self_rows : src[i].n;
        for (int64_t t = 0; t < n; ++t, ++j) {
          const float sc = dot(qr, src[i].k + t * kv_dim + kv_off, hd) * scale;
          scores[static_cast<size_t>(j)] = sc;
          max_score = std::max(max_score, sc);
        }
      }
      float sum = 0.0f;
      for (int64_t t = 0; t < n_keys; ++t) {
        const float e = std::exp(scores[static_cast<size_t>(t)] - max_score);
        scores[static_cast<size_t>(t)] = e;
        sum += e;
      }
      const float inv_sum = 1.0f / sum;
      float* o = out + r * q_dim + static_cast<int64_t>(h) * hd;
      std::fill(o, o + hd, 0.0f);
      j = 0;
      for (size_t i = 0; i < src.size(); ++i) {
        const int64_t n = (i + 1 == src.size()) ? self_rows : src[i].n;
        for (int64_t t = 0; t < n; ++t, ++j) {
          const float w = scores[static_cast<size_t>(j)] * inv_sum;
          const float* vr = src[i].v + t * kv_dim + kv_off;
          for (int32_t d = 0; d < hd; ++d) o[d] += w * vr[d];
        }
      }
    }
  }
}

}  // namespace backprompt::detail
