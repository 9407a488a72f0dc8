// The optional bf16 arithmetic for prefill-sized products (MatmulPrecision::BF16), for every
// weight type. One parallel region per call:
//   1. the team rounds the activations to bf16 (nearest even) once, into a buffer shared by all
//      targets of the call (matmul_many: q, k, v read the same x);
//   2. each thread takes a contiguous range of every target's weight rows and runs oneDNN's bf16
//      matmul (f32 accumulation) on it by itself (oneDNN runs sequentially inside our parallel
//      region): bf16 weights straight from the mmap (GGUF's W[n_out][n_in] is oneDNN's
//      {n_in, n_out} weights matrix in its "ba" layout, nothing copied), other types rounded to
//      bf16 panel by panel into the thread's own scratch (f32, f16, q8_0 in one pass each with
//      AVX512_BF16's conversion). No synchronisation until the end.
// One primitive per n_in, with the numbers of activation rows and weight rows given at run time
// (DNNL_RUNTIME_DIM_VAL), created on first use and kept. The f32 path (kernels.cpp) is built the
// same way, for the same reason: on a 2-core AVX-512 machine one 2-thread oneDNN bf16 matmul over
// 512 x 768 x 768 ran at ~340-430 GFLOP/s, two single-threaded ones over half the rows each at
// ~750-840 (the bf16 GEMM's peak there is ~860); runtime dimensions cost nothing measurable.
//
// Only used where oneDNN runs bf16 natively (AVX512_BF16 or AMX); elsewhere it would emulate
// bf16 more slowly than f32, so matmul stays exact.
#include <dnnl.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <dnnl.hpp>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <tuple>
#include <unordered_map>
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

// Rounding rows to bf16 (nearest even). AVX512_BF16's conversion instruction: only called when
// native_bf16(), which implies it. It treats denormal inputs as zero (so do the bf16 dot products
// that follow); the scalar tails round them.
#if defined(__x86_64__)
#define BP_TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

// 32 f32 values (lo: the first 16) as 32 bf16 at dst.
BP_TARGET_BF16 inline void store_bf16x32(uint16_t* dst, __m512 lo, __m512 hi) {
  _mm512_storeu_si512(dst, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
}

// dst[n] = bf16(src[n]).
BP_TARGET_BF16 void round_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) store_bf16x32(dst + i, _mm512_loadu_ps(src + i), _mm512_loadu_ps(src + i + 16));
  for (; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

// dst[n] = bf16(row of f16 values src[n]); n a multiple of 32 (else: false, nothing done).
BP_TARGET_BF16 bool f16_to_bf16(const uint16_t* src, uint16_t* dst, int64_t n) {
  if (n % 32 != 0) return false;
  for (int64_t i = 0; i < n; i += 32) {
    store_bf16x32(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))),
                  _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 16))));
  }
  return true;
}

// dst[n] = bf16(d * q) of n / 32 q8_0 blocks (d * q is exact in f32: one rounding).
BP_TARGET_BF16 void q8_0_to_bf16(const BlockQ8_0* src, uint16_t* dst, int64_t n) {
  for (int64_t b = 0; b < n / Q8_0_BLOCK; ++b) {
    const __m512 d = _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(src[b].d)));
    const __m512i q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src[b].q)));
    const __m512i q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src[b].q + 16)));
    store_bf16x32(dst + b * Q8_0_BLOCK, _mm512_mul_ps(d, _mm512_cvtepi32_ps(q0)), _mm512_mul_ps(d, _mm512_cvtepi32_ps(q1)));
  }
}
#else
void round_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}
bool f16_to_bf16(const uint16_t*, uint16_t*, int64_t) { return false; }
void q8_0_to_bf16(const BlockQ8_0* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(f16_to_f32(src[i / Q8_0_BLOCK].d) * src[i / Q8_0_BLOCK].q[i % Q8_0_BLOCK]);
}
#endif

// dst[n_in] = row r of w rounded to bf16 (w not bf16); tmp: [n_in] floats of scratch.
void weight_row_to_bf16(const KernelIsa& isa, const MatrixView& w, int64_t r, uint16_t* dst, float* tmp) {
  switch (w.type) {
    case DType::F32:
      round_to_bf16(reinterpret_cast<const float*>(w.row(r)), dst, w.n_in);
      return;
    case DType::Q8_0:
      q8_0_to_bf16(reinterpret_cast<const BlockQ8_0*>(w.row(r)), dst, w.n_in);
      return;
    case DType::F16:
      if (f16_to_bf16(reinterpret_cast<const uint16_t*>(w.row(r)), dst, w.n_in)) return;
      break;
    default:
      break;
  }
  isa.dequantize_row(w.type, w.row(r), tmp, w.n_in);
  round_to_bf16(tmp, dst, w.n_in);
}

