// Internal to src/tensor: the per-ISA kernel tables behind kernels.h, and the two matmul
// strategies, exposed separately so that tests and benchmarks can exercise each one.
//
// One table per instruction set (scalar, AVX2+FMA+F16C, AVX-512 F/BW/VL). Each SIMD table lives
// in its own .cpp whose functions carry __attribute__((target(...))); the file is compiled
// without -march flags, and its table is only handed out when the running CPU supports it.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "tensor/kernels.h"

namespace backprompt::detail {

// Activation rows quantized for DecodePrecision::INT8, the way q8_0 quantizes weights: per block
// of 32 values, d = max |x| / 127 and q = x / d rounded to nearest (ties to even), |q| <= 127,
// stored as q + 128 (unsigned: VNNI's unsigned operand). A block of zeros gets d = 0; one holding
// an infinity or NaN gets d = NaN, so that its products are NaN as the exact path's would be.
struct QuantizedRows {
  std::vector<uint8_t> u;  // [n][n_in]: q + 128
  std::vector<float> d;    // [n][n_in / 32]
  int64_t n = 0, n_in = 0;
  // Sized for rows x row_size values (row_size a multiple of 32), memory reused; returns the
  // blocks per row.
  int64_t reset(int64_t rows, int64_t row_size);
};
// x: [n][n_in], n_in a multiple of 32. Reuses out's memory. The portable version; kernel tables
// with int8 products bring their own (KernelIsa::quantize_q8), with the same results.
void quantize_rows_q8(const float* x, int64_t n, int64_t n_in, QuantizedRows& out);

struct KernelIsa {
  const char* name;  // "scalar", "avx2", "avx512"

  // Fused matrix-vector product for a few activation rows, reading each weight row once:
  // y[j * n_out + r] = dot(W row r, x row j) for j in [0, n), r in [r0, r1).
  // x: [n][w.n_in], y: [n][w.n_out]. Meant for small n (decode); any n >= 1 is correct.
  void (*matvec)(const MatrixView& w, const float* x, int64_t n, float* y, int64_t r0, int64_t r1);

  // dst[n] = src row of type t as f32; bit-identical to backprompt::dequantize_row.
  void (*dequantize_row)(DType t, const void* src, float* dst, int64_t n);

  // attention_tile(), silu_mul(), gelu_tanh() (kernels.h; b nullptr: none) on this instruction set.
  void (*attention_tile)(const AttentionTile& t);
  void (*silu_mul)(float* gate, const float* up, int64_t n);
  void (*gelu_tanh)(float* x, const float* b, int64_t n);
  // rms_norm_row(), layer_norm_row() (kernels.h); every table gives the same bits as the portable
  // ones (the same double sums in the same order, the same f32 operations).
  void (*rms_norm_row)(const float* x, float* y, int64_t n, const float* w, float eps);
  void (*layer_norm_row)(const float* x, float* y, int64_t n, const float* w, const float* b, float eps);
  // rotate_pairs() and add_to() (kernels.h); the same bits in every table.
  void (*rotate_pairs)(float* x, const float* cs, int64_t n_pairs);
  void (*add_to)(float* x, const float* a, const float* b, int64_t n);

