// GPT-2: learned position embeddings, pre-LayerNorm blocks with biases, fused QKV, GELU MLP.
#include <cstring>
#include <vector>

#include "model/arch.h"
#include "model/ops.h"

namespace backprompt::detail {

void gpt2_hidden(const ModelImpl& m, const Batch& b, float* x) {
  const ModelConfig& c = m.config;
  const int64_t n = b.n_rows, d = c.n_embd, ff = c.n_ff;

  std::vector<float> pe(static_cast<size_t>(d));
  for (int64_t r = 0; r < n; ++r) {
    matrix_get_row(m.token_embd, b.tokens[static_cast<size_t>(r)], x + r * d);
    matrix_get_row(m.position_embd, b.pos[static_cast<size_t>(r)], pe.data());
    ops::add(x + r * d, pe.data(), d);
  }

  std::vector<float> h(static_cast<size_t>(n * d));        // [n][d] normalized input
  std::vector<float> qkv(static_cast<size_t>(n * 3 * d));  // [n][3d]
  std::vector<float> q(static_cast<size_t>(n * d)), k(static_cast<size_t>(n * d)), v(static_cast<size_t>(n * d));  // [n][d]
  std::vector<float> att(static_cast<size_t>(n * d));      // [n][d] attention output
  std::vector<float> up(static_cast<size_t>(n * ff));      // [n][ff]

  for (int32_t il = 0; il < c.n_layer; ++il) {
    const LayerWeights& L = m.layers[static_cast<size_t>(il)];
    ops::layer_norm(x, h.data(), n, d, L.attn_norm_w.data(), L.attn_norm_b.data(), c.norm_eps);
    matmul(L.attn_qkv, h.data(), n, qkv.data());
    ops::add_bias(qkv.data(), n, 3 * d, L.attn_qkv_b.data());
    for (int64_t r = 0; r < n; ++r) {
      const float* src = qkv.data() + r * 3 * d;
      std::memcpy(q.data() + r * d, src, static_cast<size_t>(d) * sizeof(float));
      std::memcpy(k.data() + r * d, src + d, static_cast<size_t>(d) * sizeof(float));
      std::memcpy(v.data() + r * d, src + 2 * d, static_cast<size_t>(d) * sizeof(float));
    }
    store_kv(b, il, k.data(), v.data());
    attention(b, il, q.data(), att.data());
    matmul(L.attn_out, att.data(), n, h.data());
    ops::add_bias(h.data(), n, d, L.attn_out_b.data());
    ops::add(x, h.data(), n * d);

    ops::layer_norm(x, h.data(), n, d, L.ffn_norm_w.data(), L.ffn_norm_b.data(), c.norm_eps);
    matmul(L.ffn_up, h.data(), n, up.data());
    ops::add_bias(up.data(), n, ff, L.ffn_up_b.data());
    ops::gelu(up.data(), n * ff);
    matmul(L.ffn_down, up.data(), n, h.data());
    ops::add_bias(h.data(), n, d, L.ffn_down_b.data());
    ops::add(x, h.data(), n * d);
  }
  ops::layer_norm(x, x, n, d, m.output_norm_w.data(), m.output_norm_b.data(), c.norm_eps);
}

}  // namespace backprompt::detail
