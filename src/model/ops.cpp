#include "model/ops.h"

#include <linux/futex.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <string_view>
#include <vector>

#include "tensor/kernels.h"

namespace backprompt::ops {

namespace {
constexpr int64_t PARALLEL_ROWS = 4;  // below this, row loops stay on one thread

// Activations: chunks of this many values over the threads, each through the SIMD kernel.
constexpr int64_t ACTIVATION_CHUNK = 1 << 14;
// Rounding to bf16 follows the f32 result in pieces this long, while they are in L1.
constexpr int64_t ROUND_PIECE = 1024;

// A row of n floats of this thread's own (not thread_scratch: its slots hold a pass's buffers).
float* row_buffer(int64_t n) {
  thread_local std::vector<float> row;
  if (static_cast<int64_t>(row.size()) < n) row.resize(static_cast<size_t>(n));
  return row.data();
}
}  // namespace

void layer_norm(const float* x, float* y, int64_t n_rows, int64_t n, const float* w, const float* b, float eps) {
#pragma omp parallel for if (n_rows >= PARALLEL_ROWS && !omp_in_parallel())
  for (int64_t r = 0; r < n_rows; ++r) layer_norm_row(x + r * n, y + r * n, n, w, b, eps);
}

void rms_norm(const float* x, float* y, int64_t n_rows, int64_t n, const float* w, float eps) {
#pragma omp parallel for if (n_rows >= PARALLEL_ROWS && !omp_in_parallel())
  for (int64_t r = 0; r < n_rows; ++r) rms_norm_row(x + r * n, y + r * n, n, w, eps);
}

void add_norm(float* x, const float* delta, const float* delta_bias, const Norm& norm, float* y, uint16_t* yb,
              int64_t n_rows, int64_t n) {
#pragma omp parallel for if (n_rows >= PARALLEL_ROWS && !omp_in_parallel())
  for (int64_t r = 0; r < n_rows; ++r) {
    float* xr = x + r * n;
    if (delta != nullptr) add_to(xr, delta + r * n, delta_bias, n);
    float* out = yb != nullptr ? row_buffer(n) : y + r * n;
    if (norm.b != nullptr) {
      layer_norm_row(xr, out, n, norm.w, norm.b, norm.eps);
    } else {
      rms_norm_row(xr, out, n, norm.w, norm.eps);
    }
    if (yb != nullptr) round_to_bf16(out, yb + r * n, n);
  }
}

void add_norm_products(float* x, const float* delta, const float* delta_bias, const Norm& norm,
                       std::span<const MatmulTarget> targets, float* y, uint16_t* yb, int64_t n_rows, int64_t n) {
  add_norm(x, delta, delta_bias, norm, yb != nullptr ? nullptr : y, yb, n_rows, n);
  if (yb != nullptr) {
    matmul_many_bf16(targets, yb, n_rows);
  } else {
    matmul_many(targets, y, n_rows);
  }
}

void add(float* x, const float* y, int64_t count) {
  const int64_t n_chunks = (count + ACTIVATION_CHUNK - 1) / ACTIVATION_CHUNK;
#pragma omp parallel for if (n_chunks > 1 && !omp_in_parallel())
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t i = c * ACTIVATION_CHUNK;
    add_to(x + i, y + i, nullptr, std::min(ACTIVATION_CHUNK, count - i));
  }
}

void add_residual(float* x, const float* y, int64_t n_rows, int64_t n, const float* b) {
#pragma omp parallel for if (n_rows >= PARALLEL_ROWS && !omp_in_parallel())
  for (int64_t r = 0; r < n_rows; ++r) add_to(x + r * n, y + r * n, b, n);
}

void bias_gelu(float* x, int64_t n_rows, int64_t n, const float* b) {
#pragma omp parallel for if (n_rows >= PARALLEL_ROWS && !omp_in_parallel())
  for (int64_t r = 0; r < n_rows; ++r) {
    gelu_tanh(x + r * n, b, n);
  }
}

void bias_gelu(float* x, int64_t n_rows, int64_t n, const float* b, uint16_t* yb) {
#pragma omp parallel for if (n_rows >= PARALLEL_ROWS && !omp_in_parallel())
  for (int64_t r = 0; r < n_rows; ++r) {
    float* xr = x + r * n;
    for (int64_t i = 0; i < n; i += ROUND_PIECE) {
      const int64_t len = std::min(ROUND_PIECE, n - i);
      gelu_tanh(xr + i, b + i, len);
      round_to_bf16(xr + i, yb + r * n + i, len);
    }
  }
}

void swiglu(float* gate, const float* up, int64_t count) {
  const int64_t n_chunks = (count + ACTIVATION_CHUNK - 1) / ACTIVATION_CHUNK;
#pragma omp parallel for if (n_chunks > 1 && !omp_in_parallel())
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t i = c * ACTIVATION_CHUNK;
    silu_mul(gate + i, up + i, std::min(ACTIVATION_CHUNK, count - i));
  }
}

