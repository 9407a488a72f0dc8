// bench_precision: how far MatmulPrecision::BF16 (prefill GEMMs in bf16: activations and, unless
// they are bf16 already, weights rounded to bf16; and the prefill attention's operands) moves
// logits from the exact f32 arithmetic, on one model and its own weights (f32, f16, bf16 or q8_0).
// With --int8-decode: how far DecodePrecision::INT8 (q8_0 weights times activations quantized to
// int8) moves them instead, the tokens decoded one at a time, exact and INT8 (the model's
// matrices should be q8_0: other types are always exact at decode).
//
//   bench_precision MODEL [-n TOKENS] [--text FILE] [--weights f16|bf16|q8_0] [--int8-decode]
//
// --weights first converts the model's 2-D f32/f16/bf16 tensors to that type (a copy in the
// system's temp directory) and measures the copy, e.g. a trained f32 model (stories260K) as
// q8_0. Both runs always use the same weights; they differ only in the arithmetic. With bf16
// weights, only the activations' rounding remains. The prompt is the text (tokenized) or random
// tokens; all positions' logits are compared. Prints, over all positions: max |diff|,
// max |logit|, their ratio (the runtime tests allow 1e-4), mean |diff|, and how often the argmax
// (greedy next token) agrees.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "backprompt/error.h"
#include "backprompt/model.h"
#include "gguf/gguf.h"
#include "model/runtime.h"
#include "tensor/kernels.h"

namespace bp = backprompt;

