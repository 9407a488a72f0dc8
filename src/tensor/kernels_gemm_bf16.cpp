// The optional bf16 arithmetic for prefill-sized products of bf16 weights (MatmulPrecision::BF16):
// activations rounded to bf16 (nearest even), then oneDNN's bf16 matmul (f32 accumulation)
// straight on the mmap'd weights: GGUF's W[n_out][n_in] is the {n_in, n_out} weights matrix in
// oneDNN's "ba" layout, so nothing is copied or repacked. One primitive per weight shape, with
// the number of rows given at run time (DNNL_RUNTIME_DIM_VAL), created on first use and kept.
//
// Only used where oneDNN runs bf16 natively (AVX512_BF16 or AMX); elsewhere it would emulate
// bf16 more slowly than f32, so matmul stays exact.
#include <dnnl.h>
#include <omp.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <dnnl.hpp>
#include <map>
#include <memory>
#include <mutex>
#include <string_view>
#include <utility>
#include <vector>

#include "backprompt/error.h"
#include "tensor/kernels_simd.h"

#if defined(__x86_64__)
// GCC 12's false "may be used uninitialized" inside its AVX-512 headers (see kernels_avx512.cpp).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>
#endif

namespace backprompt {

namespace detail {

namespace {

std::atomic<MatmulPrecision>& precision_current() {
  static std::atomic<MatmulPrecision> current{[] {
    const char* env = std::getenv("BACKPROMPT_MATMUL");
    return env != nullptr && std::string_view(env) == "bf16" ? MatmulPrecision::BF16 : MatmulPrecision::EXACT;
  }()};
  return current;
}

bool native_bf16() {
  static const bool ok = dnnl_get_effective_cpu_isa() >= dnnl_cpu_isa_avx512_core_bf16;
  return ok;
}

#if defined(__x86_64__)
// dst[i] = bf16(src[i]), round to nearest even (finite inputs). AVX-512: only called when
// native_bf16(), which implies it.
__attribute__((target("avx512f,avx512bw"))) void round_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  const __m512i lsb = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i u = _mm512_castps_si512(_mm512_loadu_ps(src + i));
    const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), lsb)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
  }
  for (; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}
#else
void round_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}
#endif

struct Bf16Gemm {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  std::mutex mu;
  std::map<std::pair<int64_t, int64_t>, std::shared_ptr<dnnl::matmul>> by_shape;  // (n_in, n_out)

  // nullptr if oneDNN has no implementation for this shape.
  std::shared_ptr<dnnl::matmul> primitive(int64_t n_in, int64_t n_out) {
    std::lock_guard<std::mutex> lock(mu);
    auto it = by_shape.find({n_in, n_out});
    if (it != by_shape.end()) return it->second;
    using dnnl::memory;
    std::shared_ptr<dnnl::matmul> p;
    try {
      const memory::desc src({DNNL_RUNTIME_DIM_VAL, n_in}, memory::data_type::bf16, memory::format_tag::ab);
      const memory::desc wei({n_in, n_out}, memory::data_type::bf16, memory::format_tag::ba);
      const memory::desc dst({DNNL_RUNTIME_DIM_VAL, n_out}, memory::data_type::f32, memory::format_tag::ab);
      p = std::make_shared<dnnl::matmul>(dnnl::matmul::primitive_desc(dnnl::matmul::desc(src, wei, dst), engine));
    } catch (const dnnl::error&) {
      p = nullptr;
    }
    by_shape[{n_in, n_out}] = p;
    return p;
  }
};

Bf16Gemm& bf16_gemm() {
  static Bf16Gemm g;
  return g;
}

}  // namespace

MatmulPrecision matmul_precision() { return precision_current().load(std::memory_order_relaxed); }

bool gemm_bf16(const MatrixView& w, const float* x, int64_t n, float* y) {
  if (w.type != DType::BF16 || matmul_precision() != MatmulPrecision::BF16 || !native_bf16()) return false;
  std::shared_ptr<dnnl::matmul> prim = bf16_gemm().primitive(w.n_in, w.n_out);
  if (!prim) return false;

  thread_local std::vector<uint16_t> xb_scratch;  // [n][n_in] activations as bf16
  xb_scratch.resize(static_cast<size_t>(n * w.n_in));
  uint16_t* xb = xb_scratch.data();  // this thread's buffer, shared with the team below
  const int64_t n_in = w.n_in;
#pragma omp parallel for schedule(static) if (n * n_in >= (1 << 16))
  for (int64_t r = 0; r < n; ++r) round_to_bf16(x + r * n_in, xb + r * n_in, n_in);

  using dnnl::memory;
  Bf16Gemm& g = bf16_gemm();
  try {
    const memory src(memory::desc({n, n_in}, memory::data_type::bf16, memory::format_tag::ab), g.engine, xb);
    const memory wei(memory::desc({n_in, w.n_out}, memory::data_type::bf16, memory::format_tag::ba), g.engine,
                     const_cast<void*>(w.data));  // read only
    const memory dst(memory::desc({n, w.n_out}, memory::data_type::f32, memory::format_tag::ab), g.engine, y);
    dnnl::stream stream(g.engine);
    prim->execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}});
    stream.wait();
  } catch (const dnnl::error& e) {
    throw Error(ErrorCode::OUT_OF_MEMORY, std::string("matmul: oneDNN bf16 matmul failed (") + e.what() + ") on " +
                                              std::to_string(n) + " x " + std::to_string(n_in) + " activations");
  }
  return true;
}

}  // namespace detail

void kernels_set_matmul_precision(MatmulPrecision p) { detail::precision_current().store(p, std::memory_order_relaxed); }

MatmulPrecision kernels_matmul_precision() { return detail::matmul_precision(); }

bool kernels_bf16_native() { return detail::native_bf16(); }

}  // namespace backprompt
