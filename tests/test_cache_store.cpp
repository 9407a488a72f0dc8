// The cache with a persistent store: what one cache (or process) computed, another loads instead
// of computing, and every output still equals an uncached pass.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "backprompt/cache.h"
#include "model/runtime.h"
#include "redis_server.h"
#include "test_util.h"

namespace bp = backprompt;
namespace fs = std::filesystem;

namespace {

std::string fresh_store_dir(const std::string& name) {
  const std::string d = bp::testing::temp_dir() + "/" + name;
  fs::remove_all(d);
  return d;
}

// Uncached reference: all-position logits of one pass.
std::vector<float> full_logits(const bp::Model& m, const std::vector<int32_t>& t) {
  bp::Sequence s(m);
  return s.append(t, bp::LogitsMode::ALL);
}

void expect_exact(const bp::Model& m, const bp::Text& t) {
  const std::vector<int32_t> tokens = t.tokens();
  const std::vector<float> ref = full_logits(m, tokens);
  const int64_t V = m.config().n_vocab;
  const std::vector<float> next = t.next_logits();
  const auto c = bp::testing::compare_logits(next.data(), ref.data() + (tokens.size() - 1) * V, V);
  EXPECT_TRUE(c.within_tolerance()) << t.string() << ": " << c.max_abs_diff;
  EXPECT_TRUE(c.same_argmax) << t.string();
  const std::vector<float> lp = t.logprobs();
  ASSERT_EQ(lp.size(), tokens.size() - 1);
  for (size_t i = 1; i < tokens.size(); ++i) {
    const float* row = ref.data() + (i - 1) * V;
    double mx = -INFINITY, z = 0;
    for (int64_t j = 0; j < V; ++j) mx = std::max(mx, static_cast<double>(row[j]));
    for (int64_t j = 0; j < V; ++j) z += std::exp(row[j] - mx);
    const double want = row[tokens[i]] - mx - std::log(z);
    EXPECT_NEAR(lp[i - 1], want, 1e-4 * std::max(1.0, c.max_abs_ref)) << t.string() << " token " << i;
  }
}

std::vector<std::string> random_pieces(uint32_t seed, size_t n) {
  static const char* words[] = {" the", " cat", " sat", " on", " a", " mat", "\n", " and", " then", " it", " ran", ".", " Lily"};
  std::mt19937 rng(seed);
  std::vector<std::string> out;
  for (size_t i = 0; i < n; ++i) {
    std::string s;
    const int len = 1 + static_cast<int>(rng() % 6);
    for (int j = 0; j < len; ++j) s += words[rng() % std::size(words)];
    out.push_back(s);
  }
  return out;
}

class CacheStore : public ::testing::TestWithParam<bp::Arch> {};

TEST_P(CacheStore, SecondCacheLoadsWhatTheFirstComputedAndStaysExact) {
  const auto model = bp::Model::load(bp::testing::generated_model(GetParam(), bp::DType::F32));
  bp::CacheOptions opt;
  opt.store = "dir:" + fresh_store_dir(std::string("store-") + bp::arch_name(GetParam()));
  opt.store_block_size = 4;  // small blocks: paths span several whole blocks and a partial one
  const std::vector<std::string> ctx = random_pieces(1, 3), tails = random_pieces(2, 6);
  auto build = [&](bp::Cache& cache) {
    std::vector<bp::Text> texts;
    const bp::Text context = cache.text(ctx[0]) + ctx[1] + ctx[2];
    for (const std::string& t : tails) texts.push_back(context + t);
    return texts;
  };
  uint64_t first_computed = 0;
  {
    bp::Cache a(model, opt);
    std::vector<bp::Text> texts = build(a);
    a.eval(texts, {.logprobs = true});
    first_computed = a.stats().tokens_computed;
    EXPECT_EQ(a.stats().tokens_loaded, 0u);
  }  // destruction flushes the store writer
  bp::Cache b(model, opt);
  std::vector<bp::Text> texts = build(b);
  b.eval(texts, {.logprobs = true});
  EXPECT_EQ(b.stats().tokens_computed, 0u);
  EXPECT_EQ(b.stats().tokens_loaded, first_computed);
  for (const bp::Text& t : texts) expect_exact(*model, t);

  // A new text sharing the context: only its own tokens are computed.
  bp::Cache c(model, opt);
  const bp::Text extra = build(c)[0] + " and a new ending";
  const size_t n_new = extra.tokens().size() - build(c)[0].tokens().size();
  extra.next_logits();
  // Whole blocks are shared; the partial block where the new text leaves the stored path (fewer
  // than store_block_size tokens) is recomputed, as its exact-path entry names another path.
  EXPECT_GE(c.stats().tokens_computed, n_new);
  EXPECT_LT(c.stats().tokens_computed, n_new + static_cast<size_t>(opt.store_block_size));
  EXPECT_GT(c.stats().tokens_loaded, 0u);
  expect_exact(*model, extra);
}

INSTANTIATE_TEST_SUITE_P(Archs, CacheStore, ::testing::Values(bp::Arch::GPT2, bp::Arch::LLAMA),
                         [](const auto& info) { return std::string(bp::arch_name(info.param)); });

TEST(CacheStoreMisc, AnotherModelNeverUsesTheBlocks) {
  const std::string dir = fresh_store_dir("store-other");
  bp::CacheOptions opt;
  opt.store = "dir:" + dir;
  {
    bp::Cache a(bp::Model::load(bp::testing::generated_model(bp::Arch::LLAMA, bp::DType::F32, "tiny", 1)), opt);
    a.text("some shared words here").next_logits();
  }
  const auto other = bp::Model::load(bp::testing::generated_model(bp::Arch::LLAMA, bp::DType::F32, "tiny", 2));
  bp::Cache b(other, opt);
  const bp::Text t = b.text("some shared words here");
  t.next_logits();
  EXPECT_EQ(b.stats().tokens_loaded, 0u);
  expect_exact(*other, t);
}

TEST(CacheStoreMisc, CorruptBlocksAreMissesAndResultsStayExact) {
  const std::string dir = fresh_store_dir("store-corrupt");
  const auto model = bp::Model::load(bp::testing::generated_model(bp::Arch::LLAMA, bp::DType::F32));
  bp::CacheOptions opt;
  opt.store = "dir:" + dir;
  opt.store_block_size = 4;
  const std::string s = "a text long enough for a few blocks of four tokens";
  {
    bp::Cache a(model, opt);
    a.text(s).next_logits();
  }
  // Flip a byte in the middle of every stored file.
  size_t n_files = 0;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    std::fstream f(e.path(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(0, std::ios::end);
    const auto size = static_cast<std::streamoff>(f.tellg());
    f.seekp(size / 2);
    char ch = 0;
    f.seekg(size / 2);
    f.read(&ch, 1);
    ch = static_cast<char>(ch ^ 0x5a);
    f.seekp(size / 2);
    f.write(&ch, 1);
    ++n_files;
  }
  ASSERT_GT(n_files, 0u);
  bp::Cache b(model, opt);
  const bp::Text t = b.text(s);
  expect_exact(*model, t);
  EXPECT_EQ(b.stats().tokens_loaded, 0u);
  EXPECT_EQ(b.stats().tokens_computed, t.tokens().size());
}

TEST(CacheStoreMisc, UnreachableRedisIsAMissNotAnError) {
  const auto model = bp::Model::load(bp::testing::generated_model(bp::Arch::GPT2, bp::DType::F32));
  bp::CacheOptions opt;
  opt.store = "redis://127.0.0.1:1/0";  // nothing listens on port 1
  bp::Cache c(model, opt);
  const bp::Text t = c.text("hello") + " world";
  expect_exact(*model, t);
  EXPECT_EQ(c.stats().tokens_loaded, 0u);
}

// Two processes: `backprompt score` twice against one dir: store.
TEST(CacheStoreMisc, SecondProcessComputesOnlyWhatTheFirstDidNotStore) {
  const std::string m = bp::testing::generated_model(bp::Arch::LLAMA, bp::DType::F32);
  const std::string dir = fresh_store_dir("store-cli");
  const std::string c1 = bp::testing::temp_dir() + "/store-choices1.txt", c2 = bp::testing::temp_dir() + "/store-choices2.txt";
  std::ofstream(c1) << " one\n two\n three\n";
  std::ofstream(c2) << " two\n four\n";
  const std::string common = "score -m '" + m + "' --prompt 'a shared prompt that is computed once' --json --store dir:" + dir;
  const bp::testing::CliResult first = bp::testing::run_cli_line(common + " --choices " + c1);
  ASSERT_EQ(first.exit_code, 0);
  const bp::testing::CliResult again = bp::testing::run_cli_line(common + " --choices " + c1);
  ASSERT_EQ(again.exit_code, 0);
  const auto j1 = nlohmann::json::parse(first.out), j2 = nlohmann::json::parse(again.out);
  EXPECT_EQ(j2["stats"]["tokens_computed"], 0);
  EXPECT_EQ(j2["stats"]["tokens_loaded"], j1["stats"]["tokens_computed"]);
  for (size_t i = 0; i < j1["completions"].size(); ++i)
    EXPECT_NEAR(j1["completions"][i]["sum_logprob"].get<double>(), j2["completions"][i]["sum_logprob"].get<double>(), 1e-4);
  // Another workload with the same prompt: the prompt and " two" are loaded, " four" is computed.
  const bp::testing::CliResult third = bp::testing::run_cli_line(common + " --choices " + c2);
  ASSERT_EQ(third.exit_code, 0);
  const auto j3 = nlohmann::json::parse(third.out);
  const bp::testing::CliResult uncached = bp::testing::run_cli_line("score -m '" + m + "' --prompt 'a shared prompt that is computed once' --json --choices " + c2);
  const auto ju = nlohmann::json::parse(uncached.out);
  EXPECT_GT(j3["stats"]["tokens_loaded"].get<int>(), 0);
  EXPECT_LT(j3["stats"]["tokens_computed"].get<int>(), ju["stats"]["tokens_computed"].get<int>());
  for (size_t i = 0; i < ju["completions"].size(); ++i)
    EXPECT_NEAR(j3["completions"][i]["sum_logprob"].get<double>(), ju["completions"][i]["sum_logprob"].get<double>(), 1e-4);

  // `inspect` reads the store's files too.
  std::string block_file;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file()) block_file = e.path().string();
  ASSERT_FALSE(block_file.empty());
  const bp::testing::CliResult inspect = bp::testing::run_cli_line("inspect '" + block_file + "'");
  EXPECT_EQ(inspect.exit_code, 0);
  EXPECT_NE(inspect.out.find("backprompt K/V block"), std::string::npos) << inspect.out;
  EXPECT_NE(inspect.out.find("checksum ok"), std::string::npos) << inspect.out;
}

}  // namespace