namespace {

// llama.cpp's general.file_type (LLAMA_FTYPE_MOSTLY_*) for a file whose matrices are `t`.
uint32_t llama_file_type(bp::DType t) {
  switch (t) {
    case bp::DType::F32: return 0;
    case bp::DType::F16: return 1;
    case bp::DType::Q8_0: return 7;
    case bp::DType::BF16: return 32;
  }
  return 0;
}

// A copy of `src` whose 2-D f32/f16/bf16 tensors (rows a multiple of the block size) are of type
// `to` (rounded to nearest even, or quantized).
std::string converted_copy(const std::string& src, bp::DType to) {
  const std::unique_ptr<bp::gguf::File> f = bp::gguf::File::open(src);
  bp::gguf::Writer w;
  for (const bp::gguf::KeyValue& kv : f->metadata()) {
    if (kv.key != "general.file_type") w.copy_kv(kv);
  }
  w.set_u32("general.file_type", llama_file_type(to));
  for (const bp::gguf::TensorInfo& t : f->tensors()) {
    const bool convert = t.ne.size() == 2 && t.ne[0] % bp::dtype_block_size(to) == 0 &&
                         (t.type == bp::DType::F32 || t.type == bp::DType::F16 || t.type == bp::DType::BF16);
    const bp::DType type = convert ? to : t.type;
    const bp::gguf::TensorInfo* info = &t;
    w.add_tensor(t.name, type, t.ne, [info, convert, to](std::span<uint8_t> out) {
      if (!convert) {
        std::copy(info->data, info->data + info->n_bytes, out.begin());
        return;
      }
      const int64_t n_in = info->ne[0], n_rows = info->n_elements() / n_in;
      std::vector<float> row(static_cast<size_t>(n_in));  // [n_in]
      for (int64_t r = 0; r < n_rows; ++r) {
        bp::dequantize_row(info->type, info->data + r * bp::dtype_row_bytes(info->type, n_in), row.data(), n_in);
        bp::quantize_row(to, row.data(), out.data() + r * bp::dtype_row_bytes(to, n_in), n_in);
      }
    });
  }
  const std::string path = (std::filesystem::temp_directory_path() /
                            (std::filesystem::path(src).stem().string() + "-" + bp::dtype_name(to) + ".gguf"))
                               .string();
  w.write(path);
  return path;
}

std::vector<float> all_logits(const bp::Model& m, const std::vector<int32_t>& tokens, bp::MatmulPrecision p) {
  bp::kernels_set_matmul_precision(p);
  bp::Sequence seq(m);
  return seq.append(tokens, bp::LogitsMode::ALL);  // [n][n_vocab]
}

// The same, decoding one token at a time under decode precision p.
std::vector<float> decoded_logits(const bp::Model& m, const std::vector<int32_t>& tokens, bp::DecodePrecision p) {
  bp::kernels_set_decode_precision(p);
  bp::Sequence seq(m);
  std::vector<float> all;  // [n][n_vocab]
  for (const int32_t t : tokens) {
    const std::vector<float> got = seq.append(std::span<const int32_t>(&t, 1), bp::LogitsMode::ALL);
    all.insert(all.end(), got.begin(), got.end());
  }
  bp::kernels_set_decode_precision(bp::DecodePrecision::EXACT);
  return all;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: bench_precision MODEL [-n TOKENS] [--text FILE] [--weights f16|bf16|q8_0] [--int8-decode]\n");
    return 2;
  }
  std::string path = argv[1], text_path;
  int n_tokens = 256;
  std::optional<bp::DType> weights;  // convert to this type first
  bool int8_decode = false;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--int8-decode") {
      int8_decode = true;
    } else if (a == "-n" && i + 1 < argc) {
      n_tokens = std::atoi(argv[++i]);
    } else if (a == "--text" && i + 1 < argc) {
      text_path = argv[++i];
    } else if (a == "--weights" && i + 1 < argc) {
      weights = bp::dtype_from_name(argv[++i]);
      if (!weights || *weights == bp::DType::F32) {
        std::fprintf(stderr, "bench_precision: --weights takes f16, bf16 or q8_0\n");
        return 2;
      }
    } else {
      std::fprintf(stderr, "bench_precision: unknown or incomplete argument %s\n", a.c_str());
      return 2;
    }
  }
  try {
    if (!int8_decode && !bp::kernels_bf16_native()) {
      std::printf("this CPU has no native bf16 GEMM: MatmulPrecision::BF16 does not apply here\n");
      return 0;
    }
    if (int8_decode && !bp::kernels_int8_native()) {
      std::printf("the %s kernels have no int8 products: DecodePrecision::INT8 does not apply here\n", bp::kernels_isa());
      return 0;
    }
    std::shared_ptr<bp::Model> model = bp::Model::load(path);
    if (weights) {
      path = converted_copy(path, *weights);
      model = bp::Model::load(path);
    }
    const bp::ModelConfig& c = model->config();
    std::vector<int32_t> tokens;
    if (!text_path.empty()) {
      std::ifstream in(text_path);
      std::stringstream ss;
      ss << in.rdbuf();
      tokens = model->tokenizer().encode(ss.str());
    } else {
      std::mt19937 rng(7);
      for (int i = 0; i < n_tokens; ++i) tokens.push_back(static_cast<int32_t>(rng() % static_cast<uint32_t>(c.n_vocab)));
    }
    tokens.resize(std::min<size_t>(tokens.size(), std::min<size_t>(static_cast<size_t>(n_tokens), static_cast<size_t>(c.n_ctx))));
    const std::vector<float> exact = int8_decode ? decoded_logits(*model, tokens, bp::DecodePrecision::EXACT)
                                                 : all_logits(*model, tokens, bp::MatmulPrecision::EXACT);
    const std::vector<float> fast = int8_decode ? decoded_logits(*model, tokens, bp::DecodePrecision::INT8)
                                                : all_logits(*model, tokens, bp::MatmulPrecision::BF16);

    double max_diff = 0, max_ref = 0, sum_diff = 0;
    int64_t same_argmax = 0;
    const int64_t n = static_cast<int64_t>(tokens.size()), V = c.n_vocab;
    for (int64_t t = 0; t < n; ++t) {
      int64_t a = 0, b = 0;
      for (int64_t i = 0; i < V; ++i) {
        const double e = exact[t * V + i], f = fast[t * V + i];
        max_diff = std::max(max_diff, std::abs(e - f));
        max_ref = std::max(max_ref, std::abs(e));
        sum_diff += std::abs(e - f);
        if (e > exact[t * V + a]) a = i;
        if (f > fast[t * V + b]) b = i;
      }
      same_argmax += a == b;
    }
    std::printf("model: %s (%s weights), %lld positions x %lld vocab, %s prompt\n", path.c_str(),
                model->weight_type_name().c_str(), static_cast<long long>(n), static_cast<long long>(V),
                text_path.empty() ? "random" : "text");
    std::printf("%s vs exact: max |diff| %.3g, max |logit| %.3g, ratio %.3g (tests allow 1e-4); "
                "mean |diff| %.3g; same argmax at %lld/%lld positions\n",
                int8_decode ? "int8 decode" : "bf16 arithmetic", max_diff, max_ref, max_diff / std::max(1.0, max_ref), sum_diff / static_cast<double>(n * V),
                static_cast<long long>(same_argmax), static_cast<long long>(n));
  } catch (const bp::Error& e) {
    std::fprintf(stderr, "bench_precision: %s\n", e.what());
    return 1;
  }
  return 0;
}