// Weight rows rounded to bf16 per oneDNN call when the weights are not bf16: about 4 MiB, at
// least 64 rows, a multiple of 16. Every call packs all the activations anew, so panels must be
// wide: on a 2-core AVX-512 machine (llama-110m and tinyllama shapes, 512 rows, q8_0 weights) panels of
// 256 KiB ran at 86% of the bf16-weights speed, 1 MiB at 95%, 4 MiB at 98%, 16 MiB no better.
int64_t bf16_panel_rows(int64_t n_in) {
  const int64_t rows = ((int64_t{4} << 20) / (n_in * int64_t{sizeof(uint16_t)})) / 16 * 16;
  return std::max<int64_t>(64, rows);
}

// A oneDNN matmul xb[m][n_in] (bf16) x W[rows][n_in]ᵀ (bf16, rows of n_in contiguous) ->
// y[m][rows] (f32, rows ld_y apart), m and rows given at run time.
struct Bf16Matmul {
  dnnl::matmul prim;
  size_t scratch_bytes = 0;  // oneDNN's scratchpad, supplied by the caller (one per thread)
};

struct Bf16Gemm {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  std::mutex mu;
  std::map<int64_t, std::shared_ptr<const Bf16Matmul>> by_n_in;

  // nullptr if oneDNN has no implementation for this n_in.
  std::shared_ptr<const Bf16Matmul> primitive(int64_t n_in) {
    std::lock_guard<std::mutex> lock(mu);
    auto it = by_n_in.find(n_in);
    if (it != by_n_in.end()) return it->second;
    using dnnl::memory;
    constexpr memory::dim RT = DNNL_RUNTIME_DIM_VAL;
    std::shared_ptr<Bf16Matmul> p;
    try {
      const memory::desc src({RT, n_in}, memory::data_type::bf16, memory::format_tag::ab);
      const memory::desc wei({n_in, RT}, memory::data_type::bf16, memory::dims{1, n_in});  // "ba"
      const memory::desc dst({RT, RT}, memory::data_type::f32, memory::dims{RT, 1});
      dnnl::primitive_attr attr;
      // Our own scratchpad per thread: several threads run this primitive at once.
      attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
      const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src, wei, dst), attr, engine);
      p = std::make_shared<Bf16Matmul>(Bf16Matmul{dnnl::matmul(pd), pd.scratchpad_desc().get_size()});
    } catch (const dnnl::error&) {
      p = nullptr;
    }
    by_n_in[n_in] = p;
    return p;
  }
};

Bf16Gemm& bf16_gemm() {
  static Bf16Gemm g;
  return g;
}

// Packed weights: a thread's rows of an f32 or f16 matrix rounded to bf16, in the layout
// oneDNN's bf16 matmul reads fastest (its "any" format for that n_in and number of rows), made on
// the first product that reads them and kept, for matrices in memory declared fixed
// (matmul_weights_fixed: the model's weights). Otherwise each call rounds them to bf16 panel by
// panel. Alternating runs on a 2-core AVX-512 machine, 512-token bf16 prefills: gpt2-124m f16
// 2894-2927 -> 2996-3113 tok/s (3 pairs, each +3.5-7%), tinyllama-1.1b f16 318-343 -> 347-351
// (2 pairs), llama-110m f16 within the noise (6 pairs, -3% to +10%); the copy takes 2 bytes per
// weight (162 MiB for either small model, 1.8 GiB for tinyllama). Not done for bf16 weights,
// which oneDNN reads in place ("ba": rows of n_in): packed, llama-110m bf16 ran even (3 pairs);
// nor for q8_0, whose packed copy would be nearly twice the model.
bool packs(DType t) { return t == DType::F32 || t == DType::F16; }

struct PackedRows {
  dnnl::matmul prim;
  size_t scratch_bytes = 0;
  dnnl::memory weights;  // [n_in][rows], oneDNN's layout
};

