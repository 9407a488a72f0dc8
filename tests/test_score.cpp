// `backprompt score` and `backprompt graph` against scores computed text by text without the cache.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "backprompt/model.h"
#include "model/runtime.h"
#include "test_util.h"

namespace bp = backprompt;

namespace {

std::string write_file(const std::string& name, const std::string& content) {
  const std::string path = bp::testing::temp_dir() + "/" + name;
  std::ofstream(path, std::ios::binary) << content;
  return path;
}

// Sum of log p(token_i | before) over the completion's tokens, from one uncached pass.
double uncached_sum(const bp::Model& m, const std::vector<int32_t>& prompt, const std::vector<int32_t>& completion) {
  std::vector<int32_t> all = prompt;
  all.insert(all.end(), completion.begin(), completion.end());
  bp::Sequence seq(m);
  const std::vector<float> logits = seq.append(all, bp::LogitsMode::ALL);
  const int64_t V = m.config().n_vocab;
  double sum = 0.0;
  for (size_t i = prompt.size(); i < all.size(); ++i) {
    const float* row = logits.data() + (i - 1) * V;
    double mx = -INFINITY, z = 0.0;
    for (int64_t j = 0; j < V; ++j) mx = std::max(mx, static_cast<double>(row[j]));
    for (int64_t j = 0; j < V; ++j) z += std::exp(row[j] - mx);
    sum += row[all[i]] - mx - std::log(z);
  }
  return sum;
}

void check_scores(const std::string& model_path, const std::string& prompt, const std::vector<std::string>& choices,
                  const std::vector<std::string>& endings) {
  std::string cf, ef;
  for (const auto& c : choices) cf += c + "\n";
  for (const auto& e : endings) ef += e + "\n";
  const std::string args = "score -m '" + model_path + "' --prompt '" + prompt + "' --choices '" + write_file("choices.txt", cf) +
                           "'" + (endings.empty() ? "" : " --endings '" + write_file("endings.txt", ef) + "'") + " --json";
  const bp::testing::CliResult r = bp::testing::run_cli_line(args);
  ASSERT_EQ(r.exit_code, 0) << r.out;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  const auto model = bp::Model::load(model_path);
  const bp::Tokenizer& tok = model->tokenizer();
  bp::EncodeOptions first;
  first.add_bos = tok.add_bos();
  const std::vector<int32_t> p = tok.encode(prompt, first);
  bp::EncodeOptions rest;
  rest.add_space_prefix = false;

  std::vector<std::string> labels;
  std::vector<std::vector<int32_t>> completions;
  for (const auto& c : choices) {
    if (endings.empty()) {
      labels.push_back(c);
      completions.push_back(tok.encode(c, rest));
    }
    for (const auto& e : endings) {
      labels.push_back(c + e);
      std::vector<int32_t> t = tok.encode(c, rest);
      const std::vector<int32_t> te = tok.encode(e, rest);
      t.insert(t.end(), te.begin(), te.end());
      completions.push_back(t);
    }
  }
  ASSERT_EQ(j["completions"].size(), labels.size());
  std::vector<double> sums;
  double total_prob = 0.0;
  for (size_t i = 0; i < labels.size(); ++i) {
    const auto& c = j["completions"][i];
    EXPECT_EQ(c["text"], labels[i]);
    EXPECT_EQ(c["n_tokens"], completions[i].size());
    const double ref = uncached_sum(*model, p, completions[i]);
    EXPECT_NEAR(c["sum_logprob"].get<double>(), ref, 1e-3 * std::max(1.0, std::abs(ref))) << labels[i];
    EXPECT_NEAR(c["mean_logprob"].get<double>(), ref / completions[i].size(), 1e-3) << labels[i];
    sums.push_back(ref);
    total_prob += c["prob"].get<double>();
  }
  EXPECT_NEAR(total_prob, 1.0, 1e-9);
  // The prompt is computed once: every token computed belongs to the prompt or one completion.
  size_t unique = p.size();
  for (const auto& t : completions) unique += t.size();
  EXPECT_LE(j["stats"]["tokens_computed"].get<size_t>(), unique);
  EXPECT_GE(j["stats"]["tokens_reused"].get<size_t>(), p.size() * (labels.size() > 0 ? 1 : 0));
}

TEST(Score, TinyLlamaMatchesTextByTextUncached) {
  check_scores(bp::testing::generated_model(bp::Arch::LLAMA, bp::DType::F32), "abc def", {" x", " yz", "q"}, {"!", " ok"});
}

TEST(Score, TinyGpt2MatchesTextByTextUncached) {
  check_scores(bp::testing::generated_model(bp::Arch::GPT2, bp::DType::F32), "hello there", {" a", " bcd"}, {});
}

TEST(Score, Stories260KMatchesTextByTextUncached) {
  const std::string m = bp::testing::test_data_file("stories260k/stories260K.gguf");
  if (m.empty()) GTEST_SKIP() << "test data absent (BACKPROMPT_TEST_DATA)";
  check_scores(m, "Once upon a time, there was a little", {" girl", " dog", " big red ball"}, {" named Lily.", "."});
}

TEST(Score, TableOutputAndErrors) {
  const std::string m = bp::testing::generated_model(bp::Arch::LLAMA, bp::DType::F32);
  const std::string cf = write_file("c2.txt", " a\n b\n");
  const bp::testing::CliResult table = bp::testing::run_cli_line("score -m '" + m + "' --prompt hi --choices '" + cf + "'");
  EXPECT_EQ(table.exit_code, 0);
  EXPECT_NE(table.out.find("sum_logprob"), std::string::npos) << table.out;
  EXPECT_NE(table.out.find("\" a\""), std::string::npos) << table.out;
  EXPECT_EQ(bp::testing::run_cli_line("score -m '" + m + "' --prompt hi").exit_code, 2);                                  // no --choices
  EXPECT_EQ(bp::testing::run_cli_line("score -m '" + m + "' --prompt hi --choices /nonexistent/file").exit_code, 1);      // unreadable
  EXPECT_EQ(bp::testing::run_cli_line("score -m '" + m + "' --prompt hi --choices '" + write_file("empty.txt", "") + "'").exit_code, 2);
}

TEST(Graph, DotShowsSegmentsAndNodes) {
  const std::string m = bp::testing::generated_model(bp::Arch::LLAMA, bp::DType::F32);
  const std::string cf = write_file("c3.txt", " a\n b\n");
  const bp::testing::CliResult r = bp::testing::run_cli_line("graph -m '" + m + "' --prompt 'shared prefix' --choices '" + cf + "'");
  ASSERT_EQ(r.exit_code, 0);
  EXPECT_EQ(r.out.rfind("digraph backprompt {", 0), 0u) << r.out;
  EXPECT_NE(r.out.find("shared prefix"), std::string::npos);
  EXPECT_NE(r.out.find("lightblue"), std::string::npos);   // computed nodes
  EXPECT_EQ(r.out.find("not in cache"), std::string::npos);
  const bp::testing::CliResult lazy = bp::testing::run_cli_line("graph --no-eval -m '" + m + "' --prompt 'shared prefix' --choices '" + cf + "'");
  EXPECT_NE(lazy.out.find("not in cache"), std::string::npos);
}

}  // namespace
