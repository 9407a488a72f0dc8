// Row-wise operations of the transformer blocks, on f32 activations [n_rows][n] (row-major).
// Each parallelises over rows with OpenMP when there are enough of them, unless called inside a
// parallel region (then the calling thread does all of it).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <span>

#include "tensor/kernels.h"

namespace backprompt::ops {

// y = (x - mean) / sqrt(var + eps) * w + b, per row.
void layer_norm(const float* x, float* y, int64_t n_rows, int64_t n, const float* w, const float* b, float eps);
// y = x / sqrt(mean(x^2) + eps) * w, per row.
void rms_norm(const float* x, float* y, int64_t n_rows, int64_t n, const float* w, float eps);
// A norm's parameters: RMSNorm when b is nullptr, LayerNorm otherwise.
struct Norm {
  const float* w = nullptr;
  const float* b = nullptr;
  float eps = 0;
};
// A block's residual add and the next norm in one pass, row by row: x[r] += delta[r] (+ delta_bias
// when given: x += (delta + bias), add_residual's order), unless delta is nullptr; then the norm of
// the new x[r] into y[r] (f32; y may be delta) or, when yb is given, into yb[r] rounded to bf16
// for products that take bf16 (matmul_takes_bf16, then matmul_many_bf16). The same values as
// add / add_residual followed by layer_norm / rms_norm.
void add_norm(float* x, const float* delta, const float* delta_bias, const Norm& norm, float* y, uint16_t* yb,
              int64_t n_rows, int64_t n);
// add_norm, then the targets' products of the normalized rows: through y (f32, matmul_many), or
// through yb when given (bf16, matmul_many_bf16: the rounding rode along with the norm).
void add_norm_products(float* x, const float* delta, const float* delta_bias, const Norm& norm,
                       std::span<const MatmulTarget> targets, float* y, uint16_t* yb, int64_t n_rows, int64_t n);
// x += y, elementwise over count values.
void add(float* x, const float* y, int64_t count);
// x[r][i] += y[r][i] + b[i]: a biased block output added to the residual stream, in one pass
// (the same values as adding b to y, then y to x).
void add_residual(float* x, const float* y, int64_t n_rows, int64_t n, const float* b);
// x[r][i] = gelu(x[r][i] + b[i]), in one pass (the same values as adding b, then gelu).
void bias_gelu(float* x, int64_t n_rows, int64_t n, const float* b);
// The same, also writing the results rounded to bf16 into yb[n_rows][n].
void bias_gelu(float* x, int64_t n_rows, int64_t n, const float* b, uint16_t* yb);
// gate[i] = silu(gate[i]) * up[i]  (SwiGLU), in place in gate.
void swiglu(float* gate, const float* up, int64_t count);
// The same, also writing the results rounded to bf16 into out[count].
void swiglu(float* gate, const float* up, int64_t count, uint16_t* out);
// RoPE's rotations for rows at positions pos[0 .. n_rows-1]: cs[r][i] = {cos, sin} of the angle
// pos[r] * base^(-2i/rope_dim), i < rope_dim / 2. cs: [n_rows][rope_dim / 2][2]. Computed once per
// forward pass and shared by every layer.
void rope_angles(const int32_t* pos, int64_t n_rows, int32_t rope_dim, float base, float* cs);
// Rotates adjacent pairs (x[2i], x[2i+1]) of the first rope_dim dims of every head of one row by
// the angles of that row's cs ([rope_dim / 2][2], from rope_angles). x is [n_heads][head_dim].
void rope(float* x, int32_t n_heads, int32_t head_dim, int32_t rope_dim, const float* cs);
// The same for the pairs of one row whose first element lies in [e0, e1) (e0 even): a thread's
// share of a row's heads.
void rope_range(float* x, int64_t e0, int64_t e1, int32_t head_dim, int32_t rope_dim, const float* cs);

// Per-thread buffers of at least n floats, 64-byte aligned, uninitialised; slot 0 or 1 (two
// independent buffers), valid until this thread's next call for the same slot. Kept between
// calls (grown to the largest request, freed at thread exit): a forward pass's activations would
// otherwise be fresh memory each time, and first-touch page faults are slow (measured on a 2-core
// machine: touching 40 MB of fresh pages took 100 ms; a 512-token llama-110m prefill takes ~300 ms).
constexpr int SCRATCH_SLOTS = 2;
float* thread_scratch(int slot, size_t n);

// A barrier for the threads of one parallel region that meet many times: the decode schedule
// meets 6-7 times per layer, every 10-50 us for a small model. Waiting threads spin on a
// counter, then (after ~0.4 ms, or at once under OMP_WAIT_POLICY=passive) sleep on a futex.
// Measured on a 2-core AVX-512 VM, two threads meeting in a loop: 0.1-0.5 us per barrier this way,
// 1.2-1.5 us through `#pragma omp barrier`; llama-110m q8_0 decode (no prompt) 1.03x, 8 of 8
// alternating pairs faster. Acquire/release: what a thread wrote before wait() is visible to
// every thread after it. Declare one before the parallel region (shared by the team).
class TeamBarrier {
 public:
  TeamBarrier() = default;
  TeamBarrier(const TeamBarrier&) = delete;
  TeamBarrier& operator=(const TeamBarrier&) = delete;
  void wait(int n_threads);  // every thread of the team, with the team's size

 private:
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<uint32_t> generation_{0};  // also the futex word
  std::atomic<int> sleepers_{0};
};

// Marks the calling thread, while the object lives, as a member of a team that runs a whole
// forward pass in one parallel region (the decode schedule of llama.cpp and gpt2.cpp): store_kv()
// and attention() then share their work with that team (every member must call them) instead
// of running alone or opening a parallel region of their own, meeting at the team's barrier.
class TeamPass {
 public:
  explicit TeamPass(TeamBarrier& barrier);
  ~TeamPass();
  TeamPass(const TeamPass&) = delete;
  TeamPass& operator=(const TeamPass&) = delete;
  static bool active();  // is the calling thread in a TeamPass?
  static void barrier();  // the calling thread's team meets (only while active())

 private:
  TeamBarrier* saved_;
};

}  // namespace backprompt::ops