struct PackedCache {
  std::mutex mu;
  std::vector<std::pair<const uint8_t*, const uint8_t*>> fixed;  // [begin, end) ranges declared fixed
  // By the rows' first byte, row count, row length and type.
  std::map<std::tuple<const uint8_t*, int64_t, int64_t, DType>, std::shared_ptr<const PackedRows>> rows;
  size_t bytes = 0;

  bool is_fixed(const uint8_t* p) {
    for (const auto& [b, e] : fixed) {
      if (p >= b && p < e) return true;
    }
    return false;
  }
};

PackedCache& packed_cache() {
  static PackedCache c;
  return c;
}

// Rows [r0, r0 + n_rows) of w (in memory declared fixed) packed, made now if they were not yet;
// nullptr if oneDNN offers no such product. Called by each thread for its own rows.
std::shared_ptr<const PackedRows> packed_rows(const KernelIsa& isa, const MatrixView& w, int64_t r0, int64_t n_rows) {
  PackedCache& cache = packed_cache();
  const auto key = std::make_tuple(w.row(r0), n_rows, w.n_in, w.type);
  {
    std::lock_guard<std::mutex> lock(cache.mu);
    auto it = cache.rows.find(key);
    if (it != cache.rows.end()) return it->second;
  }
  using dnnl::memory;
  constexpr memory::dim RT = DNNL_RUNTIME_DIM_VAL;
  const int64_t n_in = w.n_in;
  const dnnl::engine& engine = bf16_gemm().engine;
  std::shared_ptr<PackedRows> p;
  try {
    const memory::desc src({RT, n_in}, memory::data_type::bf16, memory::format_tag::ab);
    const memory::desc wei({n_in, n_rows}, memory::data_type::bf16, memory::format_tag::any);
    const memory::desc dst({RT, n_rows}, memory::data_type::f32, memory::dims{RT, 1});
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src, wei, dst), attr, engine);
    p = std::make_shared<PackedRows>(PackedRows{dnnl::matmul(pd), pd.scratchpad_desc().get_size(), memory(pd.weights_desc(), engine)});
    // The rows rounded to bf16 into a buffer, then reordered.
    std::vector<uint16_t> rounded(static_cast<size_t>(n_rows * n_in));
    std::vector<float> tmp(static_cast<size_t>(n_in));
    for (int64_t r = 0; r < n_rows; ++r) weight_row_to_bf16(isa, w, r0 + r, rounded.data() + r * n_in, tmp.data());
    memory from(memory::desc({n_in, n_rows}, memory::data_type::bf16, memory::format_tag::ba), engine, rounded.data());
    dnnl::stream stream(engine);
    dnnl::reorder(from, p->weights).execute(stream, from, p->weights);
    stream.wait();
  } catch (const dnnl::error&) {
    p = nullptr;  // no such product here, or no memory for it: rounded per call as before
  } catch (const std::bad_alloc&) {
    p = nullptr;
  }
  std::lock_guard<std::mutex> lock(cache.mu);
  auto [it, added] = cache.rows.emplace(key, p);
  if (added && p != nullptr) cache.bytes += p->weights.get_desc().get_size();
  return it->second;
}

// y[m][rows] (rows ld_y apart) = xb[m][n_in] · wᵀ, weights w [n_in][rows] in prim's layout, on the
// calling thread when called inside a parallel region. scratch: grown to scratch_bytes.
void run_matmul(const dnnl::matmul& prim, size_t scratch_bytes, dnnl::stream& stream, const uint16_t* xb, int64_t n,
                int64_t n_in, const dnnl::memory& wei, int64_t n_rows, float* y, int64_t ld_y, std::vector<uint8_t>& scratch) {
  using dnnl::memory;
  const dnnl::engine& engine = bf16_gemm().engine;
  const memory src(memory::desc({n, n_in}, memory::data_type::bf16, memory::format_tag::ab), engine,
                   const_cast<uint16_t*>(xb));  // read only
  const memory dst(memory::desc({n, n_rows}, memory::data_type::f32, memory::dims{ld_y, 1}), engine, y);
  std::unordered_map<int, dnnl::memory> args{{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}};
  if (scratch_bytes > 0) {
    if (scratch.size() < scratch_bytes) scratch.resize(scratch_bytes);
    args[DNNL_ARG_SCRATCHPAD] = memory(
        memory::desc({static_cast<memory::dim>(scratch_bytes)}, memory::data_type::u8, memory::format_tag::a), engine, scratch.data());
  }
  prim.execute(stream, args);
  stream.wait();
}

