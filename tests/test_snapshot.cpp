// Snapshots: save -> restore -> continue equals one uninterrupted run (both architectures and
// stories260K, greedy and sampled); wrong model or tokenizer; truncated and corrupted files;
// atomic writes; the K/V storage types. (The CLI: test_snapshot_cli.cpp.)
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "backprompt/backprompt.h"
#include "gguf/gguf.h"
#include "model/runtime.h"
#include "snapshot_format.h"
#include "store/kv_codec.h"
#include "test_util.h"

namespace bp = backprompt;
namespace snap = backprompt::snapshot;
using bp::testing::generated_model;
using bp::testing::read_file;
using bp::testing::temp_dir;
using bp::testing::write_file;

namespace {

std::string fresh_path(const std::string& stem) { return bp::testing::fresh_temp_path(stem, ".bps"); }

// The error a call throws (code and message), or nullopt.
struct Caught {
  bp::ErrorCode code;
  std::string message;
};
template <class F> std::optional<Caught> catch_error(F&& f) {
  try {
    f();
  } catch (const bp::Error& e) {
    return Caught{e.code(), e.what()};
  }
  return std::nullopt;
}

std::shared_ptr<bp::Model> tiny(bp::Arch arch, uint64_t seed = 1) {
  return bp::Model::load(generated_model(arch, bp::DType::F32, "tiny", seed));
}

std::shared_ptr<bp::Model> stories() {
  const std::string path = bp::testing::test_data_file("stories260k/stories260K.gguf");
  return path.empty() ? nullptr : bp::Model::load(path);
}

bp::SamplingParams greedy() { return {}; }

bp::SnapshotOptions snapshot_options(bp::KvType type, bool zstd, const bp::SamplingParams& sampler = {}) {
  bp::SnapshotOptions o;
  o.kv_type = type;
  o.zstd = zstd;
  o.sampler = sampler;
  return o;
}
bp::SamplingParams sampled() {
  bp::SamplingParams p;
  p.temperature = 1.0f;
  p.top_p = 0.9f;
  p.seed = 1234;
  return p;
}

// Logits of one uncached forward pass over `tokens`.
std::vector<float> uncached_logits(const bp::Model& model, const std::vector<int32_t>& tokens) {
  bp::Sequence seq(model);
  return seq.append(tokens);
}

// save after `n_first` generated tokens, restore into a fresh cache, continue: the tokens equal
// one uninterrupted generate() of n_first + n_rest, and nothing before the seam is recomputed.
void check_resume(const std::shared_ptr<bp::Model>& model, const std::string& prompt, const bp::SamplingParams& sp,
                  int32_t n_first, int32_t n_rest) {
  std::vector<int32_t> want;
  {
    bp::Cache cache(model);
    want = cache.text(prompt).generate(n_first + n_rest, sp).tokens();
  }
  const std::string path = fresh_path("resume");
  std::vector<int32_t> first_tokens;
  std::string first_string;
  {
    bp::Cache cache(model);
    uint64_t rng = 0;
    const bp::Text first = cache.text(prompt).generate(n_first, sp, {}, &rng);
    first_tokens = first.tokens();
    first_string = first.string();
    bp::SnapshotOptions opt;
    opt.sampler = sp;
    opt.sampler.rng_state = rng;
    first.save(path, opt);
  }
  const int32_t eos = model->tokenizer().eos();
  if (first_tokens.back() == eos) GTEST_SKIP() << "the stream ended with EOS before the seam";

  bp::Cache cache(model);
  bp::SamplingParams resumed;
  const bp::Text restored = cache.restore(path, &resumed);
  EXPECT_EQ(restored.tokens(), first_tokens);
  EXPECT_EQ(restored.string(), first_string);
  EXPECT_EQ(resumed.seed, sp.seed);
  EXPECT_EQ(resumed.temperature, sp.temperature);
  EXPECT_EQ(snap::decode_header(read_file(path), path).version, snap::FORMAT_VERSION);

  // The restored next logits equal an uncached pass.
  const std::vector<float> got = restored.next_logits();
  const std::vector<float> ref = uncached_logits(*model, first_tokens);
  ASSERT_EQ(got.size(), ref.size());
  const auto cmp = bp::testing::compare_logits(got.data(), ref.data(), static_cast<int64_t>(ref.size()));
  EXPECT_TRUE(cmp.within_tolerance() && cmp.same_argmax) << "max diff " << cmp.max_abs_diff;
  EXPECT_EQ(cache.stats().tokens_computed, 0u) << "restoring computes nothing";

  const std::vector<int32_t> got_all = restored.generate(n_rest, resumed).tokens();
  EXPECT_EQ(got_all, want);
  EXPECT_LE(cache.stats().tokens_computed, static_cast<uint64_t>(n_rest)) << "only the new tokens are computed";
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The K/V codec

TEST(SnapshotCodec, RoundTripEveryType) {
  std::vector<float> x(1000 + 7);  // not a multiple of the q8_0 block
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i)) * (1.0f + static_cast<float>(i % 13));
  for (bp::DType t : {bp::DType::F32, bp::DType::F16, bp::DType::BF16, bp::DType::Q8_0}) {
    for (bool zstd : {false, true}) {
      SCOPED_TRACE(std::string(bp::dtype_name(t)) + (zstd ? "+zstd" : ""));
      const bp::KvCodec codec{t, zstd};
      std::vector<uint8_t> bytes = {0xAB};  // appended after what is there
      bp::kv_encode(codec, x, bytes);
      ASSERT_EQ(bytes[0], 0xAB);
      const std::span<const uint8_t> enc(bytes.data() + 1, bytes.size() - 1);
      std::vector<float> y(x.size());
      bp::kv_decode(codec, enc, y, "test");
      float max_err = 0.0f;
      for (size_t i = 0; i < x.size(); ++i) max_err = std::max(max_err, std::abs(x[i] - y[i]));
      if (t == bp::DType::F32) EXPECT_EQ(max_err, 0.0f);
      else EXPECT_LT(max_err, t == bp::DType::F16 ? 0.01f : 0.2f);
      // A wrong count or truncated bytes are CORRUPT_FILE naming `what`.
      std::vector<float> wrong(x.size() + 40);
      auto e = catch_error([&] { bp::kv_decode(codec, enc, wrong, "keys of layer 9"); });
      ASSERT_TRUE(e);
      EXPECT_EQ(e->code, bp::ErrorCode::CORRUPT_FILE);
      EXPECT_NE(e->message.find("keys of layer 9"), std::string::npos) << e->message;
      e = catch_error([&] { bp::kv_decode(codec, enc.subspan(0, enc.size() - 1), y, "v"); });
      ASSERT_TRUE(e);
      EXPECT_EQ(e->code, bp::ErrorCode::CORRUPT_FILE);
    }
  }
  std::vector<float> none;
  std::vector<uint8_t> bytes;
  bp::kv_encode({bp::DType::Q8_0, true}, none, bytes);
  bp::kv_decode({bp::DType::Q8_0, true}, bytes, none, "empty");
}

