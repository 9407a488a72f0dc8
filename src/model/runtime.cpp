// forward(): embeddings and blocks by architecture, then logits for the rows that want them.
#include "model/runtime.h"

#include <algorithm>
#include <cstring>
#include <memory>

#include "backprompt/error.h"
#include "model/arch.h"
#include "model/batch.h"

namespace backprompt {

void forward(const Model& model, std::span<const ForwardSpan> batch) {
  const detail::ModelImpl& m = model.impl();
  const ModelConfig& c = m.config;
  const detail::Batch b(c, batch);
  if (b.n_rows == 0) return;

  detail::BigVector<float> x(static_cast<size_t>(b.n_rows * c.n_embd));  // [n_rows][n_embd], written whole by *_hidden
  if (c.arch == Arch::GPT2) detail::gpt2_hidden(m, b, x.data());
  else detail::llama_hidden(m, b, x.data());

  // Gather the rows that want logits, project them all at once, scatter the results.
  std::vector<int64_t> rows;                 // [n_out] batch row of each output
  std::vector<float*> dst;                   // [n_out] where its logits go
  for (size_t s = 0; s < batch.size(); ++s) {
    const ForwardSpan& sp = batch[s];
    const int64_t n = b.row0[s + 1] - b.row0[s];
    if (n == 0 || sp.logits == LogitsMode::NONE) continue;
    BP_ASSERT(sp.logits_out != nullptr);
    if (sp.logits == LogitsMode::LAST) {
      rows.push_back(b.row0[s + 1] - 1);
      dst.push_back(sp.logits_out);
    } else {
      for (int64_t i = 0; i < n; ++i) {
        rows.push_back(b.row0[s] + i);
        dst.push_back(sp.logits_out + i * c.n_vocab);
      }
    }
  }
  if (rows.empty()) return;
  const int64_t n_out = static_cast<int64_t>(rows.size());
  detail::BigVector<float> h(static_cast<size_t>(n_out * c.n_embd));  // [n_out][n_embd]
  for (int64_t i = 0; i < n_out; ++i)
    std::memcpy(h.data() + i * c.n_embd, x.data() + rows[static_cast<size_t>(i)] * c.n_embd, c.n_embd * sizeof(float));
  // Rows bound for one contiguous destination (one span's ALL, or a single LAST) are written in
  // place; otherwise through a scratch buffer.
  bool contiguous = true;
  for (int64_t i = 1; i < n_out && contiguous; ++i) contiguous = dst[static_cast<size_t>(i)] == dst[0] + i * c.n_vocab;
  if (contiguous) {
    matmul(m.output, h.data(), n_out, dst[0]);
    return;
  }
  detail::BigVector<float> logits(static_cast<size_t>(n_out * c.n_vocab));  // [n_out][n_vocab]
  matmul(m.output, h.data(), n_out, logits.data());
  for (int64_t i = 0; i < n_out; ++i)
    std::memcpy(dst[static_cast<size_t>(i)], logits.data() + i * c.n_vocab, c.n_vocab * sizeof(float));
}

Sequence::Sequence(const Model& model) : model_(model) {}

std::vector<float> Sequence::append(std::span<const int32_t> tokens, LogitsMode logits) {
  const ModelConfig& c = model_.config();
  const int32_t n_past = n_tokens();
  if (n_past + static_cast<int64_t>(tokens.size()) > c.n_ctx)
    throw Error(ErrorCode::INVALID_ARGUMENT, "sequence of " + std::to_string(n_past + tokens.size()) +
                                                 " tokens exceeds the model's context length " + std::to_string(c.n_ctx));
  if (k_.size() == 0) {
    const size_t n = static_cast<size_t>(c.n_layer) * static_cast<size_t>(c.n_ctx) * static_cast<size_t>(c.kv_dim());
    k_ = detail::ReservedFloats(n);
    v_ = detail::ReservedFloats(n);
  }
  const int64_t stride = static_cast<int64_t>(c.n_ctx) * c.kv_dim();
  const KvSpanView past{k_.data(), v_.data(), n_past, stride};
  std::vector<float> out;
  if (logits == LogitsMode::LAST) out.resize(static_cast<size_t>(c.n_vocab));
  if (logits == LogitsMode::ALL) out.resize(tokens.size() * static_cast<size_t>(c.n_vocab));
  ForwardSpan sp;
  sp.past = std::span<const KvSpanView>(&past, n_past > 0 ? 1 : 0);
  sp.tokens = tokens;
  sp.pos0 = n_past;
  sp.k_out = k_.data() + static_cast<int64_t>(n_past) * c.kv_dim();
  sp.v_out = v_.data() + static_cast<int64_t>(n_past) * c.kv_dim();
  sp.out_layer_stride = stride;
  sp.logits = tokens.empty() ? LogitsMode::NONE : logits;
  sp.logits_out = out.data();
  forward(model_, std::span<const ForwardSpan>(&sp, 1));
  tokens_.insert(tokens_.end(), tokens.begin(), tokens.end());
  return out;
}

}  // namespace backprompt