// run_matmul with weights wb[rows][n_in] (bf16, rows of n_in contiguous) in place.
void run_bf16_matmul(const Bf16Matmul& m, dnnl::stream& stream, const uint16_t* xb, int64_t n, int64_t n_in,
                     const void* wb, int64_t n_rows, float* y, int64_t ld_y, std::vector<uint8_t>& scratch) {
  using dnnl::memory;
  const memory wei(memory::desc({n_in, n_rows}, memory::data_type::bf16, memory::format_tag::ba), bf16_gemm().engine,
                   const_cast<void*>(wb));  // read only
  run_matmul(m.prim, m.scratch_bytes, stream, xb, n, n_in, wei, n_rows, y, ld_y, scratch);
}

}  // namespace

MatmulPrecision matmul_precision() { return precision_current().load(std::memory_order_relaxed); }

namespace {

// gemm_bf16 and gemm_bf16_rounded: x[n][n_in] f32 (rounded here by the team) or xb_in (already
// rounded; x unused). False, doing nothing, when the bf16 path does not apply.
bool run_gemm_bf16(std::span<const MatmulTarget> targets, const float* x, const uint16_t* xb_in, int64_t n) {
  if (matmul_precision() != MatmulPrecision::BF16 || !native_bf16() || targets.empty() || n <= 0) return false;
  const int64_t n_in = targets[0].w.n_in;
  int64_t n_macs = 0;
  for (const MatmulTarget& t : targets) {
    if (t.w.n_in != n_in || t.w.n_in == 0 || t.w.n_out == 0) return false;  // trivial or mixed: the exact path
    BP_ASSERT(n_in % dtype_block_size(t.w.type) == 0 && t.w.data != nullptr && t.y != nullptr);
    n_macs += n * n_in * t.w.n_out;
  }
  BP_ASSERT(x != nullptr || xb_in != nullptr);
  const std::shared_ptr<const Bf16Matmul> prim = bf16_gemm().primitive(n_in);
  if (!prim) return false;

  const std::string what = std::to_string(n) + " x " + std::to_string(n_in) + " activations";
  const uint16_t* xb = xb_in;
  uint16_t* xb_rounded = nullptr;
  if (xb == nullptr) {
    thread_local std::vector<uint16_t> xb_scratch;  // [n][n_in] activations as bf16, shared with the team
    try {
      xb_scratch.resize(static_cast<size_t>(n * n_in));
    } catch (const std::bad_alloc&) {
      throw Error(ErrorCode::OUT_OF_MEMORY, "matmul: out of memory for bf16 copies of " + what);
    }
    xb = xb_rounded = xb_scratch.data();
  }
  const KernelIsa& isa = kernel_isa();
  bool pack = true;  // every target's weights f32 or f16 and declared fixed
  {
    PackedCache& cache = packed_cache();
    std::lock_guard<std::mutex> lock(cache.mu);
    for (const MatmulTarget& t : targets) pack = pack && packs(t.w.type) && cache.is_fixed(t.w.row(0));
  }
  DnnlFailure failure;
#pragma omp parallel if (n_macs >= PARALLEL_MIN_MACS)
  {
    const int64_t n_threads = omp_get_num_threads(), t = omp_get_thread_num();
    if (xb_rounded != nullptr) {
      for (int64_t r = n * t / n_threads; r < n * (t + 1) / n_threads; ++r) round_to_bf16(x + r * n_in, xb_rounded + r * n_in, n_in);
#pragma omp barrier
    }
    thread_local std::vector<uint16_t> panel;     // [panel_rows][n_in] weights rounded to bf16
    thread_local std::vector<float> row_f32;      // [n_in] one weight row as f32
    thread_local std::vector<uint8_t> dnnl_scratch;  // oneDNN's scratchpad (run_matmul grows it)
    try {
      dnnl::stream stream(bf16_gemm().engine);
      for (size_t i = 0; i < targets.size() && !failure.failed(); ++i) {
        const MatrixView& w = targets[i].w;
        const RowRange mine = thread_rows(w.n_out, t, n_threads);  // as matmul_gemm
        const int64_t r_begin = mine.r0, r_end = mine.r1;
        if (r_begin == r_end) continue;
        if (pack) {
          if (const std::shared_ptr<const PackedRows> pr = packed_rows(isa, w, r_begin, r_end - r_begin)) {
            run_matmul(pr->prim, pr->scratch_bytes, stream, xb, n, n_in, pr->weights, r_end - r_begin, targets[i].y + r_begin,
                       w.n_out, dnnl_scratch);
            continue;
          }
        }
        if (w.type == DType::BF16) {
          run_bf16_matmul(*prim, stream, xb, n, n_in, w.row(r_begin), r_end - r_begin, targets[i].y + r_begin, w.n_out,
                          dnnl_scratch);
          continue;
        }
        const int64_t panel_rows = std::min(r_end - r_begin, bf16_panel_rows(n_in));
        panel.resize(static_cast<size_t>(panel_rows * n_in));
        row_f32.resize(static_cast<size_t>(n_in));
        for (int64_t r0 = r_begin; r0 < r_end; r0 += panel_rows) {
          const int64_t n_rows = std::min(panel_rows, r_end - r0);
          for (int64_t r = 0; r < n_rows; ++r) weight_row_to_bf16(isa, w, r0 + r, panel.data() + r * n_in, row_f32.data());
          run_bf16_matmul(*prim, stream, xb, n, n_in, panel.data(), n_rows, targets[i].y + r0, w.n_out, dnnl_scratch);
        }
      }
    } catch (const std::bad_alloc&) {
      failure.record(dnnl_out_of_memory);
    } catch (const dnnl::error& e) {
      failure.record(e.status);
    }
  }
  if (failure.failed()) failure.raise(what + " (bf16 GEMM)");
  return true;
}

}  // namespace