// ---------------------------------------------------------------------------------------------
// save -> restore -> continue

TEST(Snapshot, ResumeGreedyLlama) { check_resume(tiny(bp::Arch::LLAMA), "Hello there", greedy(), 9, 15); }
TEST(Snapshot, ResumeGreedyGpt2) { check_resume(tiny(bp::Arch::GPT2), "Hello there", greedy(), 9, 15); }
TEST(Snapshot, ResumeSampledLlama) { check_resume(tiny(bp::Arch::LLAMA), "Hello there", sampled(), 9, 15); }
TEST(Snapshot, ResumeSampledGpt2) { check_resume(tiny(bp::Arch::GPT2), "Hello there", sampled(), 9, 15); }

TEST(Snapshot, ResumeStories260K) {
  auto model = stories();
  if (!model) GTEST_SKIP() << "test data stories260k/stories260K.gguf not found (BACKPROMPT_TEST_DATA)";
  check_resume(model, "Once upon a time, there was a", greedy(), 20, 30);
  check_resume(model, "Once upon a time, there was a", sampled(), 20, 30);
}

TEST(Snapshot, SaveRightAfterPromptThenContinue) {
  // No token generated before the save: the sampler starts from its seed after restoring.
  auto model = tiny(bp::Arch::LLAMA);
  bp::Cache a(model);
  const std::vector<int32_t> want = a.text("abc def").generate(12, sampled()).tokens();
  const std::string path = fresh_path("prompt");
  a.text("abc def").save(path, snapshot_options(bp::KvType::F32, false, sampled()));
  bp::Cache b(model);
  bp::SamplingParams sp;
  const bp::Text r = b.restore(path, &sp);
  EXPECT_EQ(sp.rng_state, 0u);
  EXPECT_EQ(r.generate(12, sp).tokens(), want);
}

