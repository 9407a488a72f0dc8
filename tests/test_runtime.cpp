// The runtime against itself: continuing from cached K/V in any number of steps, or as part of
// a ragged batch, equals one full pass. (Against an independent implementation: test_reference.)
#include <gtest/gtest.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

#include "backprompt/error.h"
#include "gguf/gguf.h"
#include "model/runtime.h"
#include "test_util.h"

namespace bp = backprompt;
using bp::testing::compare_logits;
using bp::testing::generated_model;
using bp::testing::random_tokens;

namespace {

// All-position logits of one uncached pass: [n][n_vocab].
std::vector<float> full_pass(const bp::Model& m, const std::vector<int32_t>& tokens) {
  bp::Sequence seq(m);
  return seq.append(tokens, bp::LogitsMode::ALL);
}

void expect_close(const float* got, const float* ref, int64_t n_vocab, const std::string& what) {
  const bp::testing::LogitCompare c = compare_logits(got, ref, n_vocab);
  EXPECT_TRUE(c.within_tolerance()) << what << ": max diff " << c.max_abs_diff << ", max |logit| " << c.max_abs_ref;
  EXPECT_TRUE(c.same_argmax) << what;
}

// One forward call of a span alone, after `past`, writing its K/V into k and v
// ([n_layer][tokens.size()][kv_dim]); no logits.
void compute_span(const bp::Model& m, std::span<const int32_t> tokens, std::span<const bp::KvSpanView> past, float* k, float* v) {
  bp::ForwardSpan s;
  s.past = past;
  for (const bp::KvSpanView& p : past) s.pos0 += p.n_tokens;
  s.tokens = tokens;
  s.k_out = k;
  s.v_out = v;
  s.logits = bp::LogitsMode::NONE;
  bp::forward(m, std::span<const bp::ForwardSpan>(&s, 1));
}

struct ArchCase {
  bp::Arch arch;
  bp::DType dtype;
};

class RuntimeContinuation : public ::testing::TestWithParam<ArchCase> {};

TEST_P(RuntimeContinuation, StepwiseEqualsFullPass) {
  const auto model = bp::Model::load(generated_model(GetParam().arch, GetParam().dtype));
  const int32_t V = model->config().n_vocab;
  const std::vector<int32_t> tokens = random_tokens(V, 40, 7);
  const std::vector<float> ref = full_pass(*model, tokens);

  // Steps of irregular sizes, including single-token decode steps.
  const size_t steps[] = {1, 5, 1, 1, 9, 2, 13, 1, 7};
  bp::Sequence seq(*model);
  size_t done = 0;
  for (size_t step : steps) {
    std::span<const int32_t> part(tokens.data() + done, step);
    const std::vector<float> got = seq.append(part, bp::LogitsMode::ALL);
    for (size_t i = 0; i < step; ++i)
      expect_close(got.data() + i * V, ref.data() + (done + i) * V, V, "position " + std::to_string(done + i));
    done += step;
  }
  ASSERT_EQ(done, tokens.size());
}

// A long prefill stores its K/V with the whole team (store_kv's shared copy, over 64 KiB); short
// steps store theirs on one thread. Both must give the same logits at every position.
TEST_P(RuntimeContinuation, LongPrefillEqualsShortSteps) {
  const auto model = bp::Model::load(generated_model(GetParam().arch, GetParam().dtype));
  const int32_t V = model->config().n_vocab;
  const std::vector<int32_t> tokens = random_tokens(V, 256, 11);
  ASSERT_GE(2 * tokens.size() * model->config().kv_dim() * sizeof(float), size_t{64} << 10);
  const std::vector<float> ref = full_pass(*model, tokens);
  bp::Sequence seq(*model);
  for (size_t done = 0; done < tokens.size(); done += 16) {
    const std::vector<float> got = seq.append(std::span<const int32_t>(tokens.data() + done, 16), bp::LogitsMode::ALL);
    for (size_t i = 0; i < 16; ++i)
      expect_close(got.data() + i * V, ref.data() + (done + i) * V, V, "position " + std::to_string(done + i));
  }
}

// Decode after a long context splits the keys into runs over the threads (attention.cpp,
// SPLIT_MIN_KEYS), partial softmaxes combined: one- and few-token steps there equal a full pass.
// Three threads, whatever the machine has, so that three runs are exercised too; the "small"
// preset, whose layers are big enough for the decode schedule to use them.
TEST_P(RuntimeContinuation, DecodeAfterLongContextEqualsFullPass) {
  const auto model = bp::Model::load(generated_model(GetParam().arch, GetParam().dtype, "small"));
  const int32_t V = model->config().n_vocab;
  const std::vector<int32_t> tokens = random_tokens(V, 230, 13);
  ASSERT_LE(tokens.size(), static_cast<size_t>(model->config().n_ctx));
  const std::vector<float> ref = full_pass(*model, tokens);
  struct Threads {  // 3 for this test, then as before
    int saved = omp_get_max_threads();
    Threads() { omp_set_num_threads(3); }
    ~Threads() { omp_set_num_threads(saved); }
  } threads;
  bp::Sequence seq(*model);
  seq.append(std::span<const int32_t>(tokens.data(), 120), bp::LogitsMode::NONE);
  const size_t steps[] = {1, 3, 1, 2, 60, 1, 1, 5, 1, 1, 4, 1, 29};  // to 230; runs of 64 keys or more
  size_t done = 120;
  for (size_t step : steps) {
    const std::vector<float> got = seq.append(std::span<const int32_t>(tokens.data() + done, step), bp::LogitsMode::ALL);
    for (size_t i = 0; i < step; ++i)
      expect_close(got.data() + i * V, ref.data() + (done + i) * V, V, "position " + std::to_string(done + i));
    done += step;
  }
  EXPECT_EQ(done, tokens.size());
}

TEST_P(RuntimeContinuation, RaggedBatchOverSharedAncestorsEqualsFullPasses) {
  const auto model = bp::Model::load(generated_model(GetParam().arch, GetParam().dtype));
  const bp::ModelConfig& c = model->config();
  const int32_t V = c.n_vocab;
  const int64_t kv = c.kv_dim();

  // Two ancestor spans A then B, computed as separate chunks (K/V in the runtime's span layout).
  const std::vector<int32_t> a = random_tokens(V, 11, 1), b = random_tokens(V, 6, 2);
  auto alloc = [&](size_t n) { return std::vector<float>(static_cast<size_t>(c.n_layer) * n * kv); };
  std::vector<float> ka = alloc(a.size()), va = alloc(a.size()), kb = alloc(b.size()), vb = alloc(b.size());
  compute_span(*model, a, {}, ka.data(), va.data());
  const bp::KvSpanView view_a{ka.data(), va.data(), static_cast<int32_t>(a.size())};
  compute_span(*model, b, std::span<const bp::KvSpanView>(&view_a, 1), kb.data(), vb.data());
  const bp::KvSpanView chain_ab[] = {view_a, {kb.data(), vb.data(), static_cast<int32_t>(b.size())}};

  // One ragged batch: three branches of different lengths after A+B, one after A only, and one
  // with no ancestors at all.
  struct Branch { std::vector<int32_t> tokens; int n_past; };
  const std::vector<Branch> branches = {
      {random_tokens(V, 1, 10), 2}, {random_tokens(V, 4, 11), 2}, {random_tokens(V, 9, 12), 2},
      {random_tokens(V, 3, 13), 1}, {random_tokens(V, 5, 14), 0}};
  std::vector<std::vector<float>> k_out, v_out, logits;
  std::vector<bp::ForwardSpan> batch;
  for (const Branch& br : branches) {
    k_out.push_back(alloc(br.tokens.size()));
    v_out.push_back(alloc(br.tokens.size()));
    logits.emplace_back(br.tokens.size() * V);
  }
  for (size_t i = 0; i < branches.size(); ++i) {
    bp::ForwardSpan s;
    s.past = std::span<const bp::KvSpanView>(chain_ab, static_cast<size_t>(branches[i].n_past));
    s.pos0 = branches[i].n_past == 0 ? 0 : static_cast<int32_t>(a.size() + (branches[i].n_past == 2 ? b.size() : 0));
    s.tokens = branches[i].tokens;
    s.k_out = k_out[i].data();
    s.v_out = v_out[i].data();
    s.logits = bp::LogitsMode::ALL;
    s.logits_out = logits[i].data();
    batch.push_back(s);
  }
  bp::forward(*model, batch);

  for (size_t i = 0; i < branches.size(); ++i) {
    std::vector<int32_t> whole;
    if (branches[i].n_past >= 1) whole.insert(whole.end(), a.begin(), a.end());
    if (branches[i].n_past >= 2) whole.insert(whole.end(), b.begin(), b.end());
    const size_t off = whole.size();
    whole.insert(whole.end(), branches[i].tokens.begin(), branches[i].tokens.end());
    const std::vector<float> ref = full_pass(*model, whole);
    for (size_t t = 0; t < branches[i].tokens.size(); ++t)
      expect_close(logits[i].data() + t * V, ref.data() + (off + t) * V, V,
                   "branch " + std::to_string(i) + " token " + std::to_string(t));
  }
}

// A batch of one span has its products write K and V straight into the span's k_out / v_out
// (kv_rows); a batch of several computes them into scratch and copies them there (store_kv).
// The same span computed both ways must leave the same K/V, layer by layer, and the same logits.
TEST_P(RuntimeContinuation, OneSpanBatchWritesTheKvABatchOfTwoStores) {
  const auto model = bp::Model::load(generated_model(GetParam().arch, GetParam().dtype));
  const bp::ModelConfig& c = model->config();
  const int32_t V = c.n_vocab;
  const int64_t kv = c.kv_dim();
  const std::vector<int32_t> a = random_tokens(V, 11, 21), x = random_tokens(V, 24, 22), y = random_tokens(V, 7, 23);
  auto alloc = [&](size_t n) { return std::vector<float>(static_cast<size_t>(c.n_layer) * n * kv, -1.0f); };
  std::vector<float> ka = alloc(a.size()), va = alloc(a.size());
  compute_span(*model, a, {}, ka.data(), va.data());
  const bp::KvSpanView view_a{ka.data(), va.data(), static_cast<int32_t>(a.size())};

  // x after a: alone, then beside y (no ancestors) in one batch.
  std::vector<float> k1 = alloc(x.size()), v1 = alloc(x.size()), k2 = alloc(x.size()), v2 = alloc(x.size());
  std::vector<float> ky = alloc(y.size()), vy = alloc(y.size());
  std::vector<float> logits1(x.size() * V), logits2(x.size() * V), logits_y(y.size() * V);
  bp::ForwardSpan sx;
  sx.past = std::span<const bp::KvSpanView>(&view_a, 1);
  sx.pos0 = static_cast<int32_t>(a.size());
  sx.tokens = x;
  sx.logits = bp::LogitsMode::ALL;
  bp::ForwardSpan alone = sx;
  alone.k_out = k1.data();
  alone.v_out = v1.data();
  alone.logits_out = logits1.data();
  bp::forward(*model, std::span<const bp::ForwardSpan>(&alone, 1));
  bp::ForwardSpan pair[2] = {sx, {}};
  pair[0].k_out = k2.data();
  pair[0].v_out = v2.data();
  pair[0].logits_out = logits2.data();
  pair[1].tokens = y;
  pair[1].k_out = ky.data();
  pair[1].v_out = vy.data();
  pair[1].logits = bp::LogitsMode::ALL;
  pair[1].logits_out = logits_y.data();
  bp::forward(*model, pair);

  auto expect_same_kv = [&](const std::vector<float>& got, const std::vector<float>& ref, const char* which) {
    float max_ref = 0.0f, max_diff = 0.0f;
    for (size_t i = 0; i < ref.size(); ++i) {
      max_ref = std::max(max_ref, std::abs(ref[i]));
      max_diff = std::max(max_diff, std::abs(got[i] - ref[i]));
    }
    EXPECT_LE(max_diff, 1e-5f * std::max(1.0f, max_ref)) << which << ": max diff " << max_diff << ", max |value| " << max_ref;
  };
  expect_same_kv(k1, k2, "K");
  expect_same_kv(v1, v2, "V");
  for (size_t t = 0; t < x.size(); ++t)
    expect_close(logits1.data() + t * V, logits2.data() + t * V, V, "token " + std::to_string(t));
}

// A cleared sequence writes its new tokens' K/V over the old ones in memory it keeps: what it
// computes next must not see any of them. The second text is shorter than the first, so stale
// rows lie right past its end, and is then continued past where the first one ended.
TEST_P(RuntimeContinuation, ClearedSequenceEqualsFreshOne) {
  const auto model = bp::Model::load(generated_model(GetParam().arch, GetParam().dtype));
  const int32_t V = model->config().n_vocab;
  const std::vector<int32_t> first = random_tokens(V, 48, 17), second = random_tokens(V, 64, 19);
  const std::vector<float> ref = full_pass(*model, second);
  bp::Sequence seq(*model);
  seq.append(first, bp::LogitsMode::NONE);
  seq.clear();
  EXPECT_EQ(seq.n_tokens(), 0);
  EXPECT_TRUE(seq.tokens().empty());
  size_t done = 0;
  for (size_t step : {size_t{20}, size_t{1}, size_t{1}, size_t{42}}) {
    const std::vector<float> got = seq.append(std::span<const int32_t>(second.data() + done, step), bp::LogitsMode::ALL);
    for (size_t i = 0; i < step; ++i)
      expect_close(got.data() + i * V, ref.data() + (done + i) * V, V, "position " + std::to_string(done + i));
    done += step;
  }
  EXPECT_EQ(seq.tokens(), second);
}

INSTANTIATE_TEST_SUITE_P(Archs, RuntimeContinuation,
                         ::testing::Values(ArchCase{bp::Arch::GPT2, bp::DType::F32}, ArchCase{bp::Arch::LLAMA, bp::DType::F32},
                                           ArchCase{bp::Arch::GPT2, bp::DType::Q8_0}, ArchCase{bp::Arch::LLAMA, bp::DType::F16},
                                           ArchCase{bp::Arch::LLAMA, bp::DType::BF16}),
                         [](const auto& info) {
                           return std::string(bp::arch_name(info.param.arch)) + "_" + bp::dtype_name(info.param.dtype);
                         });

TEST(Runtime, RejectsTokensOutsideVocabularyAndPastContext) {
  const auto model = bp::Model::load(generated_model(bp::Arch::LLAMA, bp::DType::F32));
  bp::Sequence seq(*model);
  const std::vector<int32_t> bad = {0, model->config().n_vocab};
  try {
    seq.append(bad);
    FAIL() << "expected an error";
  } catch (const bp::Error& e) {
    EXPECT_EQ(e.code(), bp::ErrorCode::INVALID_ARGUMENT);
    EXPECT_NE(std::string(e.what()).find("vocabulary"), std::string::npos) << e.what();
  }
  EXPECT_EQ(seq.n_tokens(), 0);  // nothing appended on failure
  const std::vector<int32_t> too_long(static_cast<size_t>(model->config().n_ctx) + 1, 1);
  EXPECT_THROW(seq.append(too_long), bp::Error);
}

// Rewrites a generated model, dropping or reshaping one tensor or changing the architecture.
std::string rewrite_model(const std::string& src, const std::string& out, const std::string& drop,
                          const std::string& arch_override = "") {
  auto f = bp::gguf::File::open(src);
  bp::gguf::Writer w;
  for (const auto& kv : f->metadata()) w.copy_kv(kv);
  if (!arch_override.empty()) w.set_string("general.architecture", arch_override);
  for (const auto& t : f->tensors()) {
    if (t.name == drop) continue;
    const uint8_t* data = t.data;
    const size_t n = t.n_bytes;
    w.add_tensor(t.name, t.type, t.ne, [data, n](std::span<uint8_t> dst) { std::memcpy(dst.data(), data, n); });
  }
  w.write(out);
  return out;
}

TEST(Runtime, LoadNamesMissingTensorAndUnknownArchitecture) {
  const std::string src = generated_model(bp::Arch::LLAMA, bp::DType::F32);
  const std::string dir = bp::testing::temp_dir();
  try {
    bp::Model::load(rewrite_model(src, dir + "/missing.gguf", "blk.1.ffn_up.weight"));
    FAIL() << "expected an error";
  } catch (const bp::Error& e) {
    EXPECT_EQ(e.code(), bp::ErrorCode::CORRUPT_FILE);
    EXPECT_NE(std::string(e.what()).find("blk.1.ffn_up.weight"), std::string::npos) << e.what();
  }
  try {
    bp::Model::load(rewrite_model(src, dir + "/arch.gguf", "", "mamba"));
    FAIL() << "expected an error";
  } catch (const bp::Error& e) {
    EXPECT_EQ(e.code(), bp::ErrorCode::UNSUPPORTED);
    EXPECT_NE(std::string(e.what()).find("mamba"), std::string::npos) << e.what();
  }
}

TEST(Runtime, LoadNamesMisShapedTensor) {
  const std::string src = generated_model(bp::Arch::GPT2, bp::DType::F32);
  auto f = bp::gguf::File::open(src);
  bp::gguf::Writer w;
  for (const auto& kv : f->metadata()) w.copy_kv(kv);
  for (const auto& t : f->tensors()) {
    std::vector<int64_t> ne = t.ne;
    const size_t n = t.n_bytes;
    const uint8_t* data = t.data;
    if (t.name == "blk.0.ffn_down.weight") std::swap(ne[0], ne[1]);  // transposed
    w.add_tensor(t.name, t.type, ne, [data, n](std::span<uint8_t> dst) { std::memcpy(dst.data(), data, n); });
  }
  const std::string out = bp::testing::temp_dir() + "/shape.gguf";
  w.write(out);
  try {
    bp::Model::load(out);
    FAIL() << "expected an error";
  } catch (const bp::Error& e) {
    EXPECT_EQ(e.code(), bp::ErrorCode::CORRUPT_FILE);
    EXPECT_NE(std::string(e.what()).find("blk.0.ffn_down.weight"), std::string::npos) << e.what();
  }
}

TEST(Runtime, FingerprintsFollowWeightsAndTokenizer) {
  const auto a = bp::Model::load(generated_model(bp::Arch::LLAMA, bp::DType::F32, "tiny", 1));
  const auto a2 = bp::Model::load(generated_model(bp::Arch::LLAMA, bp::DType::F32, "tiny", 1));
  const auto b = bp::Model::load(generated_model(bp::Arch::LLAMA, bp::DType::F32, "tiny", 2));
  const auto c = bp::Model::load(generated_model(bp::Arch::LLAMA, bp::DType::F16, "tiny", 1));
  EXPECT_EQ(a->fingerprint(), a2->fingerprint());
  EXPECT_NE(a->fingerprint(), b->fingerprint());
  EXPECT_NE(a->fingerprint(), c->fingerprint());
  EXPECT_EQ(a->tokenizer_fingerprint(), b->tokenizer_fingerprint());
  const auto g = bp::Model::load(generated_model(bp::Arch::GPT2, bp::DType::F32));
  EXPECT_NE(a->tokenizer_fingerprint(), g->tokenizer_fingerprint());
}

TEST(Runtime, WeightsInMemoryComputeWhatMappedWeightsDo) {
  const ArchCase cases[] = {{bp::Arch::LLAMA, bp::DType::F32}, {bp::Arch::LLAMA, bp::DType::Q8_0},
                            {bp::Arch::LLAMA, bp::DType::BF16}, {bp::Arch::GPT2, bp::DType::F16}};
  for (const ArchCase& c : cases) {
    const std::string path = generated_model(c.arch, c.dtype);
    bp::LoadOptions mapped_opt, memory_opt;
    mapped_opt.weights = bp::WeightPlacement::MAPPED;
    memory_opt.weights = bp::WeightPlacement::MEMORY;
    const auto mapped = bp::Model::load(path, mapped_opt);
    const auto memory = bp::Model::load(path, memory_opt);
    EXPECT_EQ(mapped->weight_placement(), bp::WeightPlacement::MAPPED);
    EXPECT_EQ(memory->weight_placement(), bp::WeightPlacement::MEMORY);
    EXPECT_EQ(memory->fingerprint(), mapped->fingerprint());
    const std::vector<int32_t> tokens = random_tokens(mapped->config().n_vocab, 40, 7);
    const std::vector<float> a = full_pass(*mapped, tokens), b = full_pass(*memory, tokens);
    ASSERT_EQ(a.size(), b.size());
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0)
        << bp::arch_name(c.arch) << " " << memory->weight_type_name() << ": logits differ";
  }
}

