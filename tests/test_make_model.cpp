// make_model: presets, llama.cpp tensor names and metadata, determinism, built-in and copied
// vocabularies, weight statistics, and that the result loads and runs.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <vector>

#include "backprompt/error.h"
#include "backprompt/model.h"
#include "gguf/gguf.h"
#include "model/make_model.h"
#include "model/runtime.h"
#include "test_util.h"
#include "tokenizer/load.h"

namespace bp = backprompt;
using bp::testing::temp_dir;
using bp::testing::test_data_file;

namespace {

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

std::string make(bp::Arch arch, bp::DType dtype, uint64_t seed, const std::string& name,
                 const std::string& vocab = "") {
  bp::MakeModelOptions opt;
  opt.arch = arch;
  opt.dtype = dtype;
  opt.seed = seed;
  opt.vocab_path = vocab;
  const std::string path = temp_dir() + "/" + name + ".gguf";
  bp::make_model(opt, path);
  return path;
}

// Mean and standard deviation of a tensor's values (dequantized).
std::pair<double, double> stats(const bp::gguf::TensorInfo& t) {
  const int64_t n_cols = t.ne[0];
  const int64_t n_rows = t.n_elements() / n_cols;
  const size_t row_bytes = bp::dtype_row_bytes(t.type, n_cols);
  std::vector<float> row(n_cols);  // [n_cols]
  double sum = 0, sq = 0;
  for (int64_t r = 0; r < n_rows; r++) {
    bp::dequantize_row(t.type, t.data + r * row_bytes, row.data(), n_cols);
    for (float v : row) {
      sum += v;
      sq += static_cast<double>(v) * v;
    }
  }
  const double n = static_cast<double>(t.n_elements());
  return {sum / n, std::sqrt(sq / n - (sum / n) * (sum / n))};
}

}  // namespace

TEST(MakeModelPresets, PerArchitecture) {
  auto gpt2 = bp::make_model_presets(bp::Arch::GPT2);
  auto llama = bp::make_model_presets(bp::Arch::LLAMA);
  EXPECT_EQ(gpt2, (std::vector<std::string>{"tiny", "small", "gpt2-124m"}));
  EXPECT_EQ(llama, (std::vector<std::string>{"tiny", "small", "llama-110m", "tinyllama-1.1b"}));
}

TEST(MakeModelPresets, MismatchAndUnknownAreInvalidArgument) {
  bp::MakeModelOptions opt;
  opt.arch = bp::Arch::LLAMA;
  opt.preset = "gpt2-124m";
  const std::string path = temp_dir() + "/never.gguf";
  try {
    bp::make_model(opt, path);
    FAIL() << "no error";
  } catch (const bp::Error& e) {
    EXPECT_EQ(e.code(), bp::ErrorCode::INVALID_ARGUMENT);
    EXPECT_NE(std::string(e.what()).find("gpt2-124m"), std::string::npos);
  }
  opt.arch = bp::Arch::GPT2;
  opt.preset = "tinyllama-1.1b";
  EXPECT_THROW(bp::make_model(opt, path), bp::Error);
  opt.preset = "huge";
  EXPECT_THROW(bp::make_model(opt, path), bp::Error);
  EXPECT_FALSE(std::filesystem::exists(path));
}

TEST(MakeModelDeterminism, SameOptionsSameBytesAnyThreadCount) {
  const int saved = omp_get_max_threads();
  for (bp::Arch arch : {bp::Arch::GPT2, bp::Arch::LLAMA}) {
    omp_set_num_threads(1);
    const std::string a = read_bytes(make(arch, bp::DType::Q8_0, 5, "det-a"));
    omp_set_num_threads(3);
    const std::string b = read_bytes(make(arch, bp::DType::Q8_0, 5, "det-b"));
    omp_set_num_threads(saved);
    const std::string c = read_bytes(make(arch, bp::DType::Q8_0, 6, "det-c"));
    ASSERT_GT(a.size(), 100000u);
    EXPECT_TRUE(a == b) << bp::arch_name(arch) << ": differs with the thread count";
    EXPECT_TRUE(a != c) << bp::arch_name(arch) << ": the seed changes nothing";
    EXPECT_EQ(a.size(), c.size());
  }
}