TEST(Snapshot, RestoreBesidesCachedTextsAndAppend) {
  // Restoring into a cache that already holds part of the path keeps what is there; texts built
  // on the restored one (string pieces after a token segment) equal uncached passes.
  for (bp::Arch arch : {bp::Arch::LLAMA, bp::Arch::GPT2}) {
    auto model = tiny(arch);
    const std::string path = fresh_path("warm");
    bp::Cache a(model);
    const bp::Text saved = a.text("The quick brown fox") + " jumps";
    saved.save(path);

    bp::Cache b(model);
    const bp::Text part = b.text("The quick brown");
    part.next_logits();
    const bp::Text r = b.restore(path);
    EXPECT_EQ(r.tokens(), saved.tokens());
    const bp::Text more = r + " over the dog";
    const std::vector<int32_t> toks = more.tokens();
    const std::vector<float> got = more.next_logits();
    const std::vector<float> ref = uncached_logits(*model, toks);
    const auto cmp = bp::testing::compare_logits(got.data(), ref.data(), static_cast<int64_t>(ref.size()));
    EXPECT_TRUE(cmp.within_tolerance() && cmp.same_argmax) << arch_name(arch) << " max diff " << cmp.max_abs_diff;
    // The part of the tree that existed is still served.
    const std::vector<float> p2 = part.next_logits();
    const std::vector<float> pref = uncached_logits(*model, part.tokens());
    const auto c2 = bp::testing::compare_logits(p2.data(), pref.data(), static_cast<int64_t>(pref.size()));
    EXPECT_TRUE(c2.within_tolerance());
  }
}

TEST(Snapshot, LogprobsAreKeptWhenKnown) {
  auto model = tiny(bp::Arch::LLAMA);
  bp::Cache a(model);
  const bp::Text t = a.text("one two three four");
  const std::vector<float> lp = t.logprobs();
  const std::string with_lp = fresh_path("lp");
  t.save(with_lp);

  bp::Cache b(model);
  const bp::Text r = b.restore(with_lp);
  EXPECT_EQ(r.logprobs(), lp);
  EXPECT_EQ(b.stats().tokens_computed + b.stats().tokens_recomputed, 0u) << "logprobs came from the file";

  // Saved without logprobs: they are NaN in the file and computed on demand after restoring.
  bp::Cache c(model);
  const std::string without = fresh_path("nolp");
  c.text("one two three four").save(without);
  const snap::Snapshot s = snap::decode(read_file(without), without);
  for (float x : s.logprobs) EXPECT_TRUE(std::isnan(x));
  bp::Cache d(model);
  const std::vector<float> lp2 = d.restore(without).logprobs();
  ASSERT_EQ(lp2.size(), lp.size());
  for (size_t i = 0; i < lp.size(); ++i) EXPECT_NEAR(lp2[i], lp[i], 1e-4f);
}

