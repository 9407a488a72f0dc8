// matmul and matrix_get_row: picks the instruction set once, then one of two strategies:
//
//   n <= MATMUL_FUSED_MAX_N (decode, small batches): our fused kernels, parallel over output rows, each weight
//     row read once from memory and dotted with every activation row (memory-bound);
//   larger n (prefill, batches): oneDNN sgemm, on the weights directly when they are f32, else on
//     blocks of rows dequantized to f32 into a scratch buffer (compute-bound).
//
// Threads: both use the OpenMP team (libgomp, shared with oneDNN). sgemm is only ever called from
// outside our parallel regions, so it brings its own team and nothing is oversubscribed.
#include "tensor/kernels.h"

#include <dnnl.h>
#include <omp.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "backprompt/error.h"
#include "tensor/kernels_simd.h"

namespace backprompt {

namespace detail {

namespace {

const KernelIsa* isa_best() {
  if (const KernelIsa* t = kernel_isa_avx512()) return t;
  if (const KernelIsa* t = kernel_isa_avx2()) return t;
  return kernel_isa_scalar();
}

// nullptr for an unknown name or an instruction set this CPU lacks.
const KernelIsa* isa_by_name(std::string_view name) {
  if (name == "auto") return isa_best();
  if (name == "scalar") return kernel_isa_scalar();
  if (name == "avx2") return kernel_isa_avx2();
  if (name == "avx512") return kernel_isa_avx512();
  return nullptr;
}

std::atomic<const KernelIsa*>& isa_current() {
  static std::atomic<const KernelIsa*> current{[] {
    const char* env = std::getenv("BACKPROMPT_ISA");
    const KernelIsa* t = env != nullptr ? isa_by_name(env) : nullptr;
    return t != nullptr ? t : isa_best();
  }()};
  return current;
}

// Below this many multiply-adds a call runs on the calling thread: waking the team costs more.
constexpr int64_t PARALLEL_MIN_MACS = 1 << 16;

// Trivial shapes shared by both strategies. Returns true when y is done.
bool matmul_trivial(const MatrixView& w, const float* x, int64_t n, float* y) {
  BP_ASSERT(n >= 0 && w.n_in >= 0 && w.n_out >= 0);
  BP_ASSERT(w.n_in % dtype_block_size(w.type) == 0);
  if (n == 0 || w.n_out == 0) return true;
  BP_ASSERT(x != nullptr && y != nullptr && w.data != nullptr);
  if (w.n_in == 0) {
    std::fill(y, y + n * w.n_out, 0.0f);  // an empty sum
    return true;
  }
  return false;
}

// y[n, n_rows] (leading dimension ldy) = x[n, n_in] · w[n_rows, n_in]ᵀ, all f32 row-major.
void sgemm_xwt(const float* x, int64_t n, const float* w, int64_t n_rows, int64_t n_in, float* y,
               int64_t ldy) {
  const dnnl_status_t status =
      dnnl_sgemm('N', 'T', n, n_rows, n_in, 1.0f, x, n_in, w, n_in, 0.0f, y, ldy);
  if (status == dnnl_out_of_memory) {
    throw Error(ErrorCode::OUT_OF_MEMORY, "matmul: oneDNN sgemm could not allocate its buffers (" +
                                              std::to_string(n) + " x " + std::to_string(n_in) +
                                              " times " + std::to_string(n_in) + " x " +
                                              std::to_string(n_rows) + ")");
  }
  BP_ASSERT(status == dnnl_success);
}

// Rows of weights dequantized per sgemm call: about 1 MiB of f32 (one L2), at least 64 rows so
// sgemm has a useful width, a multiple of 16.
int64_t gemm_block_rows(int64_t n_in) {
  const int64_t rows = ((int64_t{1} << 20) / (n_in * int64_t{sizeof(float)})) / 16 * 16;
  return std::max<int64_t>(64, rows);
}

}  // namespace

bool cpu_has_f16c() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) != 0 && (ecx & bit_F16C) != 0;
#else
  return false;
#endif
}

const KernelIsa& kernel_isa() { return *isa_current().load(std::memory_order_relaxed); }

void matmul_fused(const MatrixView& w, const float* x, int64_t n, float* y) {
  if (matmul_trivial(w, x, n, y)) return;
  const KernelIsa& isa = kernel_isa();
  // Each thread takes one contiguous range of output rows, cut at multiples of 16 rows so that
  // threads write disjoint cache lines of y (when y is 64-byte aligned).
  constexpr int64_t ROW_UNIT = 16;
  const int64_t n_units = (w.n_out + ROW_UNIT - 1) / ROW_UNIT;
  const bool parallel = n * w.n_in * w.n_out >= PARALLEL_MIN_MACS && n_units > 1;
#pragma omp parallel if (parallel)
  {
    const int64_t n_threads = omp_get_num_threads();
    const int64_t t = omp_get_thread_num();
    const int64_t r0 = std::min(w.n_out, n_units * t / n_threads * ROW_UNIT);
    const int64_t r1 = std::min(w.n_out, n_units * (t + 1) / n_threads * ROW_UNIT);
    if (r0 < r1) isa.matvec(w, x, n, y, r0, r1);
  }
}

void matmul_gemm(const MatrixView& w, const float* x, int64_t n, float* y) {
  if (matmul_trivial(w, x, n, y)) return;
  if (w.type == DType::F32) {
    sgemm_xwt(x, n, static_cast<const float*>(w.data), w.n_out, w.n_in, y, w.n_out);
    return;
  }
  const KernelIsa& isa = kernel_isa();
  const int64_t block_rows = std::min(w.n_out, gemm_block_rows(w.n_in));
  thread_local std::vector<float> scratch;  // [block_rows][n_in]
  scratch.resize(static_cast<size_t>(block_rows * w.n_in));
  float* block = scratch.data();
  for (int64_t r0 = 0; r0 < w.n_out; r0 += block_rows) {
    const int64_t n_rows = std::min(block_rows, w.n_out - r0);
#pragma omp parallel for schedule(static) if (n_rows * w.n_in >= PARALLEL_MIN_MACS)
    for (int64_t r = 0; r < n_rows; ++r) {
      isa.dequantize_row(w.type, w.row(r0 + r), block + r * w.n_in, w.n_in);
    }
    sgemm_xwt(x, n, block, n_rows, w.n_in, y + r0, w.n_out);
  }
}

}  // namespace detail

void matmul(const MatrixView& w, const float* x, int64_t n, float* y) {
  if (n <= detail::MATMUL_FUSED_MAX_N) {
    detail::matmul_fused(w, x, n, y);
  } else {
    detail::matmul_gemm(w, x, n, y);
  }
}

void matrix_get_row(const MatrixView& w, int64_t r, float* dst) {
  BP_ASSERT(r >= 0 && r < w.n_out);
  detail::kernel_isa().dequantize_row(w.type, w.row(r), dst, w.n_in);
}

const char* kernels_isa() { return detail::kernel_isa().name; }

bool kernels_force_isa(std::string_view name) {
  const detail::KernelIsa* t = detail::isa_by_name(name);
  if (t == nullptr) return false;
  detail::isa_current().store(t, std::memory_order_relaxed);
  return true;
}

}  // namespace backprompt