TEST(MakeModelLayout, Gpt2TensorsAndMetadata) {
  auto f = bp::gguf::File::open(make(bp::Arch::GPT2, bp::DType::F16, 1, "layout-gpt2"));
  EXPECT_EQ(f->get_string("general.architecture"), "gpt2");
  EXPECT_EQ(f->get_int("general.file_type"), 1);
  EXPECT_EQ(f->get_int("gpt2.block_count"), 2);
  EXPECT_EQ(f->get_int("gpt2.embedding_length"), 64);
  EXPECT_EQ(f->get_int("gpt2.feed_forward_length"), 256);
  EXPECT_EQ(f->get_int("gpt2.attention.head_count"), 4);
  EXPECT_EQ(f->get_int("gpt2.context_length"), 256);
  EXPECT_NEAR(*f->get_float("gpt2.attention.layer_norm_epsilon"), 1e-5, 1e-12);
  EXPECT_EQ(f->tensors().size(), 4u + 12u * 2u);
  EXPECT_EQ(f->find_tensor("output.weight"), nullptr);  // tied to token_embd

  auto check = [&](const std::string& name, std::vector<int64_t> ne, bp::DType type) {
    const bp::gguf::TensorInfo* t = f->find_tensor(name);
    ASSERT_NE(t, nullptr) << name;
    EXPECT_EQ(t->ne, ne) << name;
    EXPECT_EQ(t->type, type) << name;
  };
  check("token_embd.weight", {64, 257}, bp::DType::F16);
  check("position_embd.weight", {64, 256}, bp::DType::F16);
  check("output_norm.weight", {64}, bp::DType::F32);
  check("output_norm.bias", {64}, bp::DType::F32);
  for (std::string b : {"blk.0.", "blk.1."}) {
    check(b + "attn_norm.weight", {64}, bp::DType::F32);
    check(b + "attn_norm.bias", {64}, bp::DType::F32);
    check(b + "attn_qkv.weight", {64, 192}, bp::DType::F16);
    check(b + "attn_qkv.bias", {192}, bp::DType::F32);
    check(b + "attn_output.weight", {64, 64}, bp::DType::F16);
    check(b + "attn_output.bias", {64}, bp::DType::F32);
    check(b + "ffn_norm.weight", {64}, bp::DType::F32);
    check(b + "ffn_norm.bias", {64}, bp::DType::F32);
    check(b + "ffn_up.weight", {64, 256}, bp::DType::F16);
    check(b + "ffn_up.bias", {256}, bp::DType::F32);
    check(b + "ffn_down.weight", {256, 64}, bp::DType::F16);
    check(b + "ffn_down.bias", {64}, bp::DType::F32);
  }
}

TEST(MakeModelLayout, LlamaTensorsAndMetadata) {
  auto f = bp::gguf::File::open(make(bp::Arch::LLAMA, bp::DType::Q8_0, 1, "layout-llama"));
  EXPECT_EQ(f->get_string("general.architecture"), "llama");
  EXPECT_EQ(f->get_int("general.file_type"), 7);
  EXPECT_EQ(f->get_int("llama.block_count"), 2);
  EXPECT_EQ(f->get_int("llama.embedding_length"), 64);
  EXPECT_EQ(f->get_int("llama.feed_forward_length"), 128);
  EXPECT_EQ(f->get_int("llama.attention.head_count"), 4);
  EXPECT_EQ(f->get_int("llama.attention.head_count_kv"), 2);
  EXPECT_EQ(f->get_int("llama.rope.dimension_count"), 16);
  EXPECT_EQ(f->get_float("llama.rope.freq_base"), 10000.0);
  EXPECT_NEAR(*f->get_float("llama.attention.layer_norm_rms_epsilon"), 1e-5, 1e-12);
  EXPECT_EQ(f->tensors().size(), 3u + 9u * 2u);

  auto check = [&](const std::string& name, std::vector<int64_t> ne, bp::DType type) {
    const bp::gguf::TensorInfo* t = f->find_tensor(name);
    ASSERT_NE(t, nullptr) << name;
    EXPECT_EQ(t->ne, ne) << name;
    EXPECT_EQ(t->type, type) << name;
  };
  check("token_embd.weight", {64, 260}, bp::DType::Q8_0);
  check("output_norm.weight", {64}, bp::DType::F32);
  check("output.weight", {64, 260}, bp::DType::Q8_0);
  for (std::string b : {"blk.0.", "blk.1."}) {
    check(b + "attn_norm.weight", {64}, bp::DType::F32);
    check(b + "attn_q.weight", {64, 64}, bp::DType::Q8_0);
    check(b + "attn_k.weight", {64, 32}, bp::DType::Q8_0);
    check(b + "attn_v.weight", {64, 32}, bp::DType::Q8_0);
    check(b + "attn_output.weight", {64, 64}, bp::DType::Q8_0);
    check(b + "ffn_norm.weight", {64}, bp::DType::F32);
    check(b + "ffn_gate.weight", {64, 128}, bp::DType::Q8_0);
    check(b + "ffn_up.weight", {64, 128}, bp::DType::Q8_0);
    check(b + "ffn_down.weight", {128, 64}, bp::DType::Q8_0);
  }
}