bool gemm_bf16(std::span<const MatmulTarget> targets, const float* x, int64_t n) {
  return run_gemm_bf16(targets, x, nullptr, n);
}

bool gemm_bf16_rounded(std::span<const MatmulTarget> targets, const uint16_t* xb, int64_t n) {
  return run_gemm_bf16(targets, nullptr, xb, n);
}

}  // namespace detail

void kernels_set_matmul_precision(MatmulPrecision p) { detail::precision_current().store(p, std::memory_order_relaxed); }

MatmulPrecision kernels_matmul_precision() { return detail::matmul_precision(); }

bool kernels_bf16_native() { return detail::native_bf16(); }

bool matmul_takes_bf16(int64_t n) {
  return n > MATMUL_FUSED_MAX_N && detail::matmul_precision() == MatmulPrecision::BF16 && detail::native_bf16();
}

void round_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  if (detail::native_bf16()) {
    detail::round_to_bf16(src, dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
  }
}

void matmul_weights_fixed(std::span<const uint8_t> bytes) {
  detail::PackedCache& cache = detail::packed_cache();
  std::lock_guard<std::mutex> lock(cache.mu);
  cache.fixed.emplace_back(bytes.data(), bytes.data() + bytes.size());
}

void matmul_weights_released(std::span<const uint8_t> bytes) {
  detail::PackedCache& cache = detail::packed_cache();
  std::lock_guard<std::mutex> lock(cache.mu);
  const uint8_t* b = bytes.data();
  const uint8_t* e = b + bytes.size();
  std::erase_if(cache.fixed, [&](const auto& r) { return r.first == b && r.second == e; });
  for (auto it = cache.rows.begin(); it != cache.rows.end();) {
    const uint8_t* p = std::get<0>(it->first);
    if (p >= b && p < e) {
      if (it->second != nullptr) cache.bytes -= it->second->weights.get_desc().get_size();
      it = cache.rows.erase(it);
    } else {
      ++it;
    }
  }
}

size_t matmul_packed_bytes() {
  detail::PackedCache& cache = detail::packed_cache();
  std::lock_guard<std::mutex> lock(cache.mu);
  return cache.bytes;
}

void matmul_many_bf16(std::span<const MatmulTarget> targets, const uint16_t* xb, int64_t n) {
  BP_ASSERT(matmul_takes_bf16(n));
  if (detail::gemm_bf16_rounded(targets, xb, n)) return;
  // The bf16 GEMM declined the call as a whole (an empty matrix, no oneDNN implementation): one
  // matmul per target of the rounded activations, widened back to f32 (exactly).
  const int64_t n_in = targets.empty() ? 0 : targets[0].w.n_in;
  std::vector<float> x(static_cast<size_t>(n * n_in));
  for (size_t i = 0; i < x.size(); ++i) x[i] = bf16_to_f32(xb[i]);
  for (const MatmulTarget& t : targets) {
    BP_ASSERT(t.w.n_in == n_in);
    detail::matmul_gemm(t.w, x.data(), n, t.y);
  }
}

}  // namespace backprompt