namespace {

TEST(CacheStoreMisc, SecondProcessLoadsFromRedis) {
  if (bp::testing::find_redis_server().empty()) GTEST_SKIP() << "redis-server is not installed (apt install redis-server)";
  bp::testing::RedisServer redis(fresh_store_dir("redis-cli"));
  ASSERT_TRUE(redis.running()) << "could not start redis-server";
  const std::string m = bp::testing::generated_model(bp::Arch::GPT2, bp::DType::F32);
  const std::string c1 = bp::testing::temp_dir() + "/redis-choices.txt";
  std::ofstream(c1) << " one\n two\n three\n";
  const std::string args = "score -m '" + m + "' --prompt 'a prompt shared through redis' --json --choices " + c1 + " --store " + redis.uri(3);
  const bp::testing::CliResult first = bp::testing::run_cli_line(args), second = bp::testing::run_cli_line(args);
  ASSERT_EQ(first.exit_code, 0);
  ASSERT_EQ(second.exit_code, 0);
  const auto j1 = nlohmann::json::parse(first.out), j2 = nlohmann::json::parse(second.out);
  EXPECT_GT(j1["stats"]["tokens_computed"].get<int>(), 0);
  EXPECT_EQ(j2["stats"]["tokens_computed"], 0);
  EXPECT_EQ(j2["stats"]["tokens_loaded"], j1["stats"]["tokens_computed"]);
  const bp::testing::CliResult uncached = bp::testing::run_cli_line("score -m '" + m + "' --prompt 'a prompt shared through redis' --json --choices " + c1);
  const auto ju = nlohmann::json::parse(uncached.out);
  for (size_t i = 0; i < ju["completions"].size(); ++i)
    EXPECT_NEAR(j2["completions"][i]["sum_logprob"].get<double>(), ju["completions"][i]["sum_logprob"].get<double>(), 1e-4);
}

}  // namespace
