// Llama: RMSNorm, RoPE on adjacent pairs, grouped-query attention, SwiGLU MLP, no biases.
#include <vector>

#include "model/arch.h"
#include "model/ops.h"

namespace backprompt::detail {

void llama_hidden(const ModelImpl& m, const Batch& b, float* x) {
  const ModelConfig& c = m.config;
  const int64_t n = b.n_rows, d = c.n_embd, ff = c.n_ff, kv = c.kv_dim();

  for (int64_t r = 0; r < n; ++r) matrix_get_row(m.token_embd, b.tokens[static_cast<size_t>(r)], x + r * d);

  std::vector<float> h(static_cast<size_t>(n * d));      // [n][d] normalized input
  std::vector<float> q(static_cast<size_t>(n * d));      // [n][n_head][head_dim]
  std::vector<float> k(static_cast<size_t>(n * kv));     // [n][n_kv_head][head_dim]
  std::vector<float> v(static_cast<size_t>(n * kv));     // [n][n_kv_head][head_dim]
  std::vector<float> att(static_cast<size_t>(n * d));    // [n][d] attention output
  std::vector<float> gate(static_cast<size_t>(n * ff));  // [n][ff]
  std::vector<float> up(static_cast<size_t>(n * ff));    // [n][ff]

  for (int32_t il = 0; il < c.n_layer; ++il) {
    const LayerWeights& L = m.layers[static_cast<size_t>(il)];
    ops::rms_norm(x, h.data(), n, d, L.attn_norm_w.data(), c.norm_eps);
    matmul(L.attn_q, h.data(), n, q.data());
    matmul(L.attn_k, h.data(), n, k.data());
    matmul(L.attn_v, h.data(), n, v.data());
#pragma omp parallel for if (n >= 4)
    for (int64_t r = 0; r < n; ++r) {
      const int32_t p = b.pos[static_cast<size_t>(r)];
      ops::rope(q.data() + r * d, c.n_head, c.head_dim, c.rope_dim, c.rope_base, p);
      ops::rope(k.data() + r * kv, c.n_kv_head, c.head_dim, c.rope_dim, c.rope_base, p);
    }
    store_kv(b, il, k.data(), v.data());
    attention(b, il, q.data(), att.data());
    matmul(L.attn_out, att.data(), n, h.data());
    ops::add(x, h.data(), n * d);

    ops::rms_norm(x, h.data(), n, d, L.ffn_norm_w.data(), c.norm_eps);
    matmul(L.ffn_gate, h.data(), n, gate.data());
    matmul(L.ffn_up, h.data(), n, up.data());
    ops::swiglu(gate.data(), up.data(), n * ff);
    matmul(L.ffn_down, gate.data(), n, h.data());
    ops::add(x, h.data(), n * d);
  }
  ops::rms_norm(x, x, n, d, m.output_norm_w.data(), c.norm_eps);
}

}  // namespace backprompt::detail