void swiglu(float* gate, const float* up, int64_t count, uint16_t* out) {
  const int64_t n_chunks = (count + ACTIVATION_CHUNK - 1) / ACTIVATION_CHUNK;
#pragma omp parallel for if (n_chunks > 1 && !omp_in_parallel())
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t end = std::min(count, (c + 1) * ACTIVATION_CHUNK);
    for (int64_t i = c * ACTIVATION_CHUNK; i < end; i += ROUND_PIECE) {
      const int64_t len = std::min(ROUND_PIECE, end - i);
      silu_mul(gate + i, up + i, len);
      round_to_bf16(gate + i, out + i, len);
    }
  }
}

void rope_angles(const int32_t* pos, int64_t n_rows, int32_t rope_dim, float base, float* cs) {
  const int32_t n_pairs = rope_dim / 2;
  std::vector<double> freq(static_cast<size_t>(n_pairs));  // [n_pairs] base^(-2i/rope_dim)
  for (int32_t i = 0; i < n_pairs; ++i) freq[static_cast<size_t>(i)] = std::pow(static_cast<double>(base), -2.0 * i / rope_dim);
#pragma omp parallel for if (n_rows >= 64)
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int32_t i = 0; i < n_pairs; ++i) {
      // Angles in double: positions up to the context length keep full f32 precision.
      const double theta = pos[r] * freq[static_cast<size_t>(i)];
      cs[(r * n_pairs + i) * 2] = static_cast<float>(std::cos(theta));
      cs[(r * n_pairs + i) * 2 + 1] = static_cast<float>(std::sin(theta));
    }
  }
}

void rope(float* x, int32_t n_heads, int32_t head_dim, int32_t rope_dim, const float* cs) {
  rope_range(x, 0, static_cast<int64_t>(n_heads) * head_dim, head_dim, rope_dim, cs);
}

void rope_range(float* x, int64_t e0, int64_t e1, int32_t head_dim, int32_t rope_dim, const float* cs) {
  // Head by head: the elements of [e0, e1) among each head's first rope_dim (pairs never straddle
  // heads: e0 and head_dim are even).
  const int64_t rotated = rope_dim / 2 * 2;
  for (int64_t head0 = e0 / head_dim * head_dim; head0 < e1; head0 += head_dim) {
    const int64_t d0 = std::max<int64_t>(e0 - head0, 0), d1 = std::min(e1 - head0, rotated);
    if (d1 > d0) rotate_pairs(x + head0 + d0, cs + d0, (d1 - d0 + 1) / 2);  // pair d / 2: {cos, sin} at cs[d], cs[d + 1]
  }
}

float* thread_scratch(int slot, size_t n) {
  struct Buffer {
    std::unique_ptr<float[]> data;  // [capacity + 16]: room to align to 64 bytes
    size_t capacity = 0;
  };
  thread_local Buffer buffers[SCRATCH_SLOTS];
  Buffer& b = buffers[slot];
  if (n > b.capacity) {
    b.data.reset();  // free the old one first
    b.data.reset(new float[n + 16]);
    b.capacity = n;
  }
  const uintptr_t at = (reinterpret_cast<uintptr_t>(b.data.get()) + 63) & ~uintptr_t{63};
  return reinterpret_cast<float*>(at);
}

namespace {

// Spin iterations before a waiting thread sleeps: ~0.4 ms of pause instructions, none under
// OMP_WAIT_POLICY=passive (a machine shared with other work, where spinning threads are
// descheduled and everyone waits for them).
int barrier_spins() {
  static const int spins = [] {
    const char* policy = std::getenv("OMP_WAIT_POLICY");
    return policy != nullptr && (std::string_view(policy) == "passive" || std::string_view(policy) == "PASSIVE") ? 0 : 20000;
  }();
  return spins;
}

long futex(std::atomic<uint32_t>* word, int op, uint32_t value) {
  static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t));
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), op, value, nullptr, nullptr, 0);
}

}  // namespace

void TeamBarrier::wait(int n_threads) {
  if (n_threads <= 1) return;
  const uint32_t gen = generation_.load(std::memory_order_relaxed);
  if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n_threads - 1) {
    // The last to arrive: reset the count before the others can leave (they leave on the new
    // generation, which they read with acquire), then release them.
    arrived_.store(0, std::memory_order_relaxed);
    generation_.store(gen + 1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) futex(&generation_, FUTEX_WAKE_PRIVATE, INT32_MAX);
    return;
  }
  for (int i = barrier_spins(); i > 0; --i) {
    if (generation_.load(std::memory_order_acquire) != gen) return;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
  // Counted as a sleeper before checking the generation again: either the last thread sees the
  // count and wakes us, or we see its new generation (both seq_cst), and FUTEX_WAIT returns at
  // once if the word has changed since.
  sleepers_.fetch_add(1, std::memory_order_seq_cst);
  while (generation_.load(std::memory_order_seq_cst) == gen) futex(&generation_, FUTEX_WAIT_PRIVATE, gen);
  sleepers_.fetch_sub(1, std::memory_order_relaxed);
}

namespace {
thread_local TeamBarrier* team_barrier = nullptr;  // the calling thread's TeamPass, if any
}  // namespace

TeamPass::TeamPass(TeamBarrier& barrier) : saved_(team_barrier) { team_barrier = &barrier; }
TeamPass::~TeamPass() { team_barrier = saved_; }
bool TeamPass::active() { return team_barrier != nullptr; }
void TeamPass::barrier() { team_barrier->wait(omp_get_num_threads()); }

}  // namespace backprompt::ops
