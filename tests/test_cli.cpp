// The `backprompt` command: help, exit codes and one-line errors, tokenize == the library,
// make-model determinism, and generate (stories260K greedy against llama2.c's output).
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "backprompt/model.h"
#include "gguf/gguf.h"
#include "model/runtime.h"
#include "stories260k_reference.h"
#include "test_util.h"
#include "tokenizer/load.h"

namespace bp = backprompt;
using bp::testing::CliResult;
using bp::testing::run_cli;
using bp::testing::temp_dir;
using bp::testing::test_data_file;

namespace {

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

std::string join_ids(const std::vector<int32_t>& ids) {
  std::string s;
  for (int32_t id : ids) s += (s.empty() ? "" : " ") + std::to_string(id);
  return s + "\n";
}

size_t count_lines(const std::string& s) {
  size_t n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

}  // namespace

#define REQUIRE_BINARY()                                                                    \
  if (!std::filesystem::exists(bp::testing::cli_binary())) GTEST_SKIP() << bp::testing::cli_binary() << " not built (BACKPROMPT_TOOLS=OFF?)"

TEST(CliHelp, TopLevelAndEverySubcommand) {
  REQUIRE_BINARY();
  for (std::vector<std::string> args : {std::vector<std::string>{}, {"--help"}}) {
    CliResult r = run_cli(args);
    EXPECT_EQ(r.exit_code, 0);
    EXPECT_NE(r.out.find("Usage: backprompt"), std::string::npos) << r.out;
    for (const char* sub : {"generate", "tokenize", "make-model"}) EXPECT_NE(r.out.find(sub), std::string::npos);
    EXPECT_EQ(r.err, "");
  }
  for (const char* sub : {"generate", "tokenize", "make-model"}) {
    CliResult r = run_cli({sub, "--help"});
    EXPECT_EQ(r.exit_code, 0) << sub;
    EXPECT_NE(r.out.find(std::string("Usage: backprompt ") + sub), std::string::npos) << r.out;
    EXPECT_EQ(r.err, "") << sub;
  }
}

TEST(CliErrors, BadArgumentsExit2WithOneLine) {
  REQUIRE_BINARY();
  const std::string m = temp_dir() + "/no-such-model.gguf";
  const std::vector<std::vector<std::string>> cases = {
      {"bogus"},
      {"--bogus"},
      {"generate"},
      {"generate", "-m", m, "--temp", "-1"},
      {"generate", "-m", m, "--temp", "nan"},
      {"generate", "-m", m, "--top-k", "abc"},
      {"generate", "-m", m, "--top-p", "0"},
      {"generate", "-m", m, "-n"},
      {"generate", "-m", m, "extra"},
      {"tokenize", "-m", m},
      {"tokenize", "-m", m, "-p", "a", "-f", "b"},
      {"make-model", "-o", m},
      {"make-model", "--arch", "mamba", "-o", m},
      {"make-model", "--arch", "llama", "--preset", "gpt2-124m", "-o", m},
      {"make-model", "--arch", "gpt2", "--dtype", "q4_0", "-o", m},
      {"bench", "-m", m, "--weights", "mapped"},
      {"bench", "-m", m, "-p", "0", "-n", "0"},
  };
  for (const auto& args : cases) {
    std::string shown;
    for (const auto& a : args) shown += a + " ";
    CliResult r = run_cli(args);
    EXPECT_EQ(r.exit_code, 2) << shown << "\n" << r.err;
    EXPECT_EQ(r.out, "") << shown;
    EXPECT_EQ(r.err.rfind("backprompt: error: ", 0), 0u) << shown << ": " << r.err;
    EXPECT_EQ(count_lines(r.err), 1u) << shown << ": " << r.err;
    EXPECT_EQ(r.err.back(), '\n') << shown;
  }
  EXPECT_FALSE(std::filesystem::exists(m));
}

TEST(CliErrors, RunTimeErrorsExit1WithOneLine) {
  REQUIRE_BINARY();
  const std::string missing = temp_dir() + "/no-such-model.gguf";
  const std::string garbage = temp_dir() + "/garbage.gguf";
  std::ofstream(garbage) << "this is not a gguf file";
  const std::vector<std::vector<std::string>> cases = {
      {"generate", "-m", missing, "-p", "hi"},
      {"generate", "-m", garbage, "-p", "hi"},
      {"tokenize", "-m", missing, "-p", "hi"},
      {"tokenize", "-m", garbage, "-f", missing},
      {"make-model", "--arch", "llama", "--vocab", missing, "-o", temp_dir() + "/never.gguf"},
  };
  for (const auto& args : cases) {
    std::string shown;
    for (const auto& a : args) shown += a + " ";
    CliResult r = run_cli(args);
    EXPECT_EQ(r.exit_code, 1) << shown << "\n" << r.err;
    EXPECT_EQ(r.out, "") << shown;
    EXPECT_EQ(r.err.rfind("backprompt: error: ", 0), 0u) << shown << ": " << r.err;
    EXPECT_EQ(count_lines(r.err), 1u) << shown << ": " << r.err;
  }
}

TEST(CliTokenize, MatchesLibraryEncode) {
  REQUIRE_BINARY();
  std::vector<std::string> models = {bp::testing::generated_model(bp::Arch::LLAMA, bp::DType::F32),
                                     bp::testing::generated_model(bp::Arch::GPT2, bp::DType::F32)};
  for (const char* rel : {"ggml-vocab/ggml-vocab-gpt-2.gguf", "ggml-vocab/ggml-vocab-llama-spm.gguf",
                          "stories260k/stories260K.gguf"}) {
    const std::string p = test_data_file(rel);
    if (!p.empty()) models.push_back(p);
  }
  // Each run loads the vocabulary (GPT-2: 50k merges), so keep the number of runs small.
  const std::vector<std::string> texts = {"Hello world", "", "Once upon a time,\n\nthe end.",
                                          "  caf\xC3\xA9 \xF0\x9F\x98\x80 123456\t"};
  const std::string path = temp_dir() + "/tokenize-input.txt";
  for (const std::string& model : models) {
    auto file = bp::gguf::File::open(model);
    auto tok = bp::load_tokenizer(*file);
    for (size_t i = 0; i < texts.size(); i++) {
      const std::string& text = texts[i];
      const bool bos = i % 2 == 1;
      std::vector<std::string> args = {"tokenize", "-m", model, "-p", text};
      if (bos) args.push_back("--bos");
      CliResult r = run_cli(args);
      ASSERT_EQ(r.exit_code, 0) << r.err;
      EXPECT_EQ(r.out, join_ids(tok->encode(text, {.add_bos = bos}))) << model << ": '" << text << "'";
    }
    // -f reads the file's bytes as they are.
    std::ofstream(path, std::ios::binary) << texts.back();
    CliResult r = run_cli({"tokenize", "-m", model, "-f", path, "--bos"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.out, join_ids(tok->encode(texts.back(), {.add_bos = true}))) << model;
  }
}

TEST(CliMakeModel, DeterministicAndLoads) {
  REQUIRE_BINARY();
  for (const char* arch : {"gpt2", "llama"}) {
    const std::string a = temp_dir() + "/cli-mm-" + arch + "-a.gguf";
    const std::string b = temp_dir() + "/cli-mm-" + arch + "-b.gguf";
    CliResult ra = run_cli({"make-model", "--arch", arch, "--preset", "tiny", "--dtype", "q8_0", "--seed", "3", "-o", a});
    CliResult rb = run_cli({"make-model", "--arch", arch, "--preset", "tiny", "--dtype", "q8_0", "--seed", "3", "-o", b});
    ASSERT_EQ(ra.exit_code, 0) << ra.err;
    ASSERT_EQ(rb.exit_code, 0) << rb.err;
    EXPECT_EQ(ra.out, "");
    EXPECT_EQ(count_lines(ra.err), 1u) << ra.err;  // the summary
    const std::string bytes = read_bytes(a);
    EXPECT_GT(bytes.size(), 10000u);
    EXPECT_TRUE(bytes == read_bytes(b)) << arch << ": two runs differ";

    auto model = bp::Model::load(a);
    EXPECT_EQ(model->config().n_layer, 2);
    EXPECT_EQ(model->config().n_embd, 64);
    EXPECT_EQ(model->weight_type_name(), "q8_0");
  }
}

TEST(CliBench, PrintsRatesAndWhereTheWeightsLive) {
  REQUIRE_BINARY();
  const std::string model = bp::testing::generated_model(bp::Arch::LLAMA, bp::DType::F16);
  for (const char* weights : {"mmap", "memory"}) {
    CliResult r = run_cli({"bench", "-m", model, "-p", "8", "-n", "4", "-r", "2", "-t", "1", "--weights", weights});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find("\npp8: "), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("\ntg4: "), std::string::npos) << r.out;
    EXPECT_NE(r.out.find(" tok/s\n"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("peak RSS: "), std::string::npos) << r.out;
    const bool memory = std::string(weights) == "memory";
    EXPECT_NE(r.out.find(memory ? "weights: in memory" : "weights: mapped from the file"), std::string::npos) << r.out;
  }
}

TEST(CliGenerate, PrintsThePromptThenTheGreedyContinuation) {
  REQUIRE_BINARY();
  for (bp::Arch arch : {bp::Arch::GPT2, bp::Arch::LLAMA}) {
    const std::string path = bp::testing::generated_model(arch, bp::DType::F32);
    const std::string prompt = "Hello, world";
    CliResult r = run_cli({"generate", "-m", path, "-p", prompt, "-n", "12", "--temp", "0"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.err, "");

    // The same with the library.
    auto model = bp::Model::load(path);
    const bp::Tokenizer& tok = model->tokenizer();
    bp::Sequence seq(*model);
    std::vector<float> logits = seq.append(tok.encode(prompt, {.add_bos = tok.add_bos()}));
    std::string expected = prompt;
    for (int i = 0; i < 12; i++) {
      const int32_t next = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
      if (next == tok.eos()) break;
      expected += tok.token_to_piece(next);
      logits = seq.append(std::span<const int32_t>(&next, 1));
    }
    EXPECT_EQ(r.out, expected) << bp::arch_name(arch);
    EXPECT_GT(r.out.size(), prompt.size());
  }
}

TEST(CliGenerate, SeededSamplingIsReproducibleAndZeroTokensPrintsThePrompt) {
  REQUIRE_BINARY();
  const std::string path = bp::testing::generated_model(bp::Arch::LLAMA, bp::DType::F32);
  auto gen = [&](const std::string& seed) {
    return run_cli({"generate", "-m", path, "-p", "abc", "-n", "16", "--temp", "1", "--top-k", "40", "--top-p",
                    "0.9", "--seed", seed});
  };
  CliResult a = gen("7"), b = gen("7"), c = gen("8");
  ASSERT_EQ(a.exit_code, 0) << a.err;
  EXPECT_EQ(a.out, b.out);
  EXPECT_NE(a.out, c.out);
  EXPECT_EQ(a.out.rfind("abc", 0), 0u);

  CliResult z = run_cli({"generate", "-m", path, "-p", "only the prompt", "-n", "0"});
  ASSERT_EQ(z.exit_code, 0) << z.err;
  EXPECT_EQ(z.out, "only the prompt");
}

TEST(CliGenerate, Stories260KMatchesLlama2c) {
  REQUIRE_BINARY();
  const std::string path = test_data_file("stories260k/stories260K.gguf");
  if (path.empty()) GTEST_SKIP() << "test data stories260k/stories260K.gguf not found (BACKPROMPT_TEST_DATA)";
  // llama2.c's -n counts positions from BOS: 200 sampled tokens after an empty prompt.
  CliResult greedy = run_cli({"generate", "-m", path, "-p", "", "-n", "200", "--temp", "0"});
  ASSERT_EQ(greedy.exit_code, 0) << greedy.err;
  EXPECT_EQ(greedy.out, bp::testing::TEXT_GREEDY);
  EXPECT_EQ(greedy.err, "");
  // "There was a big" is BOS + 5 tokens, so llama2.c samples 200 - 6 + 1 = 195.
  CliResult sampled = run_cli({"generate", "-m", path, "-p", "There was a big", "-n", "195", "--temp", "1",
                               "--top-p", "0.95", "--seed", "42", "-t", "1"});
  ASSERT_EQ(sampled.exit_code, 0) << sampled.err;
  EXPECT_EQ(sampled.out, bp::testing::TEXT_PROMPT_T1_P095_S42);
}