TEST(Runtime, AutoPlacementCopiesLargeFilesThatFit) {
  using bp::WeightPlacement;
  using bp::detail::auto_placement;
  constexpr uint64_t GiB = uint64_t{1} << 30;
  constexpr uint64_t MiB = uint64_t{1} << 20;
  EXPECT_EQ(auto_placement(4 * GiB, 23 * GiB, true), WeightPlacement::MEMORY);
  EXPECT_EQ(auto_placement(GiB, 2 * GiB, true), WeightPlacement::MEMORY);
  EXPECT_EQ(auto_placement(64 * MiB, 23 * GiB, true), WeightPlacement::MEMORY);
  EXPECT_EQ(auto_placement(64 * MiB - 1, 23 * GiB, true), WeightPlacement::MAPPED);  // small: read from cache
  EXPECT_EQ(auto_placement(4 * GiB, 8 * GiB - 1, true), WeightPlacement::MAPPED);  // over half the memory
  EXPECT_EQ(auto_placement(4 * GiB, 23 * GiB, false), WeightPlacement::MAPPED);  // no huge pages
  EXPECT_EQ(auto_placement(4 * GiB, 0, true), WeightPlacement::MAPPED);          // memory not known
  // The small generated models stay mapped by default.
  EXPECT_EQ(bp::Model::load(generated_model(bp::Arch::LLAMA, bp::DType::F32))->weight_placement(),
            WeightPlacement::MAPPED);
  for (WeightPlacement p : {WeightPlacement::AUTO, WeightPlacement::MAPPED, WeightPlacement::MEMORY}) {
    EXPECT_EQ(bp::weight_placement_from_name(bp::weight_placement_name(p)), p);
  }
  EXPECT_FALSE(bp::weight_placement_from_name("mapped"));
}

}  // namespace
