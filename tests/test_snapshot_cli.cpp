// Snapshots from the command line: generate --cache-prompt then --restore-prompt equals one run
// (greedy and sampled, the sampler's stream kept), inspect, errors.
#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "backprompt/backprompt.h"
#include "model/runtime.h"
#include "test_util.h"

namespace bp = backprompt;
using bp::testing::CliResult;
using bp::testing::generated_model;
using bp::testing::read_file;
using bp::testing::run_cli;
using bp::testing::write_file;

namespace {

std::string fresh_path(const std::string& stem) { return bp::testing::fresh_temp_path(stem, ".bps"); }

std::vector<std::string> concat(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// --cache-prompt PROMPT then --restore-prompt -p MORE prints MORE + the same text as one run of
// PROMPT + MORE (MORE starts with a space or is empty, so the seam tokenizes the same).
void check_cli_resume(const std::string& model, const std::string& prompt, const std::string& more,
                      const std::vector<std::string>& sampling, const std::vector<std::string>& restore_sampling = {}) {
  SCOPED_TRACE(model + " prompt '" + prompt + "' more '" + more + "'");
  const std::string file = fresh_path("cli");
  CliResult c = run_cli(concat({"generate", "-m", model, "-p", prompt, "--cache-prompt", file}, sampling));
  ASSERT_EQ(c.exit_code, 0) << c.err;
  EXPECT_EQ(c.out, prompt);
  ASSERT_TRUE(std::filesystem::exists(file));

  CliResult r = run_cli(concat({"generate", "-m", model, "--restore-prompt", file, "-p", more, "-n", "24"}, restore_sampling));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::vector<std::string> whole_sampling = restore_sampling.empty() ? sampling : restore_sampling;
  CliResult u = run_cli(concat({"generate", "-m", model, "-p", prompt + more, "-n", "24"}, whole_sampling));
  ASSERT_EQ(u.exit_code, 0) << u.err;
  ASSERT_EQ(u.out.rfind(prompt + more, 0), 0u);
  EXPECT_EQ(r.out, u.out.substr(prompt.size())) << "restored: '" << r.out << "'\nwhole: '" << u.out << "'";
  EXPECT_GT(r.out.size(), more.size());
}

}  // namespace

#define REQUIRE_BINARY() \
  if (!std::filesystem::exists(bp::testing::cli_binary())) GTEST_SKIP() << bp::testing::cli_binary() << " not built (BACKPROMPT_TOOLS=OFF?)"

TEST(SnapshotCli, CachePromptThenRestoreEqualsOneRun) {
  REQUIRE_BINARY();
  const std::vector<std::string> sampled_args = {"--temp", "1", "--top-p", "0.9", "--seed", "5"};
  for (bp::Arch arch : {bp::Arch::LLAMA, bp::Arch::GPT2}) {
    const std::string m = generated_model(arch, bp::DType::F32);
    check_cli_resume(m, "Hello there", " General Kenobi", sampled_args);
    check_cli_resume(m, "Hello there", "", sampled_args);
    check_cli_resume(m, "Hello there", " General", {"--temp", "0"});
    // The snapshot's settings are used unless given: here only --seed, which restarts the stream.
    check_cli_resume(m, "Hello there", " you", sampled_args, {"--temp", "1", "--top-p", "0.9", "--seed", "6"});
  }
  const std::string stories_path = bp::testing::test_data_file("stories260k/stories260K.gguf");
  if (!stories_path.empty()) {
    check_cli_resume(stories_path, "Once upon a time, there was a", " little girl", sampled_args);
    check_cli_resume(stories_path, "Once upon a time", "", {"--temp", "0"});
  }
}

TEST(SnapshotCli, RestoreKeepsTheSamplerStream) {
  // Restoring with no sampler options reproduces the saved settings and seed.
  REQUIRE_BINARY();
  const std::string m = generated_model(bp::Arch::LLAMA, bp::DType::F32);
  const std::string file = fresh_path("cli-stream");
  const std::vector<std::string> args = {"--temp", "1", "--top-k", "20", "--top-p", "0.8", "--seed", "99"};
  ASSERT_EQ(run_cli(concat({"generate", "-m", m, "-p", "abc", "--cache-prompt", file}, args)).exit_code, 0);
  CliResult r = run_cli({"generate", "-m", m, "--restore-prompt", file, "-n", "20"});
  CliResult u = run_cli(concat({"generate", "-m", m, "-p", "abc", "-n", "20"}, args));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ("abc" + r.out, u.out);
}

TEST(SnapshotCli, InspectPrintsTheHeader) {
  REQUIRE_BINARY();
  const std::string m = generated_model(bp::Arch::LLAMA, bp::DType::F32);
  auto model = bp::Model::load(m);
  const std::string file = fresh_path("cli-inspect");
  CliResult c = run_cli({"generate", "-m", m, "-p", "inspect me", "--cache-prompt", file, "--kv-type", "q8_0", "--zstd",
                         "--temp", "0.5", "--seed", "77"});
  ASSERT_EQ(c.exit_code, 0) << c.err;
  CliResult r = run_cli({"inspect", file});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  char fp[32];
  std::snprintf(fp, sizeof fp, "%016llx", static_cast<unsigned long long>(model->fingerprint()));
  EXPECT_NE(r.out.find(std::string("model fingerprint: ") + fp), std::string::npos) << r.out;
  std::snprintf(fp, sizeof fp, "%016llx", static_cast<unsigned long long>(model->tokenizer_fingerprint()));
  EXPECT_NE(r.out.find(std::string("tokenizer fingerprint: ") + fp), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("format: backprompt snapshot, version 1 ("), std::string::npos) << r.out;
  bp::Cache cache(model);
  EXPECT_NE(r.out.find("tokens: " + std::to_string(cache.text("inspect me").n_tokens()) + "\n"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("K/V: q8_0 + zstd"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("temperature 0.5"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("seed 77"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("values of layer 1"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"inspect me\""), std::string::npos) << r.out;

  // A damaged file: exit 1, one line naming the section.
  std::vector<uint8_t> bytes = read_file(file);
  bytes[bytes.size() - 2] ^= 1;  // inside the text
  const std::string bad = fresh_path("cli-bad");
  write_file(bad, bytes);
  CliResult b = run_cli({"inspect", bad});
  EXPECT_EQ(b.exit_code, 1);
  EXPECT_NE(b.err.find("backprompt: error:"), std::string::npos) << b.err;
  EXPECT_NE(b.err.find("text: checksum mismatch"), std::string::npos) << b.err;
  CliResult g = run_cli({"generate", "-m", m, "--restore-prompt", bad});
  EXPECT_EQ(g.exit_code, 1);
  EXPECT_NE(g.err.find("text: checksum mismatch"), std::string::npos) << g.err;
  // Not a snapshot at all.
  CliResult n = run_cli({"inspect", m});
  EXPECT_EQ(n.exit_code, 1);
  EXPECT_NE(n.err.find("unknown magic"), std::string::npos) << n.err;
}

TEST(SnapshotCli, Errors) {
  REQUIRE_BINARY();
  const std::string m = generated_model(bp::Arch::LLAMA, bp::DType::F32);
  const std::string other = generated_model(bp::Arch::LLAMA, bp::DType::F32, "tiny", 2);
  const std::string file = fresh_path("cli-err");
  ASSERT_EQ(run_cli({"generate", "-m", m, "-p", "x", "--cache-prompt", file}).exit_code, 0);
  CliResult r = run_cli({"generate", "-m", other, "--restore-prompt", file});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("another model"), std::string::npos) << r.err;
  EXPECT_EQ(r.out, "");
  r = run_cli({"generate", "-m", m, "--restore-prompt", fresh_path("missing")});
  EXPECT_EQ(r.exit_code, 1);
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"generate", "-m", m, "--cache-prompt", file, "--restore-prompt", file},
           {"generate", "-m", m, "--cache-prompt", file, "--kv-type", "q4"},
           {"generate", "-m", m, "--kv-type", "f16"},
           {"inspect"},
       }) {
    r = run_cli(args);
    EXPECT_EQ(r.exit_code, 2) << args.size() << " " << r.err;
  }
}

TEST(SnapshotCli, GenerateRunsToTheEndOfTheContext) {
  // generate on the cache keeps the old loop's behaviour at the end of the context: the last token
  // is sampled from the logits after the full context.
  REQUIRE_BINARY();
  const std::string m = generated_model(bp::Arch::GPT2, bp::DType::F32);
  auto model = bp::Model::load(m);
  const bp::Tokenizer& tok = model->tokenizer();
  std::string prompt;
  while (tok.encode(prompt).size() < static_cast<size_t>(model->config().n_ctx - 5)) prompt += "ab ";
  CliResult r = run_cli({"generate", "-m", m, "-p", prompt, "-n", "50", "--temp", "0"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  bp::Sequence seq(*model);
  std::vector<float> logits = seq.append(tok.encode(prompt));
  std::string expected = prompt;
  for (int i = 0; i < 50; ++i) {
    const int32_t next = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    if (next == tok.eos()) break;
    expected += tok.token_to_piece(next);
    if (seq.n_tokens() >= model->config().n_ctx) break;
    logits = seq.append(std::span<const int32_t>(&next, 1));
  }
  EXPECT_EQ(r.out, expected);
}