TEST(Snapshot, EmptyTextCannotBeSaved) {
  auto model = tiny(bp::Arch::GPT2);  // no BOS: "" has no tokens
  bp::Cache cache(model);
  auto e = catch_error([&] { cache.text("").save(fresh_path("empty")); });
  ASSERT_TRUE(e);
  EXPECT_EQ(e->code, bp::ErrorCode::INVALID_ARGUMENT);
  e = catch_error([&] { bp::Text().save(fresh_path("none")); });
  ASSERT_TRUE(e);
  EXPECT_EQ(e->code, bp::ErrorCode::INVALID_ARGUMENT);
}

TEST(Snapshot, BosOnlyText) {
  auto model = tiny(bp::Arch::LLAMA);  // adds BOS: "" is [BOS]
  bp::Cache a(model);
  const std::vector<int32_t> want = a.text("").generate(10).tokens();
  const std::string path = fresh_path("bos");
  a.text("").save(path);
  bp::Cache b(model);
  const bp::Text r = b.restore(path);
  EXPECT_EQ(r.string(), "");
  EXPECT_EQ(r.generate(10).tokens(), want);
}

// ---------------------------------------------------------------------------------------------
// Identity

TEST(Snapshot, OtherModelIsAMismatchNamingTheModel) {
  const std::string path = fresh_path("model");
  {
    bp::Cache a(tiny(bp::Arch::LLAMA, 1));
    a.text("hello").save(path);
  }
  bp::Cache b(tiny(bp::Arch::LLAMA, 2));
  const bp::Text before = b.text("hello");
  before.next_logits();
  const bp::CacheStats s0 = b.stats();
  auto e = catch_error([&] { b.restore(path); });
  ASSERT_TRUE(e);
  EXPECT_EQ(e->code, bp::ErrorCode::MODEL_MISMATCH);
  EXPECT_NE(e->message.find("another model"), std::string::npos) << e->message;
  EXPECT_EQ(b.stats().n_nodes, s0.n_nodes) << "the cache is unchanged";
  EXPECT_EQ(b.stats().bytes, s0.bytes);

  bp::Cache c(tiny(bp::Arch::GPT2, 1));
  e = catch_error([&] { c.restore(path); });
  ASSERT_TRUE(e);
  EXPECT_EQ(e->code, bp::ErrorCode::MODEL_MISMATCH);
}

TEST(Snapshot, OtherTokenizerIsAMismatchNamingTheTokenizer) {
  // The same weights with one tokenizer key changed (EOS id): the model fingerprint is equal.
  const std::string src = generated_model(bp::Arch::LLAMA, bp::DType::F32);
  const std::string dst = temp_dir() + "/llama-tiny-other-eos.gguf";
  {
    auto f = bp::gguf::File::open(src);
    bp::gguf::Writer w;
    for (const bp::gguf::KeyValue& kv : f->metadata()) {
      if (kv.key == "tokenizer.ggml.eos_token_id") w.set_u32(kv.key, 0);
      else w.copy_kv(kv);
    }
    for (const bp::gguf::TensorInfo& t : f->tensors())
      w.add_tensor(t.name, t.type, t.ne, [&t](std::span<uint8_t> out) { std::memcpy(out.data(), t.data, out.size()); });
    w.write(dst);
  }
  auto original = bp::Model::load(src);
  auto other = bp::Model::load(dst);
  ASSERT_EQ(original->fingerprint(), other->fingerprint());
  ASSERT_NE(original->tokenizer_fingerprint(), other->tokenizer_fingerprint());
  const std::string path = fresh_path("tok");
  {
    bp::Cache a(original);
    a.text("hello").save(path);
  }
  bp::Cache b(other);
  auto e = catch_error([&] { b.restore(path); });
  ASSERT_TRUE(e);
  EXPECT_EQ(e->code, bp::ErrorCode::MODEL_MISMATCH);
  EXPECT_NE(e->message.find("tokenizer"), std::string::npos) << e->message;
  EXPECT_EQ(e->message.find("another model"), std::string::npos) << e->message;
}

// ---------------------------------------------------------------------------------------------
// Damaged files