TEST(MakeModelWeights, RealisticStatistics) {
  auto f = bp::gguf::File::open(make(bp::Arch::LLAMA, bp::DType::F32, 1, "stats-llama"));
  auto [m_q, s_q] = stats(*f->find_tensor("blk.0.attn_q.weight"));  // 1 / sqrt(n_in = 64)
  EXPECT_NEAR(m_q, 0.0, 0.01);
  EXPECT_NEAR(s_q, 0.125, 0.005);
  auto [m_o, s_o] = stats(*f->find_tensor("blk.1.ffn_down.weight"));  // 1 / sqrt(n_in = 128 * 2 * 2 layers)
  EXPECT_NEAR(s_o, 1.0 / std::sqrt(512.0), 0.002);
  auto [m_e, s_e] = stats(*f->find_tensor("token_embd.weight"));
  EXPECT_NEAR(s_e, 0.02, 0.001);
  auto [m_n, s_n] = stats(*f->find_tensor("blk.0.attn_norm.weight"));
  EXPECT_NEAR(m_n, 1.0, 0.01);
  EXPECT_LT(s_n, 0.05);
  // Different tensors of the same shape are not copies of each other.
  const auto* gate = f->find_tensor("blk.0.ffn_gate.weight");
  const auto* up = f->find_tensor("blk.0.ffn_up.weight");
  EXPECT_NE(std::memcmp(gate->data, up->data, gate->n_bytes), 0);
}

TEST(MakeModelVocab, BuiltinVocabulariesLoadAndRoundTrip) {
  const std::string text = "Hello, w\xC3\xB6rld!\n\ttabs  and  spaces";
  for (bp::Arch arch : {bp::Arch::GPT2, bp::Arch::LLAMA}) {
    auto f = bp::gguf::File::open(make(arch, bp::DType::F32, 1, std::string("vocab-") + bp::arch_name(arch)));
    auto tok = bp::load_tokenizer(*f);
    if (arch == bp::Arch::GPT2) {
      EXPECT_EQ(tok->kind(), bp::TokenizerKind::GPT2_BPE);
      EXPECT_EQ(tok->n_vocab(), 257);
      EXPECT_EQ(tok->bos(), 256);
      EXPECT_EQ(tok->eos(), 256);
      EXPECT_FALSE(tok->add_bos());
      // GPT-2's byte order: '!' is id 0, 'A' is id 32.
      EXPECT_EQ(tok->encode("!A"), (std::vector<int32_t>{0, 32}));
    } else {
      EXPECT_EQ(tok->kind(), bp::TokenizerKind::LLAMA_SPM);
      EXPECT_EQ(tok->n_vocab(), 260);
      EXPECT_EQ(tok->bos(), 1);
      EXPECT_EQ(tok->eos(), 2);
      EXPECT_TRUE(tok->add_bos());
    }
    std::vector<int32_t> ids = tok->encode(text, {.add_bos = true});
    ASSERT_FALSE(ids.empty());
    EXPECT_EQ(ids[0], tok->bos());
    for (int32_t id : ids) EXPECT_LT(id, tok->n_vocab());
    std::string back = tok->decode(std::span<const int32_t>(ids).subspan(1), true);
    EXPECT_EQ(back, text) << bp::arch_name(arch);
  }
}

