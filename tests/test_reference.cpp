// The C++ runtime against the independent NumPy reference (tests/reference/reference.py).
//
// For every architecture and weight type, a tiny random model is written with make_model, the
// logits of every position of ~20 tokens are computed by Sequence::append(ALL) and by the
// reference (float64), and must agree: max |diff| <= 1e-4 * max(1, max |logit|), same argmax.
// The same check runs on the real trained stories260K model when the test data is present.
// Skips (with a message) when /usr/bin/python3 or NumPy is missing.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "backprompt/model.h"
#include "model/make_model.h"
#include "model/runtime.h"
#include "tensor/dtype.h"

namespace bp = backprompt;
namespace fs = std::filesystem;

namespace {

constexpr const char* PYTHON = "/usr/bin/python3";
constexpr int N_TOKENS = 20;
constexpr double REL_TOL = 1e-4;

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') out += "'\\''";
    else out += c;
  }
  return out + "'";
}

// Exit status of a shell command, or -1 if it did not exit normally.
int run_shell(const std::string& cmd) {
  int status = std::system(cmd.c_str());
  if (status == -1 || !WIFEXITED(status)) return -1;
  return WEXITSTATUS(status);
}

// Empty if the reference can run here, otherwise why not.
const std::string& python_missing_reason() {
  static const std::string reason = [] () -> std::string {
    if (access(PYTHON, X_OK) != 0) return std::string(PYTHON) + " not found";
    if (run_shell(std::string(PYTHON) + " -c 'import numpy' >/dev/null 2>&1") != 0)
      return std::string(PYTHON) + " has no numpy";
    return "";
  }();
  return reason;
}

fs::path test_data_dir() {
  if (const char* env = std::getenv("BACKPROMPT_TEST_DATA"); env && *env) return env;
  return fs::path(BACKPROMPT_SOURCE_DIR) / ".." / "shared" / "models";
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A fresh directory under the system temp dir, removed with the object.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "bp_reference_XXXXXX").string();
    if (mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed: " + tmpl);
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// Runs the reference on `tokens`; fills `logits` ([n_tokens][n_vocab]) or returns an error text.
std::string run_reference(const fs::path& model_path, const std::vector<int32_t>& tokens,
                          const fs::path& work_dir, int32_t n_vocab, std::vector<float>& logits) {
  fs::path script = fs::path(BACKPROMPT_SOURCE_DIR) / "tests" / "reference" / "reference.py";
  fs::path out = work_dir / "reference_logits.f32";
  fs::path err = work_dir / "reference_stderr.txt";
  std::string ids;
  for (size_t i = 0; i < tokens.size(); ++i) ids += (i ? "," : "") + std::to_string(tokens[i]);
  std::string cmd = std::string(PYTHON) + " " + shell_quote(script.string()) + " " +
                    shell_quote(model_path.string()) + " --tokens " + ids + " --out " +
                    shell_quote(out.string()) + " 2>" + shell_quote(err.string());
  int rc = run_shell(cmd);
  if (rc != 0) return "reference.py exited with " + std::to_string(rc) + ":\n" + read_file(err);

  std::string bytes = read_file(out);
  size_t want = tokens.size() * static_cast<size_t>(n_vocab) * sizeof(float);
  if (bytes.size() != want)
    return "reference output has " + std::to_string(bytes.size()) + " bytes, want " + std::to_string(want);
  logits.resize(tokens.size() * static_cast<size_t>(n_vocab));  // [n_tokens][n_vocab]
  std::memcpy(logits.data(), bytes.data(), want);  // little-endian float32, as on x86/arm
  return "";
}

// Logits of every position from the C++ runtime, one uncached sequence.
std::vector<float> runtime_logits(const bp::Model& model, const std::vector<int32_t>& tokens) {
  bp::Sequence seq(model);
  return seq.append(tokens, bp::LogitsMode::ALL);  // [n_tokens][n_vocab]
}

// Asserts the two [n_tokens][n_vocab] logit tables agree within the project's tolerance.
void expect_logits_match(const std::vector<float>& got, const std::vector<float>& want,
                         size_t n_tokens, size_t n_vocab) {
  ASSERT_EQ(got.size(), n_tokens * n_vocab);
  ASSERT_EQ(want.size(), n_tokens * n_vocab);
  double max_abs = 0.0, max_diff = 0.0;
  size_t worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_TRUE(std::isfinite(got[i])) << "runtime logit " << i << " is not finite";
    max_abs = std::max(max_abs, std::fabs(static_cast<double>(want[i])));
    double d = std::fabs(static_cast<double>(got[i]) - want[i]);
    if (d > max_diff) max_diff = d, worst = i;
  }
  double tol = REL_TOL * std::max(1.0, max_abs);
  EXPECT_LE(max_diff, tol) << "worst at position " << worst / n_vocab << ", token "
                           << worst % n_vocab << ": runtime " << got[worst] << ", reference "
                           << want[worst] << " (max |logit| " << max_abs << ")";

  for (size_t t = 0; t < n_tokens; ++t) {
    const float* g = got.data() + t * n_vocab;   // [n_vocab]
    const float* w = want.data() + t * n_vocab;  // [n_vocab]
    size_t g_arg = std::max_element(g, g + n_vocab) - g;
    size_t w_arg = std::max_element(w, w + n_vocab) - w;
    // A tie in the reference within the tolerance is not a disagreement.
    if (g_arg != w_arg && std::fabs(w[g_arg] - w[w_arg]) <= tol) continue;
    EXPECT_EQ(g_arg, w_arg) << "argmax differs at position " << t << " (reference logits "
                            << w[w_arg] << " vs " << w[g_arg] << ")";
  }
  std::printf("  %zu positions x %zu vocab: max |diff| %.3g, max |logit| %.3g, tolerance %.3g\n",
              n_tokens, n_vocab, max_diff, max_abs, tol);
}