namespace {

struct DamageFixture {
  std::shared_ptr<bp::Model> model;
  std::string path;
  std::vector<uint8_t> bytes;
  std::vector<snap::SectionInfo> sections;
};

DamageFixture make_damage_fixture(bool zstd) {
  DamageFixture f;
  f.model = tiny(bp::Arch::LLAMA);
  f.path = fresh_path(zstd ? "damage-zstd" : "damage");
  bp::Cache cache(f.model);
  const bp::Text t = cache.text("damage me");
  t.logprobs();
  t.save(f.path, snapshot_options(zstd ? bp::KvType::Q8_0 : bp::KvType::F32, zstd, sampled()));
  f.bytes = read_file(f.path);
  f.sections = snap::scan(f.bytes, f.path);
  return f;
}

// The section a byte offset falls in ("preamble" before the first).
std::string section_at(const DamageFixture& f, size_t offset) {
  std::string name = "preamble";
  for (const snap::SectionInfo& s : f.sections)
    if (offset >= s.offset) name = snap::section_name(s.kind, s.index);
  return name;
}

}  // namespace

TEST(Snapshot, TruncatedAtEveryOffsetIsCorruptNamingTheSection) {
  for (bool zstd : {false, true}) {
    const DamageFixture f = make_damage_fixture(zstd);
    for (size_t cut = 0; cut < f.bytes.size(); ++cut) {
      const std::span<const uint8_t> part(f.bytes.data(), cut);
      auto e = catch_error([&] { snap::decode(part, "cut"); });
      ASSERT_TRUE(e) << "cut at " << cut;
      ASSERT_EQ(e->code, bp::ErrorCode::CORRUPT_FILE) << e->message;
      // A cut inside a section's header or payload names that section; a cut exactly at a
      // boundary names the next one (which is missing).
      std::string want = section_at(f, cut);
      for (const snap::SectionInfo& s : f.sections)
        if (cut == s.offset) want = snap::section_name(s.kind, s.index);
      if (cut < snap::PREAMBLE_BYTES) want = "preamble";
      ASSERT_NE(e->message.find(want + ":"), std::string::npos) << "cut at " << cut << ": " << e->message;
    }
    // Through restore too, at some offsets (and every section boundary), leaving the cache as it was.
    bp::Cache cache(f.model);
    std::vector<size_t> cuts = {0, 5, 8, 15, 16, 17};
    for (const snap::SectionInfo& s : f.sections)
      for (size_t d : {0, 1, 23, 24, 25}) cuts.push_back(s.offset + d);
    cuts.push_back(f.bytes.size() - 1);
    for (size_t cut : cuts) {
      if (cut >= f.bytes.size()) continue;
      const std::string p = fresh_path("cut");
      write_file(p, std::span<const uint8_t>(f.bytes.data(), cut));
      auto e = catch_error([&] { cache.restore(p); });
      ASSERT_TRUE(e);
      EXPECT_EQ(e->code, bp::ErrorCode::CORRUPT_FILE) << e->message;
      EXPECT_EQ(cache.stats().n_nodes, 0u);
    }
    // Bytes appended.
    std::vector<uint8_t> longer = f.bytes;
    longer.push_back(0);
    auto e = catch_error([&] { snap::decode(longer, "long"); });
    ASSERT_TRUE(e);
    EXPECT_EQ(e->code, bp::ErrorCode::CORRUPT_FILE);
  }
}

