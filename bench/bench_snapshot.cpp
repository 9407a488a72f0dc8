// bench_snapshot MODEL [--tokens N] [--reps R] [-t THREADS]: snapshot save and restore throughput
// and size for one prompt of N tokens (default 1000), per K/V storage type (with and without zstd).
//
// save: Text::save of an already evaluated text (gathering K/V from the tree, encoding, writing,
// fsync, rename). restore: Cache::restore into a fresh cache (reading, checking every checksum,
// decoding, inserting into the tree). GB/s is file bytes per second. The file is in the system's
// temporary directory (a page-cached filesystem here, so this measures the code, not the disk).
#include <omp.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "backprompt/backprompt.h"

namespace bp = backprompt;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// About n tokens of random words.
std::string prompt_of(const bp::Tokenizer& tok, int n) {
  static const char* words[] = {" the", " cat", " sat", " on", " a", " mat", " and", " then", " it", " ran", " far", " away"};
  std::mt19937 rng(7);
  std::string s = "Once";
  while (static_cast<int>(tok.encode(s).size()) < n) s += words[rng() % std::size(words)];
  return s;
}

int run(int argc, char** argv) {
  std::string model_path;
  int n_tokens = 1000, n_reps = 3, n_threads = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--tokens" && i + 1 < argc) n_tokens = std::atoi(argv[++i]);
    else if (a == "--reps" && i + 1 < argc) n_reps = std::max(1, std::atoi(argv[++i]));
    else if ((a == "-t" || a == "--threads") && i + 1 < argc) n_threads = std::atoi(argv[++i]);
    else if (a == "-h" || a == "--help") {
      std::printf("usage: bench_snapshot MODEL [--tokens N] [--reps R] [-t THREADS]\n");
      return 0;
    } else if (model_path.empty() && a[0] != '-') model_path = a;
    else {
      std::fprintf(stderr, "bench_snapshot: error: unexpected argument '%s'\n", a.c_str());
      return 2;
    }
  }
  if (model_path.empty()) {
    std::fprintf(stderr, "bench_snapshot: error: no model given (see --help)\n");
    return 2;
  }
  omp_set_num_threads(n_threads > 0 ? n_threads : omp_get_num_procs());
  std::shared_ptr<bp::Model> model = bp::Model::load(model_path);
  const bp::ModelConfig& c = model->config();
  n_tokens = std::min(n_tokens, c.n_ctx);
  const std::string dir = (std::filesystem::temp_directory_path() / "backprompt-bench-snapshot").string();
  std::filesystem::create_directories(dir);

  bp::Cache cache(model);
  const bp::Text text = cache.text(prompt_of(model->tokenizer(), n_tokens));
  text.next_logits();
  const size_t n = text.tokens().size();
  const double kv_bytes = 2.0 * c.n_layer * c.kv_dim() * 4.0 * static_cast<double>(n);
  std::printf("model: %s, %zu tokens, f32 K/V in memory: %.1f MiB\n", model_path.c_str(), n, kv_bytes / (1 << 20));
  std::printf("%-10s %12s %12s %11s %11s %13s\n", "kv type", "file MiB", "bytes/token", "save GB/s", "restore GB/s",
              "max|dlogit|*");
  // The error of lossy K/V shows in what is computed on top of them: the logits after a
  // continuation appended to the restored text (the restored text's own next-token logits are
  // stored exactly).
  const std::string more = " and then the cat sat on the mat";
  const std::vector<float> ref = (text + more).next_logits();
  for (const char* type : {"f32", "f16", "bf16", "q8_0"}) {
    for (bool zstd : {false, true}) {
      bp::SnapshotOptions so;
      so.kv_type = *bp::kv_type_from_name(type);
      so.zstd = zstd;
      const std::string path = dir + "/prompt-" + type + (zstd ? "-zstd" : "") + ".bps";
      double best_save = 1e30, best_restore = 1e30, max_diff = 0;
      for (int r = 0; r < n_reps; ++r) {
        const Clock::time_point t0 = Clock::now();
        text.save(path, so);
        best_save = std::min(best_save, seconds_since(t0));
        bp::Cache fresh(model);
        const Clock::time_point t1 = Clock::now();
        const bp::Text back = fresh.restore(path);
        best_restore = std::min(best_restore, seconds_since(t1));
        const std::vector<float> got = (back + more).next_logits();
        for (size_t i = 0; i < got.size(); ++i) max_diff = std::max(max_diff, static_cast<double>(std::fabs(got[i] - ref[i])));
      }
      const double size = static_cast<double>(std::filesystem::file_size(path));
      std::printf("%-10s %12.2f %12.0f %11.2f %11.2f %13.3g\n", (std::string(type) + (zstd ? "+zstd" : "")).c_str(),
                  size / (1 << 20), size / static_cast<double>(n), size / best_save / 1e9, size / best_restore / 1e9, max_diff);
    }
  }
  std::printf("* max |logit difference| after appending \"%s\" to the restored text, against f32 K/V kept in memory\n",
              more.c_str());
  std::filesystem::remove_all(dir);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_snapshot: error: %s\n", e.what());
    return 1;
  }
}
