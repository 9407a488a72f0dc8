// bench_attention [--rows N] [--heads H] [--head-dim D] [--reps R] [--exact] [-t THREADS]:
// prefill attention alone, the way a layer of a 512-token llama-110m prefill runs it (default
// shape: 512 rows, 12 heads of 64): tiles of 64 rows x one head, the heads one after another and
// each head's tiles biggest first, spread over the threads dynamically, K/V read in place from
// rows of all heads (on huge pages, as a cache node's are). Before each timed layer the threads
// write the q/K/V rows in halves (as RoPE leaves them) and sweep 64 MiB, so the tiles find them
// where a pass would, not in a warm cache. Prints the median and best time per layer and the
// attention's useful GFLOP/s (causal: 4 x head_dim per query-key pair). bf16 tiles (the
// BACKPROMPT_MATMUL=bf16 prefill's) on CPUs with AVX512_BF16, f32 ones with --exact or elsewhere.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "model/reserved_buffer.h"
#include "tensor/kernels.h"

namespace bp = backprompt;
using Clock = std::chrono::steady_clock;

namespace {

constexpr int TILE_ROWS = 64;  // as the runtime's prefill tiles (one head each)

int run(int argc, char** argv) {
  int n_rows = 512, n_heads = 12, head_dim = 64, n_reps = 200, n_threads = omp_get_num_procs();
  bool exact = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return i + 1 < argc ? std::atoi(argv[++i]) : -1; };
    if (a == "--rows") {
      n_rows = next();
    } else if (a == "--heads") {
      n_heads = next();
    } else if (a == "--head-dim") {
      head_dim = next();
    } else if (a == "--reps") {
      n_reps = next();
    } else if (a == "-t" || a == "--threads") {
      n_threads = next();
    } else if (a == "--exact") {
      exact = true;
    } else {
      std::fprintf(stderr, "usage: bench_attention [--rows N] [--heads H] [--head-dim D] [--reps R] [--exact] [-t THREADS]\n");
      return 2;
    }
  }
  if (n_rows < 1 || n_heads < 1 || head_dim < 2 || head_dim > 256 || head_dim % 2 != 0 || n_reps < 1 || n_threads < 1) {
    std::fprintf(stderr, "bench_attention: rows, heads and reps must be positive, head dim even and at most 256\n");
    return 2;
  }
  const bool bf16 = !exact && bp::kernels_bf16_native();
  const int64_t d = int64_t{n_heads} * head_dim, n = int64_t{n_rows} * d;
  std::vector<float> q(static_cast<size_t>(n)), out(static_cast<size_t>(n)), rows(static_cast<size_t>(n));
  bp::detail::BigVector<float> k(static_cast<size_t>(n)), v(static_cast<size_t>(n));
  std::vector<float> sweep(size_t{16} << 20);  // 64 MiB
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& x : rows) x = normal(rng);

  struct Tile {
    int head, row0, n_rows;
  };
  std::vector<Tile> tiles;
  for (int h = 0; h < n_heads; ++h) {
    const int last = (n_rows - 1) / TILE_ROWS * TILE_ROWS;
    for (int r0 = last; r0 >= 0; r0 -= TILE_ROWS) tiles.push_back({h, r0, std::min(TILE_ROWS, n_rows - r0)});
  }

  std::vector<double> seconds;
  for (int rep = 0; rep < n_reps; ++rep) {
#pragma omp parallel num_threads(n_threads)
    {
      const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
      for (size_t i = sweep.size() * t / nt; i < sweep.size() * (t + 1) / nt; ++i) sweep[i] = static_cast<float>(i + rep);
      for (int64_t r = n_rows * t / nt; r < n_rows * (t + 1) / nt; ++r) {
        std::memcpy(&q[r * d], &rows[r * d], d * sizeof(float));
        std::memcpy(&k[r * d], &rows[((r + 7) % n_rows) * d], d * sizeof(float));
        std::memcpy(&v[r * d], &rows[((r + 13) % n_rows) * d], d * sizeof(float));
      }
    }
    const uint64_t epoch = bp::next_kv_epoch();  // as attention() takes one per call
    const Clock::time_point t0 = Clock::now();
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
    for (size_t i = 0; i < tiles.size(); ++i) {
      const Tile& tile = tiles[i];
      const bp::KvRowsView kv{k.data() + tile.head * head_dim, v.data() + tile.head * head_dim, n_rows};
      bp::AttentionTile t;
      t.q = q.data() + tile.row0 * d + tile.head * head_dim;
      t.out = out.data() + tile.row0 * d + tile.head * head_dim;
      t.ldq = t.ldo = d;
      t.n_rows = tile.n_rows;
      t.head_dim = head_dim;
      t.scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
      t.kv = &kv;
      t.n_kv = 1;
      t.kv_stride = d;
      t.n_keys0 = tile.row0 + 1;
      t.bf16 = bf16;
      t.kv_epoch = epoch;
      bp::attention_tile(t);
    }
    seconds.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  std::sort(seconds.begin(), seconds.end());
  double checksum = 0;
  for (float x : out) checksum += x;
  const double flop = 4.0 * head_dim * n_heads * (static_cast<double>(n_rows) * (n_rows + 1) / 2);
  const double median = seconds[seconds.size() / 2];
  std::printf("attention, %d rows x %d heads of %d, %s tiles, %d threads, %d layers:\n", n_rows, n_heads, head_dim,
              bf16 ? "bf16" : "f32", n_threads, n_reps);
  std::printf("per layer: median %.1f us (%.0f GFLOP/s), best %.1f us (%.0f GFLOP/s); checksum %.6g\n", median * 1e6,
              flop / median / 1e9, seconds[0] * 1e6, flop / seconds[0] / 1e9, checksum);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_attention: %s\n", e.what());
    return 1;
  }
}