TEST(Snapshot, FlippedBytesInEverySectionAreCorruptNamingTheSection) {
  for (bool zstd : {false, true}) {
    const DamageFixture f = make_damage_fixture(zstd);
    bp::Cache cache(f.model);
    std::vector<size_t> offsets = {0, 3, 7, 12, 13, 15};  // magic, n_sections
    for (const snap::SectionInfo& s : f.sections) {
      for (size_t d : {0, 4, 8, 15, 16, 23}) offsets.push_back(s.offset + d);  // kind, index, length, checksum
      const size_t payload = s.offset + snap::SECTION_HEADER_BYTES;
      if (s.length > 0) {
        offsets.push_back(payload);
        offsets.push_back(payload + s.length / 2);
        offsets.push_back(payload + s.length - 1);
      }
    }
    int n_restored = 0;
    for (size_t off : offsets) {
      for (uint8_t mask : {0x01, 0x80, 0xFF}) {
        std::vector<uint8_t> bad = f.bytes;
        bad[off] ^= mask;
        auto e = catch_error([&] { snap::decode(bad, "flip"); });
        ASSERT_TRUE(e) << "flip at " << off;
        ASSERT_EQ(e->code, bp::ErrorCode::CORRUPT_FILE) << "flip at " << off << ": " << e->message;
        const std::string want = section_at(f, off);
        ASSERT_NE(e->message.find(want + ":"), std::string::npos) << "flip at " << off << ": " << e->message;
        if (mask == 0x01 && n_restored++ % 3 == 0) {
          const std::string p = fresh_path("flip");
          write_file(p, bad);
          auto r = catch_error([&] { cache.restore(p); });
          ASSERT_TRUE(r);
          EXPECT_EQ(r->code, bp::ErrorCode::CORRUPT_FILE) << r->message;
          EXPECT_EQ(cache.stats().n_nodes, 0u);
        }
      }
    }
    // The version: 0 is corrupt, a newer one unsupported.
    std::vector<uint8_t> v = f.bytes;
    v[8] = 0;
    auto e = catch_error([&] { snap::decode(v, "v0"); });
    ASSERT_TRUE(e);
    EXPECT_EQ(e->code, bp::ErrorCode::CORRUPT_FILE);
    v[8] = 2;
    e = catch_error([&] { snap::decode(v, "v2"); });
    ASSERT_TRUE(e);
    EXPECT_EQ(e->code, bp::ErrorCode::UNSUPPORTED);
    // The untouched file still restores.
    EXPECT_EQ(cache.restore(f.path).string(), "damage me");
  }
}

TEST(Snapshot, ValidChecksumsButBadValuesAreCorrupt) {
  // A forged file (checksums recomputed) with values out of range.
  const DamageFixture f = make_damage_fixture(false);
  snap::Snapshot s = snap::decode(f.bytes, f.path);
  auto expect_corrupt = [&](snap::Snapshot bad, const std::string& section) {
    const std::vector<uint8_t> b = snap::encode(bad);
    const std::string p = fresh_path("forged");
    write_file(p, b);
    bp::Cache cache(f.model);
    auto e = catch_error([&] { cache.restore(p); });
    ASSERT_TRUE(e);
    EXPECT_EQ(e->code, bp::ErrorCode::CORRUPT_FILE) << e->message;
    EXPECT_NE(e->message.find(section + ":"), std::string::npos) << e->message;
    EXPECT_EQ(cache.stats().n_nodes, 0u);
  };
  snap::Snapshot bad = s;
  bad.tokens[1] = s.header.n_vocab;
  expect_corrupt(bad, "tokens");
  bad = s;
  bad.tokens[0] = 5;  // not BOS
  expect_corrupt(bad, "tokens");
  bad = s;
  bad.sampler.top_p = 0.0f;
  expect_corrupt(bad, "sampler");
  bad = s;
  bad.sampler.temperature = -1.0f;
  expect_corrupt(bad, "sampler");
}

// ---------------------------------------------------------------------------------------------
// Atomic writes