  // DecodePrecision::INT8: matvec for q8_0 weights and quantized activation rows (x.n of them;
  // y as matvec's), and quantize_rows_q8 on this instruction set. nullptr where this table has
  // none (the product then stays exact).
  void (*matvec_q8_int8)(const MatrixView& w, const QuantizedRows& x, float* y, int64_t r0, int64_t r1);
  void (*quantize_q8)(const float* x, int64_t n, int64_t n_in, QuantizedRows& out);
};

// Portable activation functions (the scalar and AVX2 tables).
void silu_mul_portable(float* gate, const float* up, int64_t n);
void gelu_tanh_portable(float* x, const float* b, int64_t n);
void rms_norm_row_portable(const float* x, float* y, int64_t n, const float* w, float eps);
void layer_norm_row_portable(const float* x, float* y, int64_t n, const float* w, const float* b, float eps);
void rotate_pairs_portable(float* x, const float* cs, int64_t n_pairs);
void add_to_portable(float* x, const float* a, const float* b, int64_t n);

// The attention tile in portable C++ (the scalar and AVX2 tables), and with AVX-512 (its own
// file; heads wider than 128 go to the portable one).
void attention_tile_portable(const AttentionTile& t);
void attention_tile_avx512(const AttentionTile& t);

const KernelIsa* kernel_isa_scalar();
// The running CPU's F16C flag (CPUID; clang's __builtin_cpu_supports does not know "f16c").
bool cpu_has_f16c();
// nullptr when this build or the running CPU cannot run that instruction set.
const KernelIsa* kernel_isa_avx2();
const KernelIsa* kernel_isa_avx512();

// AVX512-VNNI's int8 matvec and quantizer (kernels_int8_avx512.cpp), and whether the running CPU
// has VNNI.
void matvec_q8_int8_avx512(const MatrixView& w, const QuantizedRows& x, float* y, int64_t r0, int64_t r1);
void quantize_rows_q8_avx512(const float* x, int64_t n, int64_t n_in, QuantizedRows& out);
bool cpu_has_avx512_vnni();

// The current DecodePrecision (kernels_int8.cpp).
DecodePrecision decode_precision();

// The table matmul() uses now (chosen once from the CPU and BACKPROMPT_ISA, or forced).
const KernelIsa& kernel_isa();

// The two strategies behind matmul(), for any n >= 1 (matmul picks one by n):
// fused kernels parallelised over output rows (weights read once; best for small n), and
// oneDNN sgemm on f32 weights or on blocks of rows dequantized into a scratch buffer.
void matmul_fused(const MatrixView& w, const float* x, int64_t n, float* y);
void matmul_fused_many(std::span<const MatmulTarget> targets, const float* x, int64_t n);
void matmul_gemm(const MatrixView& w, const float* x, int64_t n, float* y);

// Thread t's share of n_rows output rows when n_threads split them: a contiguous range in units of
// 16 rows (threads write disjoint cache lines of a 64-byte aligned y), units spread evenly.
inline RowRange thread_rows(int64_t n_rows, int64_t t, int64_t n_threads) {
  constexpr int64_t ROW_UNIT = 16;
  const int64_t n_units = (n_rows + ROW_UNIT - 1) / ROW_UNIT;
  return {std::min(n_rows, n_units * t / n_threads * ROW_UNIT), std::min(n_rows, n_units * (t + 1) / n_threads * ROW_UNIT)};
}

// The first oneDNN failure of a parallel region's threads (record() keeps the first one), and
// the Error it becomes: OUT_OF_MEMORY for dnnl_out_of_memory (and our own bad_alloc),
// UNSUPPORTED naming oneDNN's status otherwise.
class DnnlFailure {
 public:
  void record(int dnnl_status);  // a dnnl_status_t other than dnnl_success
  bool failed() const { return status_.load(std::memory_order_relaxed) != 0; }
  [[noreturn]] void raise(const std::string& what) const;

 private:
  std::atomic<int> status_{0};  // 0: dnnl_success
};

// Decode with one activation row (each ISA's matvec; kernels_avx512.cpp has the measurements):
// rows are read as four streams per thread (rows_in_quarters), except q8_0 rows on other ISAs than
// AVX-512: those shorter than ROW_DOT_MAX_BYTES one at a time, longer ones in tiles.
constexpr size_t ROW_DOT_MAX_BYTES = 8 << 10;
// How far ahead of its reads each of the four streams prefetches (rows4_dot, AVX-512 and AVX2).
constexpr int64_t ROWS4_PREFETCH_BYTES = 1024;

// Rows [r0, r1) in the four-stream order: quad(r) for r = {r0 + i, r0 + q + i, r0 + 2q + i,
// r0 + 3q + i}, i < q = (r1 - r0) / 4, then one(row) for each row left over.
template <class Quad, class One>
inline void rows_in_quarters(int64_t r0, int64_t r1, Quad&& quad, One&& one) {
  const int64_t q = (r1 - r0) / 4;
  for (int64_t i = 0; i < q; ++i) {
    const int64_t r[4] = {r0 + i, r0 + q + i, r0 + 2 * q + i, r0 + 3 * q + i};
    quad(r);
  }
  for (int64_t r = r0 + 4 * q; r < r1; ++r) one(r);
}

// Below this many multiply-adds a call runs on the calling thread: waking the team costs more.
constexpr int64_t PARALLEL_MIN_MACS = 1 << 16;

// The current MatmulPrecision, and the products under BF16 (kernels_gemm_bf16.cpp): every
// target's y = x · wᵀ (all w.n_in equal), x rounded to bf16 once for all of them, weights of any
// type rounded to bf16. Returns false, doing nothing, when it does not apply (EXACT, no native
// bf16, no oneDNN implementation, an empty matrix, unequal n_in): the caller then runs the exact
// path. For any n >= 1; matmul uses it only above MATMUL_FUSED_MAX_N.
MatmulPrecision matmul_precision();
bool gemm_bf16(std::span<const MatmulTarget> targets, const float* x, int64_t n);
// The same from activations already rounded to bf16 (xb[n][n_in]).
bool gemm_bf16_rounded(std::span<const MatmulTarget> targets, const uint16_t* xb, int64_t n);

// matmul() uses matmul_fused for n <= MATMUL_FUSED_MAX_N (kernels.h), matmul_gemm above. Measured
// on a 2-core AVX-512 machine (2048 x 4096 weights, one thread): fused is 1.4-3x faster than
// dequantize + sgemm up to n = 32 for every type, about even at n = 64 (f32), and sgemm wins
// from n = 128 on.

}  // namespace backprompt::detail