using ArchDType = std::tuple<bp::Arch, bp::DType>;

class ReferenceLogits : public ::testing::TestWithParam<ArchDType> {};

TEST_P(ReferenceLogits, TinyRandomModel) {
  if (!python_missing_reason().empty()) GTEST_SKIP() << "reference unavailable: " << python_missing_reason();
  auto [arch, dtype] = GetParam();
  TempDir dir;
  fs::path model_path = dir.path() / "model.gguf";

  bp::MakeModelOptions opt;
  opt.arch = arch;
  opt.preset = "tiny";
  opt.dtype = dtype;
  opt.seed = 7;
  bp::make_model(opt, model_path.string());

  auto model = bp::Model::load(model_path.string());
  const bp::ModelConfig& cfg = model->config();
  int32_t n = std::min(N_TOKENS, cfg.n_ctx);
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int32_t> pick(0, cfg.n_vocab - 1);
  std::vector<int32_t> tokens(n);
  for (auto& t : tokens) t = pick(rng);

  std::vector<float> want;
  std::string err = run_reference(model_path, tokens, dir.path(), cfg.n_vocab, want);
  ASSERT_TRUE(err.empty()) << err;
  std::vector<float> got = runtime_logits(*model, tokens);
  expect_logits_match(got, want, tokens.size(), cfg.n_vocab);
}

std::string param_name(const ::testing::TestParamInfo<ArchDType>& info) {
  return std::string(bp::arch_name(std::get<0>(info.param))) + "_" +
         bp::dtype_name(std::get<1>(info.param));
}

INSTANTIATE_TEST_SUITE_P(Reference, ReferenceLogits,
                         ::testing::Combine(::testing::Values(bp::Arch::GPT2, bp::Arch::LLAMA),
                                            ::testing::Values(bp::DType::F32, bp::DType::F16,
                                                              bp::DType::BF16, bp::DType::Q8_0)),
                         param_name);

// The real trained model: BOS then the start of its own greedy story (realistic, peaked logits).
TEST(ReferenceStories, TrainedLlamaMatches) {
  if (!python_missing_reason().empty()) GTEST_SKIP() << "reference unavailable: " << python_missing_reason();
  fs::path model_path = test_data_dir() / "stories260k" / "stories260K.gguf";
  if (!fs::exists(model_path)) GTEST_SKIP() << "test data absent: " << model_path;
  TempDir dir;

  auto model = bp::Model::load(model_path.string());
  std::vector<int32_t> tokens = {1,   403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315,
                                 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419};
  std::vector<float> want;
  std::string err = run_reference(model_path, tokens, dir.path(), model->config().n_vocab, want);
  ASSERT_TRUE(err.empty()) << err;
  std::vector<float> got = runtime_logits(*model, tokens);
  expect_logits_match(got, want, tokens.size(), model->config().n_vocab);
}

}  // namespace