TEST(Snapshot, FailedSaveLeavesNoFileUnderTheFinalName) {
  auto model = tiny(bp::Arch::LLAMA);
  bp::Cache cache(model);
  const bp::Text small = cache.text("small");
  const bp::Text big = cache.text("a much longer text whose snapshot is larger than the small one's, by a lot");
  big.next_logits();
  const std::string dir = temp_dir() + "/atomic";
  std::filesystem::create_directories(dir);

  // A directory that does not exist: IO_ERROR, nothing written.
  auto e = catch_error([&] { small.save(dir + "/missing/x.bps"); });
  ASSERT_TRUE(e);
  EXPECT_EQ(e->code, bp::ErrorCode::IO_ERROR) << e->message;

  // A write that fails midway (file size limit) in a child process: the old file stays whole
  // and no temporary file is left behind.
  const std::string path = dir + "/snap.bps";
  small.save(path);
  const std::vector<uint8_t> before = read_file(path);
  ASSERT_GT(before.size(), 0u);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    signal(SIGXFSZ, SIG_IGN);
    struct rlimit lim = {static_cast<rlim_t>(before.size() + 100), static_cast<rlim_t>(before.size() + 100)};
    setrlimit(RLIMIT_FSIZE, &lim);
    int code = 3;
    try {
      big.save(path);
      code = 1;  // should have failed
    } catch (const bp::Error& err) {
      code = err.code() == bp::ErrorCode::IO_ERROR ? 0 : 2;
    }
    _exit(code);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "the save in the child did not fail with IO_ERROR";
  EXPECT_EQ(read_file(path), before);
  size_t n_files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    ++n_files;
    EXPECT_EQ(entry.path().filename().string(), "snap.bps");
  }
  EXPECT_EQ(n_files, 1u);
  bp::Cache other(model);
  EXPECT_EQ(other.restore(path).string(), "small");

  // A successful save replaces the file.
  big.save(path);
  EXPECT_EQ(other.restore(path).string(), big.string());
}

// ---------------------------------------------------------------------------------------------
// Storage types

namespace {

struct TypeResult {
  std::string name;
  double bytes_per_token = 0;
  double max_logit_err = 0;    // next logits after restored + more, vs f32
  double max_logprob_err = 0;  // logprobs of `more`'s tokens, vs f32
  bool same_argmax = true;
  double file_bytes = 0;
  double save_s = 0, restore_s = 0;  // wall time of save() (text already evaluated) and restore()
};

// Saves `prompt` with every storage type, restores each into a fresh cache, appends `more` and
// compares with the f32 snapshot.
std::vector<TypeResult> measure_types(const std::shared_ptr<bp::Model>& model, const std::string& prompt,
                                      const std::string& more) {
  std::vector<TypeResult> out;
  std::vector<float> ref_logits, ref_lp;
  size_t n_tokens = 0;
  bp::Cache src(model);
  const bp::Text text = src.text(prompt);
  text.next_logits();
  for (bp::KvType t : {bp::KvType::F32, bp::KvType::F16, bp::KvType::BF16, bp::KvType::Q8_0}) {
    for (bool zstd : {false, true}) {
      const std::string path = fresh_path(std::string("type-") + bp::kv_type_name(t));
      const auto t0 = std::chrono::steady_clock::now();
      text.save(path, snapshot_options(t, zstd));
      const auto t1 = std::chrono::steady_clock::now();
      bp::Cache cache(model);
      const bp::Text restored = cache.restore(path);
      const auto t2 = std::chrono::steady_clock::now();
      const bp::Text r = restored + more;
      const std::vector<float> logits = r.next_logits();
      const std::vector<float> lp = r.logprobs(text.n_tokens());  // `more`'s tokens
      n_tokens = text.n_tokens();
      if (ref_logits.empty()) {
        ref_logits = logits;
        ref_lp = lp;
      }
      TypeResult res;
      res.name = std::string(bp::kv_type_name(t)) + (zstd ? "+zstd" : "");
      res.file_bytes = static_cast<double>(std::filesystem::file_size(path));
      res.bytes_per_token = res.file_bytes / static_cast<double>(n_tokens);
      res.save_s = std::chrono::duration<double>(t1 - t0).count();
      res.restore_s = std::chrono::duration<double>(t2 - t1).count();
      const auto cmp = bp::testing::compare_logits(logits.data(), ref_logits.data(), static_cast<int64_t>(logits.size()));
      res.max_logit_err = cmp.max_abs_diff;
      res.same_argmax = cmp.same_argmax;
      for (size_t i = 0; i < lp.size(); ++i)
        res.max_logprob_err = std::max(res.max_logprob_err, static_cast<double>(std::abs(lp[i] - ref_lp[i])));
      out.push_back(res);
    }
  }
  return out;
}

void print_table(const std::string& title, size_t n_tokens, const std::vector<TypeResult>& rows) {
  std::printf("%s, %zu tokens\n| K/V type | bytes/token (file) | max abs logit err | max abs logprob err | same argmax "
              "| file MB | save s (MB/s) | restore s (MB/s) |\n|---|---|---|---|---|---|---|---|\n",
              title.c_str(), n_tokens);
  for (const TypeResult& r : rows)
    std::printf("| %s | %.0f | %.3g | %.3g | %s | %.2f | %.3f (%.0f) | %.3f (%.0f) |\n", r.name.c_str(), r.bytes_per_token,
                r.max_logit_err, r.max_logprob_err, r.same_argmax ? "yes" : "no", r.file_bytes / 1e6, r.save_s,
                r.file_bytes / 1e6 / r.save_s, r.restore_s, r.file_bytes / 1e6 / r.restore_s);
}

const char* STORY_PROMPT =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. One day, she saw a "
    "big red ball in the park. She ran to the ball and kicked it very hard. The ball went up into the sky and";

}  // namespace

