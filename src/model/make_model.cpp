// Random-weight GGUF models in real shapes: presets, tensor list, built-in byte vocabularies,
// and the deterministic weight generator.
#include "model/make_model.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <span>
#include <string_view>

#include "backprompt/error.h"
#include "gguf/gguf.h"
#include "tokenizer/load.h"

namespace backprompt {

namespace {

// ---------------------------------------------------------------------------------------------
// Presets

struct Preset {
  const char* name;
  Arch arch;
  int32_t n_layer, n_embd, n_head, n_kv_head, n_ff, n_ctx;
};

constexpr Preset PRESETS[] = {
    {"tiny", Arch::GPT2, 2, 64, 4, 4, 256, 256},
    {"tiny", Arch::LLAMA, 2, 64, 4, 2, 128, 256},
    {"small", Arch::GPT2, 2, 256, 4, 4, 1024, 512},  // big enough for the decode schedule's thread team
    {"small", Arch::LLAMA, 2, 256, 8, 2, 512, 512},
    {"gpt2-124m", Arch::GPT2, 12, 768, 12, 12, 3072, 1024},
    {"llama-110m", Arch::LLAMA, 12, 768, 12, 12, 2048, 1024},
    {"tinyllama-1.1b", Arch::LLAMA, 22, 2048, 32, 4, 5632, 2048},
};

const Preset& find_preset(Arch arch, const std::string& name) {
  bool other_arch = false;
  for (const Preset& p : PRESETS) {
    if (name != p.name) continue;
    if (p.arch == arch) return p;
    other_arch = true;
  }
  std::string valid;
  for (const std::string& n : make_model_presets(arch)) valid += (valid.empty() ? "" : ", ") + n;
  throw Error(ErrorCode::INVALID_ARGUMENT,
              "make-model: preset '" + name + "' " + (other_arch ? "is not a " : "is unknown for ") +
                  arch_name(arch) + " preset (valid: " + valid + ")");
}

// llama.cpp's general.file_type (LLAMA_FTYPE_*) for a file whose matrices are `t`.
uint32_t file_type(DType t) {
  switch (t) {
    case DType::F32: return 0;
    case DType::F16: return 1;
    case DType::Q8_0: return 7;
    case DType::BF16: return 32;
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Built-in vocabularies: one token per byte, so any text can be encoded.

void append_utf8(std::string& s, uint32_t cp) {
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    s += static_cast<char>(0xE0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// GPT-2: the 256 byte tokens in the order of GPT-2's encoder (printable bytes first, each
// written as its byte-to-unicode character), then <|endoftext|> as BOS and EOS.
void set_gpt2_byte_vocab(gguf::Writer& w, int32_t& n_vocab) {
  std::vector<std::string> tokens;
  std::vector<int32_t> types;
  auto printable = [](int b) { return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF); };
  for (int b = 0; b < 256; b++) {
    if (!printable(b)) continue;
    tokens.emplace_back();
    append_utf8(tokens.back(), static_cast<uint32_t>(b));
  }
  int n_shifted = 0;
  for (int b = 0; b < 256; b++) {
    if (printable(b)) continue;
    tokens.emplace_back();
    append_utf8(tokens.back(), 256u + static_cast<uint32_t>(n_shifted++));
  }
  types.assign(tokens.size(), static_cast<int32_t>(TokenType::NORMAL));
  const int32_t eot = static_cast<int32_t>(tokens.size());
  tokens.push_back("<|endoftext|>");
  types.push_back(static_cast<int32_t>(TokenType::CONTROL));

  w.set_string("tokenizer.ggml.model", "gpt2");
  w.set_string("tokenizer.ggml.pre", "gpt-2");
  w.set_string_array("tokenizer.ggml.tokens", tokens);
  w.set_i32_array("tokenizer.ggml.token_type", types);
  w.set_string_array("tokenizer.ggml.merges", {});
  w.set_u32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(eot));
  w.set_u32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(eot));
  w.set_bool("tokenizer.ggml.add_bos_token", false);
  n_vocab = static_cast<int32_t>(tokens.size());
}

// Llama (SentencePiece): <unk>, <s>, </s>, the byte-fallback tokens <0x00>..<0xFF> and "▁".
void set_llama_byte_vocab(gguf::Writer& w, int32_t& n_vocab) {
  std::vector<std::string> tokens = {"<unk>", "<s>", "</s>"};
  std::vector<int32_t> types = {static_cast<int32_t>(TokenType::UNKNOWN), static_cast<int32_t>(TokenType::CONTROL),
                                static_cast<int32_t>(TokenType::CONTROL)};
  for (int b = 0; b < 256; b++) {
    char hex[8];
    std::snprintf(hex, sizeof(hex), "<0x%02X>", b);
    tokens.emplace_back(hex);
    types.push_back(static_cast<int32_t>(TokenType::BYTE));
  }
  tokens.emplace_back("\xE2\x96\x81");  // "▁"
  types.push_back(static_cast<int32_t>(TokenType::NORMAL));
  std::vector<float> scores(tokens.size(), 0.0f);
  scores.back() = -1.0f;

  w.set_string("tokenizer.ggml.model", "llama");
  w.set_string_array("tokenizer.ggml.tokens", tokens);
  w.set_f32_array("tokenizer.ggml.scores", scores);
  w.set_i32_array("tokenizer.ggml.token_type", types);
  w.set_u32("tokenizer.ggml.unknown_token_id", 0);
  w.set_u32("tokenizer.ggml.bos_token_id", 1);
  w.set_u32("tokenizer.ggml.eos_token_id", 2);
  w.set_bool("tokenizer.ggml.add_bos_token", true);
  w.set_bool("tokenizer.ggml.add_eos_token", false);
  n_vocab = static_cast<int32_t>(tokens.size());
}

// Copies every tokenizer.* key of `vocab` verbatim; n_vocab is its token count.
void copy_vocab(gguf::Writer& w, const gguf::File& vocab, int32_t& n_vocab) {
  load_tokenizer(vocab);  // throws, naming the file, if the vocabulary is unusable
  auto tokens = vocab.get_string_array("tokenizer.ggml.tokens");
  if (!tokens || tokens->empty()) {
    throw Error(ErrorCode::CORRUPT_FILE, vocab.path() + ": no tokenizer.ggml.tokens");
  }
  for (const gguf::KeyValue& kv : vocab.metadata()) {
    if (kv.key.rfind("tokenizer.", 0) == 0) w.copy_kv(kv);
  }
  n_vocab = static_cast<int32_t>(tokens->size());
}

// ---------------------------------------------------------------------------------------------
// Deterministic random numbers: every row has its own stream, so generation can be split
// across threads in any way and the bytes stay the same.

uint64_t mix64(uint64_t x) {  // splitmix64's finalizer
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ULL;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBULL;
  x ^= x >> 31;
  return x;
}

uint64_t hash_name(std::string_view s) {  // FNV-1a
  uint64_t h = 0xCBF29CE484222325ULL;
  for (char c : s) {
    h ^= static_cast<uint8_t>(c);
    h *= 0x100000001B3ULL;
  }
  return h;
}

// An approximately standard normal value from 64 random bits: the sum of four 16-bit uniforms
// (Irwin-Hall), centred and scaled to unit variance. Integer work and one multiply, so it is
// the same on every platform (no libm), and bounded by about 3.46.
float normal_from_bits(uint64_t r) {
  const int32_t s = static_cast<int32_t>(r & 0xFFFF) + static_cast<int32_t>((r >> 16) & 0xFFFF) +
                    static_cast<int32_t>((r >> 32) & 0xFFFF) + static_cast<int32_t>(r >> 48);
  // Each 16-bit uniform has mean 32767.5 and variance (65536^2 - 1) / 12.
  constexpr float SCALE = 1.7320508f / 65536.0f;  // sqrt(12 / 4) / 65536, up to a 1e-10 relative error
  return static_cast<float>(s - 131070) * SCALE;
}

// How a tensor's values are drawn: mean + std * normal.
struct Init {
  float mean = 0.0f;
  float std = 0.02f;
};

struct TensorSpec {
  std::string name;
  std::vector<int64_t> ne;  // ne[0] innermost
  DType type;
  Init init;
};

// Fills `out` (n_rows rows of `spec.type`) with the tensor's values.
void fill_tensor(const TensorSpec& spec, uint64_t seed, std::span<uint8_t> out) {
  const int64_t n_cols = spec.ne[0];
  int64_t n_rows = 1;
  for (size_t i = 1; i < spec.ne.size(); i++) n_rows *= spec.ne[i];
  const size_t row_bytes = dtype_row_bytes(spec.type, n_cols);
  BP_ASSERT(out.size() == row_bytes * static_cast<size_t>(n_rows));
  const uint64_t tensor_key = mix64(seed ^ mix64(hash_name(spec.name)));

#pragma omp parallel
  {
    std::vector<float> row(n_cols);  // [n_cols]
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n_rows; r++) {
      uint64_t state = mix64(tensor_key + static_cast<uint64_t>(r) * 0x9E3779B97F4A7C15ULL);
      for (int64_t c = 0; c < n_cols; c++) {
        state += 0x9E3779B97F4A7C15ULL;  // splitmix64
        row[c] = spec.init.mean + spec.init.std * normal_from_bits(mix64(state));
      }
      uint8_t* dst = out.data() + static_cast<size_t>(r) * row_bytes;
      if (spec.type == DType::F32) {
        std::memcpy(dst, row.data(), row_bytes);
      } else {
        quantize_row(spec.type, row.data(), dst, n_cols);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tensors, with llama.cpp's names.
//
// Matrices have std 1/sqrt(n_in), which keeps activations at unit scale through every layer
// whatever the width (it is 0.036 at GPT-2 small's 768 and 0.022 at TinyLlama's 2048, next to
// the 0.02 those models were initialised with; a fixed 0.02 at width 64 would shrink every
// activation 8-fold and leave a tied GPT-2 predicting its input token). The projections that
// write into the residual stream are further scaled by 1/sqrt(2 n_layer), as GPT-2 does.
// Embeddings have std 0.02 (positions 0.01).

Init matrix_init(int64_t n_in) { return {0.0f, 1.0f / std::sqrt(static_cast<float>(n_in))}; }

Init output_init(int64_t n_in, const ModelConfig& c) {
  return {0.0f, 1.0f / std::sqrt(static_cast<float>(n_in) * 2.0f * static_cast<float>(c.n_layer))};
}

std::vector<TensorSpec> gpt2_tensors(const ModelConfig& c, DType mat) {
  const int64_t e = c.n_embd, f = c.n_ff;
  const Init w = matrix_init(e), w_attn_out = output_init(e, c), w_ffn_out = output_init(f, c);
  const Init embd{0.0f, 0.02f};
  const Init norm{1.0f, 0.02f};
  const Init bias{0.0f, 0.01f};
  std::vector<TensorSpec> t = {
      {"token_embd.weight", {e, c.n_vocab}, mat, embd},
      {"position_embd.weight", {e, c.n_ctx}, mat, {0.0f, 0.01f}},
      {"output_norm.weight", {e}, DType::F32, norm},
      {"output_norm.bias", {e}, DType::F32, bias},
  };
  for (int32_t l = 0; l < c.n_layer; l++) {
    const std::string b = "blk." + std::to_string(l) + ".";
    t.push_back({b + "attn_norm.weight", {e}, DType::F32, norm});
    t.push_back({b + "attn_norm.bias", {e}, DType::F32, bias});
    t.push_back({b + "attn_qkv.weight", {e, 3 * e}, mat, w});
    t.push_back({b + "attn_qkv.bias", {3 * e}, DType::F32, bias});
    t.push_back({b + "attn_output.weight", {e, e}, mat, w_attn_out});
    t.push_back({b + "attn_output.bias", {e}, DType::F32, bias});
    t.push_back({b + "ffn_norm.weight", {e}, DType::F32, norm});
    t.push_back({b + "ffn_norm.bias", {e}, DType::F32, bias});
    t.push_back({b + "ffn_up.weight", {e, f}, mat, w});
    t.push_back({b + "ffn_up.bias", {f}, DType::F32, bias});
    t.push_back({b + "ffn_down.weight", {f, e}, mat, w_ffn_out});
    t.push_back({b + "ffn_down.bias", {e}, DType::F32, bias});
  }
  return t;
}

std::vector<TensorSpec> llama_tensors(const ModelConfig& c, DType mat) {
  const int64_t e = c.n_embd, f = c.n_ff, kv = c.kv_dim();
  const Init w = matrix_init(e), w_attn_out = output_init(e, c), w_ffn_out = output_init(f, c);
  const Init embd{0.0f, 0.02f};
  const Init norm{1.0f, 0.02f};
  std::vector<TensorSpec> t = {
      {"token_embd.weight", {e, c.n_vocab}, mat, embd},
      {"output_norm.weight", {e}, DType::F32, norm},
      {"output.weight", {e, c.n_vocab}, mat, w},
  };
  for (int32_t l = 0; l < c.n_layer; l++) {
    const std::string b = "blk." + std::to_string(l) + ".";
    t.push_back({b + "attn_norm.weight", {e}, DType::F32, norm});
    t.push_back({b + "attn_q.weight", {e, e}, mat, w});
    t.push_back({b + "attn_k.weight", {e, kv}, mat, w});
    t.push_back({b + "attn_v.weight", {e, kv}, mat, w});
    t.push_back({b + "attn_output.weight", {e, e}, mat, w_attn_out});
    t.push_back({b + "ffn_norm.weight", {e}, DType::F32, norm});
    t.push_back({b + "ffn_gate.weight", {e, f}, mat, w});
    t.push_back({b + "ffn_up.weight", {e, f}, mat, w});
    t.push_back({b + "ffn_down.weight", {f, e}, mat, w_ffn_out});
  }
  return t;
}

void set_hparams(gguf::Writer& w, const ModelConfig& c) {
  const std::string a = arch_name(c.arch);
  w.set_u32(a + ".vocab_size", static_cast<uint32_t>(c.n_vocab));
  w.set_u32(a + ".context_length", static_cast<uint32_t>(c.n_ctx));
  w.set_u32(a + ".embedding_length", static_cast<uint32_t>(c.n_embd));
  w.set_u32(a + ".feed_forward_length", static_cast<uint32_t>(c.n_ff));
  w.set_u32(a + ".block_count", static_cast<uint32_t>(c.n_layer));
  w.set_u32(a + ".attention.head_count", static_cast<uint32_t>(c.n_head));
  if (c.arch == Arch::GPT2) {
    w.set_f32(a + ".attention.layer_norm_epsilon", c.norm_eps);
  } else {
    w.set_u32(a + ".attention.head_count_kv", static_cast<uint32_t>(c.n_kv_head));
    w.set_f32(a + ".attention.layer_norm_rms_epsilon", c.norm_eps);
    w.set_u32(a + ".rope.dimension_count", static_cast<uint32_t>(c.rope_dim));
    w.set_f32(a + ".rope.freq_base", c.rope_base);
  }
}

}  // namespace

std::vector<std::string> make_model_presets(Arch arch) {
  std::vector<std::string> names;
  for (const Preset& p : PRESETS) {
    if (p.arch == arch) names.emplace_back(p.name);
  }
  return names;
}

MakeModelResult make_model(const MakeModelOptions& opt, const std::string& out_path) {
  const Preset& p = find_preset(opt.arch, opt.preset);
  if (!dtype_is_supported(static_cast<uint32_t>(opt.dtype))) {
    throw Error(ErrorCode::INVALID_ARGUMENT, "make-model: unsupported dtype");
  }

  ModelConfig c;
  c.arch = opt.arch;
  c.n_ctx = p.n_ctx;
  c.n_embd = p.n_embd;
  c.n_layer = p.n_layer;
  c.n_head = p.n_head;
  c.n_kv_head = p.n_kv_head;
  c.head_dim = p.n_embd / p.n_head;
  c.n_ff = p.n_ff;
  c.norm_eps = 1e-5f;
  c.rope_dim = opt.arch == Arch::LLAMA ? c.head_dim : 0;
  c.rope_base = 10000.0f;

  const int block = dtype_block_size(opt.dtype);
  if (c.n_embd % block != 0 || c.n_ff % block != 0) {
    throw Error(ErrorCode::INVALID_ARGUMENT, std::string("make-model: ") + dtype_name(opt.dtype) +
                                                 " needs matrix rows that are a multiple of " + std::to_string(block));
  }

  gguf::Writer w;
  std::unique_ptr<gguf::File> vocab;  // must outlive the writer's use of copied entries
  if (opt.vocab_path.empty()) {
    if (opt.arch == Arch::GPT2) {
      set_gpt2_byte_vocab(w, c.n_vocab);
    } else {
      set_llama_byte_vocab(w, c.n_vocab);
    }
  } else {
    vocab = gguf::File::open(opt.vocab_path);
    copy_vocab(w, *vocab, c.n_vocab);
  }

  w.set_string("general.architecture", arch_name(opt.arch));
  w.set_string("general.name", std::string("backprompt-random-") + arch_name(opt.arch) + "-" + opt.preset);
  w.set_u32("general.file_type", file_type(opt.dtype));
  if (opt.dtype == DType::Q8_0) w.set_u32("general.quantization_version", 2);
  set_hparams(w, c);

  std::vector<TensorSpec> tensors = opt.arch == Arch::GPT2 ? gpt2_tensors(c, opt.dtype) : llama_tensors(c, opt.dtype);
  MakeModelResult result;
  result.config = c;
  for (const TensorSpec& t : tensors) {
    uint64_t n = 1;
    for (int64_t d : t.ne) n *= static_cast<uint64_t>(d);
    result.n_params += n;
    const uint64_t seed = opt.seed;
    w.add_tensor(t.name, t.type, t.ne, [t, seed](std::span<uint8_t> out) { fill_tensor(t, seed, out); });
  }
  w.write(out_path);
  return result;
}

}  // namespace backprompt