TEST(MakeModelVocab, CopiesTokenizerMetadataVerbatim) {
  const std::string vocab_path = test_data_file("ggml-vocab/ggml-vocab-gpt-2.gguf");
  if (vocab_path.empty()) GTEST_SKIP() << "test data ggml-vocab/ggml-vocab-gpt-2.gguf not found (BACKPROMPT_TEST_DATA)";
  auto vocab = bp::gguf::File::open(vocab_path);
  auto f = bp::gguf::File::open(make(bp::Arch::GPT2, bp::DType::F32, 1, "copied-vocab", vocab_path));
  size_t n_copied = 0;
  for (const bp::gguf::KeyValue& kv : vocab->metadata()) {
    if (kv.key.rfind("tokenizer.", 0) != 0) continue;
    const bp::gguf::KeyValue* got = f->find(kv.key);
    ASSERT_NE(got, nullptr) << kv.key;
    EXPECT_EQ(got->type, kv.type) << kv.key;
    ASSERT_EQ(got->raw_size, kv.raw_size) << kv.key;
    EXPECT_EQ(std::memcmp(got->raw, kv.raw, kv.raw_size), 0) << kv.key;
    n_copied++;
  }
  EXPECT_GE(n_copied, 5u);
  EXPECT_EQ(f->find_tensor("token_embd.weight")->ne, (std::vector<int64_t>{64, 50257}));
  EXPECT_EQ(f->get_string("general.architecture"), "gpt2");  // not the vocabulary file's metadata
}

TEST(MakeModelVocab, MissingVocabularyFileIsAnError) {
  bp::MakeModelOptions opt;
  opt.vocab_path = temp_dir() + "/does-not-exist.gguf";
  try {
    bp::make_model(opt, temp_dir() + "/never2.gguf");
    FAIL() << "no error";
  } catch (const bp::Error& e) {
    EXPECT_EQ(e.code(), bp::ErrorCode::IO_ERROR);
  }
}

TEST(MakeModelRuns, LoadsWithItsConfigAndGivesContextDependentLogits) {
  for (bp::Arch arch : {bp::Arch::GPT2, bp::Arch::LLAMA}) {
    for (bp::DType dtype : {bp::DType::F32, bp::DType::Q8_0}) {
      bp::MakeModelOptions opt;
      opt.arch = arch;
      opt.dtype = dtype;
      const std::string path = temp_dir() + "/runs-" + bp::arch_name(arch) + "-" + bp::dtype_name(dtype) + ".gguf";
      const bp::MakeModelResult made = bp::make_model(opt, path);
      auto model = bp::Model::load(path);
      const bp::ModelConfig& c = model->config();
      EXPECT_EQ(c.arch, arch);
      EXPECT_EQ(c.n_vocab, made.config.n_vocab);
      EXPECT_EQ(c.n_layer, made.config.n_layer);
      EXPECT_EQ(c.n_head, made.config.n_head);
      EXPECT_EQ(c.n_kv_head, made.config.n_kv_head);
      EXPECT_EQ(c.n_ff, made.config.n_ff);
      EXPECT_EQ(c.n_ctx, made.config.n_ctx);
      EXPECT_EQ(model->n_params(), made.n_params);

      auto last_logits = [&](const std::string& text) {
        bp::Sequence seq(*model);
        return seq.append(model->tokenizer().encode(text, {.add_bos = true}));
      };
      std::vector<float> a = last_logits("The cat sat on the mat and then");
      std::vector<float> b = last_logits("A dog ran over the hill and then");
      ASSERT_EQ(a.size(), static_cast<size_t>(c.n_vocab));
      double sq = 0, diff = 0;
      for (size_t i = 0; i < a.size(); i++) {
        ASSERT_TRUE(std::isfinite(a[i]));
        sq += static_cast<double>(a[i]) * a[i];
        diff = std::max(diff, static_cast<double>(std::fabs(a[i] - b[i])));
      }
      const double rms = std::sqrt(sq / a.size());
      EXPECT_GT(rms, 0.05) << path;   // not flat
      EXPECT_LT(rms, 10.0) << path;   // not exploding
      EXPECT_GT(diff, 0.01) << path;  // the context matters
    }
  }
}