TEST(Snapshot, StorageTypesTinyModels) {
  for (bp::Arch arch : {bp::Arch::LLAMA, bp::Arch::GPT2}) {
    const auto rows = measure_types(tiny(arch), "The quick brown fox jumps over the lazy dog, again and again.",
                                    " And then it slept.");
    ASSERT_EQ(rows.size(), 8u);
    for (const TypeResult& r : rows) {
      if (r.name.rfind("f32", 0) == 0) {
        EXPECT_EQ(r.max_logit_err, 0.0) << r.name << ": f32 must be exact";
        EXPECT_EQ(r.max_logprob_err, 0.0) << r.name;
      } else {
        EXPECT_LT(r.max_logit_err, 0.5) << r.name;
      }
    }
    // zstd changes nothing but the size.
    for (size_t i = 0; i < rows.size(); i += 2) {
      EXPECT_EQ(rows[i].max_logit_err, rows[i + 1].max_logit_err);
      EXPECT_LE(rows[i + 1].bytes_per_token, rows[i].bytes_per_token * 1.01);
    }
  }
}

TEST(Snapshot, StorageTypesStories260K) {
  auto model = stories();
  if (!model) GTEST_SKIP() << "test data stories260k/stories260K.gguf not found (BACKPROMPT_TEST_DATA)";
  const auto rows = measure_types(model, STORY_PROMPT, " came down on the roof.");
  print_table("stories260K", bp::Cache(model).text(STORY_PROMPT).n_tokens(), rows);
  EXPECT_EQ(rows[0].max_logit_err, 0.0);
  EXPECT_EQ(rows[1].max_logit_err, 0.0);
  for (const TypeResult& r : rows) EXPECT_LT(r.max_logit_err, 0.5) << r.name;
}

// Not a unit test: BACKPROMPT_KV_TABLE_MODEL=path/to/model.gguf prints the table for that model
// (the README's figures for llama-110m); BACKPROMPT_KV_TABLE_TOKENS=N makes the prompt about N
// tokens long (the story repeated).
TEST(Snapshot, StorageTypesTableForAModel) {
  const char* path = std::getenv("BACKPROMPT_KV_TABLE_MODEL");
  if (!path) GTEST_SKIP() << "set BACKPROMPT_KV_TABLE_MODEL to print the table for a model";
  auto model = bp::Model::load(path);
  const char* n_env = std::getenv("BACKPROMPT_KV_TABLE_TOKENS");
  const size_t n_want = n_env ? std::strtoul(n_env, nullptr, 10) : 0;
  std::string prompt = STORY_PROMPT;
  bp::Cache probe(model);
  while (probe.text(prompt + " " + STORY_PROMPT).n_tokens() <= n_want) prompt += std::string(" ") + STORY_PROMPT;
  const auto rows = measure_types(model, prompt, " came down on the roof.");
  print_table(path, probe.text(prompt).n_tokens(), rows);
  EXPECT_EQ(rows[0].max_logit_err, 0.0);
}
