// Shared test helpers: where the test data is, and small generated models (made once per run).
#pragma once

#include <sys/wait.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <mutex>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "backprompt/model.h"
#include "model/make_model.h"
#include "tensor/kernels.h"
#include "tensor/kernels_simd.h"

namespace backprompt::testing {

// BACKPROMPT_TEST_DATA, else <repo>/../shared/models. Empty if it does not exist.
inline std::string test_data_dir() {
  std::string dir;
  if (const char* env = std::getenv("BACKPROMPT_TEST_DATA")) dir = env;
  else dir = std::string(BACKPROMPT_SOURCE_DIR) + "/../shared/models";
  return std::filesystem::is_directory(dir) ? dir : std::string();
}

// Path of a file under the test data directory, or "" if absent.
inline std::string test_data_file(const std::string& rel) {
  const std::string dir = test_data_dir();
  if (dir.empty()) return {};
  const std::string p = dir + "/" + rel;
  return std::filesystem::exists(p) ? p : std::string();
}

// A per-process scratch directory, removed by the OS's tmp cleaning (kept for debugging).
inline std::string temp_dir() {
  static const std::string dir = [] {
    std::string t = (std::filesystem::temp_directory_path() / "backprompt-test-XXXXXX").string();
    char* d = mkdtemp(t.data());
    return std::string(d ? d : "/tmp");
  }();
  return dir;
}

// A fresh file name in temp_dir(): <stem>-<n><ext>, n counting up within the process.
inline std::string fresh_temp_path(const std::string& stem, const std::string& ext) {
  static std::atomic<int> counter{0};
  return temp_dir() + "/" + stem + "-" + std::to_string(counter++) + ext;
}

// A whole file's bytes (empty if it cannot be read), and writing them back.
inline std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

inline void write_file(const std::string& path, std::span<const uint8_t> bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

// The kernel instruction sets this CPU can run ("scalar" first, the best last), for tests that
// run a body under each (kernels_force_isa); IsaRestore puts the chosen one back.
inline std::vector<std::string> available_isas() {
  std::vector<std::string> v = {"scalar"};
  if (detail::kernel_isa_avx2() != nullptr) v.push_back("avx2");
  if (detail::kernel_isa_avx512() != nullptr) v.push_back("avx512");
  return v;
}

struct IsaRestore {
  std::string saved = kernels_isa();
  ~IsaRestore() { kernels_force_isa(saved); }
};

// A shell word that stands for `s` exactly.
inline std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// The backprompt command-line tool built with the tests.
inline std::string cli_binary() { return std::string(BACKPROMPT_BINARY_DIR) + "/backprompt"; }

struct CliResult {
  int exit_code = -1;  // -1 if it did not exit normally
  std::string out;     // stdout
  std::string err;     // stderr
};

// Runs `backprompt <args_line>` through the shell (args_line is shell words, already quoted where
// needed), stdin from /dev/null, capturing stdout and stderr.
inline CliResult run_cli_line(const std::string& args_line) {
  static std::atomic<int> counter{0};
  const std::string base = temp_dir() + "/cli-" + std::to_string(counter++);
  const std::string cmd = shell_quote(cli_binary()) + " " + args_line + " >" + shell_quote(base + ".out") + " 2>" +
                          shell_quote(base + ".err") + " </dev/null";
  const int status = std::system(cmd.c_str());
  auto slurp = [](const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  };
  CliResult r;
  r.exit_code = status != -1 && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = slurp(base + ".out");
  r.err = slurp(base + ".err");
  return r;
}

// Runs `backprompt` with these arguments, each passed as one word.
inline CliResult run_cli(const std::vector<std::string>& args) {
  std::string line;
  for (const std::string& a : args) line += (line.empty() ? "" : " ") + shell_quote(a);
  return run_cli_line(line);
}

// A generated random-weight model (built-in byte vocabulary), made once per options.
inline std::string generated_model(Arch arch, DType dtype, const std::string& preset = "tiny", uint64_t seed = 1) {
  static std::mutex mu;
  static std::map<std::string, std::string> made;
  const std::string key = std::string(arch_name(arch)) + "-" + preset + "-" + dtype_name(dtype) + "-" + std::to_string(seed);
  std::lock_guard<std::mutex> lock(mu);
  auto it = made.find(key);
  if (it != made.end()) return it->second;
  const std::string path = temp_dir() + "/" + key + ".gguf";
  MakeModelOptions opt;
  opt.arch = arch;
  opt.preset = preset;
  opt.dtype = dtype;
  opt.seed = seed;
  make_model(opt, path);
  made[key] = path;
  return path;
}

// max |a - b| <= 1e-4 * max(1, max |b|) and the same argmax: the exactness criterion.
struct LogitCompare {
  double max_abs_diff = 0.0;
  double max_abs_ref = 0.0;
  bool same_argmax = true;
  bool within_tolerance() const { return max_abs_diff <= 1e-4 * std::max(1.0, max_abs_ref); }
};

inline LogitCompare compare_logits(const float* got, const float* ref, int64_t n) {
  LogitCompare c;
  int64_t arg_got = 0, arg_ref = 0;
  for (int64_t i = 0; i < n; ++i) {
    c.max_abs_diff = std::max(c.max_abs_diff, static_cast<double>(std::abs(got[i] - ref[i])));
    c.max_abs_ref = std::max(c.max_abs_ref, static_cast<double>(std::abs(ref[i])));
    if (got[i] > got[arg_got]) arg_got = i;
    if (ref[i] > ref[arg_ref]) arg_ref = i;
  }
  c.same_argmax = arg_got == arg_ref;
  return c;
}

// n token ids drawn uniformly from [0, n_vocab), seeded.
inline std::vector<int32_t> random_tokens(int32_t n_vocab, size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> dist(0, n_vocab - 1);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = dist(rng);
  return t;
}

// n values drawn from N(0, scale^2), seeded.
inline std::vector<float> random_normal(int64_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = normal(rng);
  return v;
}

}  // namespace backprompt::testing
