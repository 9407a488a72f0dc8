// matmul and matrix_get_row: picks the instruction set once, then one of two strategies:
//
//   n <= MATMUL_FUSED_MAX_N (decode, small batches): our fused kernels, parallel over output rows,
//     each weight row read once from memory and dotted with every activation row (memory-bound);
//     matmul_many runs several such products (q, k, v) in one parallel region. Under
//     DecodePrecision::INT8, q8_0 weights go to the int8 products instead (kernels_int8*.cpp);
//   larger n (prefill, batches): oneDNN sgemm (compute-bound). Each thread takes a contiguous
//     range of weight rows and multiplies it with its own single-threaded sgemm calls: f32
//     weights in place, other types dequantized panel by panel into the thread's scratch. No
//     synchronisation between panels; measured on a 2-core machine, llama-110m pp512: 1.6x
//     faster than one 2-thread sgemm per f32 matrix, and than parallel dequantize + sgemm per panel.
//     Under MatmulPrecision::BF16, every weight type goes to oneDNN's bf16 matmul instead, split
//     the same way (kernels_gemm_bf16.cpp).
//
// Threads: everything uses the OpenMP team (libgomp, shared with oneDNN). oneDNN is only called
// outside our parallel regions (it brings its own team) or inside one (it runs sequentially:
// nested parallelism is off), so nothing is oversubscribed.
#include "tensor/kernels.h"

#include <dnnl.h>
#include <dnnl_debug.h>
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

// Products matmul_many takes at once (q, k, v).
constexpr size_t MAX_TARGETS = 8;

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
  const MatmulTarget target{w, y};
  matmul_fused_many(std::span<const MatmulTarget>(&target, 1), x, n);
}

void matmul_fused_many(std::span<const MatmulTarget> targets, const float* x, int64_t n) {
  int64_t n_macs = 0;
  for (const MatmulTarget& t : targets) n_macs += n * t.w.n_in * t.w.n_out;
#pragma omp parallel if (n_macs >= PARALLEL_MIN_MACS)
  {
    RowRange rows[MAX_TARGETS];
    matmul_many_part(targets, x, n, omp_get_thread_num(), omp_get_num_threads(), rows);
  }
}

void matmul_gemm(const MatrixView& w, const float* x, int64_t n, float* y) {
  if (matmul_trivial(w, x, n, y)) return;
  const MatmulTarget target{w, y};
  if (gemm_bf16(std::span<const MatmulTarget>(&target, 1), x, n)) return;
  // Each thread takes a contiguous range of weight rows (output columns) and walks it in
  // panels: f32 weights are used in place, others dequantized into the thread's own scratch;
  // then a single-threaded sgemm per panel (oneDNN runs sequentially inside our parallel
  // region). No synchronisation until the end.
  const KernelIsa& isa = kernel_isa();
  DnnlFailure failure;
#pragma omp parallel if (n * w.n_in * w.n_out >= PARALLEL_MIN_MACS && w.n_out > 16)
  {
    const RowRange mine = thread_rows(w.n_out, omp_get_thread_num(), omp_get_num_threads());
    const int64_t r_begin = mine.r0, r_end = mine.r1;
    const bool in_place = w.type == DType::F32;
    const int64_t panel_rows = in_place ? r_end - r_begin : std::min(r_end - r_begin, gemm_block_rows(w.n_in));
    thread_local std::vector<float> scratch;  // [panel_rows][n_in] dequantized weights
    if (!in_place && panel_rows > 0 && scratch.size() < static_cast<size_t>(panel_rows * w.n_in)) {
      try {
        scratch.resize(static_cast<size_t>(panel_rows * w.n_in));
      } catch (const std::bad_alloc&) {
        failure.record(dnnl_out_of_memory);
      }
    }
    for (int64_t r0 = r_begin; r0 < r_end && !failure.failed(); r0 += panel_rows) {
      const int64_t n_rows = std::min(panel_rows, r_end - r0);
      const float* panel = reinterpret_cast<const float*>(w.row(r0));
      if (!in_place) {
        for (int64_t r = 0; r < n_rows; ++r) isa.dequantize_row(w.type, w.row(r0 + r), scratch.data() + r * w.n_in, w.n_in);
        panel = scratch.data();
      }
      const dnnl_status_t st = dnnl_sgemm('N', 'T', n, n_rows, w.n_in, 1.0f, x, w.n_in, panel, w.n_in, 0.0f, y + r0, w.n_out);
      if (st != dnnl_success) failure.record(st);
    }
  }
  if (failure.failed()) {
    failure.raise(std::to_string(n) + " x " + std::to_string(w.n_in) + " activations times " + std::to_string(w.n_out) +
                  " weight rows (sgemm)");
  }
}

void DnnlFailure::record(int dnnl_status) {
  int none = 0;
  status_.compare_exchange_strong(none, dnnl_status, std::memory_order_relaxed);
}

void DnnlFailure::raise(const std::string& what) const {
  const auto st = static_cast<dnnl_status_t>(status_.load(std::memory_order_relaxed));
  if (st == dnnl_out_of_memory) throw Error(ErrorCode::OUT_OF_MEMORY, "matmul: out of memory for " + what);
  throw Error(ErrorCode::UNSUPPORTED, "matmul: oneDNN failed (" + std::string(dnnl_status2str(st)) + ") on " + what);
}

}  // namespace detail

void matmul(const MatrixView& w, const float* x, int64_t n, float* y) {
  if (n <= MATMUL_FUSED_MAX_N) {
    detail::matmul_fused(w, x, n, y);
  } else {
    detail::matmul_gemm(w, x, n, y);
  }
}

void matmul_many_part(std::span<const MatmulTarget> targets, const float* x, int64_t n, int t, int n_threads,
                      RowRange* rows) {
  // Each target's rows split by detail::thread_rows.
  BP_ASSERT(targets.size() <= detail::MAX_TARGETS && t >= 0 && t < n_threads);
  const detail::KernelIsa& isa = detail::kernel_isa();
  // DecodePrecision::INT8: x quantized once here for all q8_0 targets (they share n_in).
  thread_local detail::QuantizedRows xq;
  const bool int8 = isa.matvec_q8_int8 != nullptr && detail::decode_precision() == DecodePrecision::INT8;
  bool quantized = false;
  for (size_t i = 0; i < targets.size(); ++i) {
    const MatrixView& w = targets[i].w;
    rows[i] = detail::thread_rows(w.n_out, t, n_threads);
    if (n == 0 || w.n_out == 0 || rows[i].r0 == rows[i].r1) continue;
    if (w.n_in == 0) {  // an empty sum
      for (int64_t j = 0; j < n; ++j) std::fill(targets[i].y + j * w.n_out + rows[i].r0, targets[i].y + j * w.n_out + rows[i].r1, 0.0f);
      continue;
    }
    BP_ASSERT(w.n_in % dtype_block_size(w.type) == 0 && x != nullptr && targets[i].y != nullptr && w.data != nullptr);
    if (int8 && w.type == DType::Q8_0) {
      if (!quantized) isa.quantize_q8(x, n, w.n_in, xq);
      quantized = true;
      isa.matvec_q8_int8(w, xq, targets[i].y, rows[i].r0, rows[i].r1);
    } else {
      isa.matvec(w, x, n, targets[i].y, rows[i].r0, rows[i].r1);
    }
  }
}

void matmul_many(std::span<const MatmulTarget> targets, const float* x, int64_t n) {
  if (n <= MATMUL_FUSED_MAX_N) {
    detail::matmul_fused_many(targets, x, n);
  } else if (!detail::gemm_bf16(targets, x, n)) {
    for (const MatmulTarget& t : targets) detail::matmul_gemm(t.w, x, n, t.y);
  }
}

void matrix_get_row(const MatrixView& w, int64_t r, float* dst) {
  BP_ASSERT(r >= 0 && r < w.n_out);
  detail::kernel_isa().dequantize_row(w.type, w.row(r), dst, w.n_in);
}

void silu_mul(float* gate, const float* up, int64_t n) { detail::kernel_isa().silu_mul(gate, up, n); }

void gelu_tanh(float* x, int64_t n) { detail::kernel_isa().gelu_tanh(x, nullptr, n); }

void gelu_tanh(float* x, const float* b, int64_t n) { detail::kernel_isa().gelu_tanh(x, b, n); }

void rms_norm_row(const float* x, float* y, int64_t n, const float* w, float eps) {
  detail::kernel_isa().rms_norm_row(x, y, n, w, eps);
}

void layer_norm_row(const float* x, float* y, int64_t n, const float* w, const float* b, float eps) {
  detail::kernel_isa().layer_norm_row(x, y, n, w, b, eps);
}

void rotate_pairs(float* x, const float* cs, int64_t n_pairs) { detail::kernel_isa().rotate_pairs(x, cs, n_pairs); }

void add_to(float* x, const float* a, const float* b, int64_t n) { detail::kernel_isa().add_to(x, a, b, n); }

const char* kernels_isa() { return detail::kernel_isa().name; }

bool kernels_force_isa(std::string_view name) {
  const detail::KernelIsa* t = detail::isa_by_name(name);
  if (t == nullptr) return false;
  detail::isa_current().store(t, std::memory_order_relaxed);
  return true;
}

}  // namespace backprompt
