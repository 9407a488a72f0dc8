// Compute kernels used by the model runtime. All take f32 activations; weights come in any
// DType and are read in place from the mmap.
//
// Threading: matmul and matmul_many use the OpenMP thread team (omp_get_max_threads(), shared
// with oneDNN, so nothing is oversubscribed); call them from one thread at a time, outside any
// parallel region. matmul_many_part, attention_tile and the activation functions are per-thread
// pieces for callers that run their own parallel region. CPU features are detected at run time;
// every fast path has a portable one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "tensor/dtype.h"

namespace backprompt {

// A weight matrix W[n_out, n_in]: n_out rows of n_in elements of `type` (GGUF ne = {n_in, n_out}).
struct MatrixView {
  DType type = DType::F32;
  const void* data = nullptr;
  int64_t n_in = 0;
  int64_t n_out = 0;
  size_t row_bytes() const { return dtype_row_bytes(type, n_in); }
  const uint8_t* row(int64_t r) const { return static_cast<const uint8_t*>(data) + r * row_bytes(); }
};

// y[n, n_out] = x[n, n_in] · Wᵀ. x and y are row-major and do not alias.
void matmul(const MatrixView& w, const float* x, int64_t n, float* y);

// matmul() reads each weight row once for all activation rows (decode kernels, memory-bound) up
// to this many rows, and uses GEMM (compute-bound) above.
constexpr int64_t MATMUL_FUSED_MAX_N = 32;

// One product of several that share their input x: y[n, w.n_out] = x · wᵀ.
struct MatmulTarget {
  MatrixView w;
  float* y = nullptr;
};

// Every target's product of the same x[n, n_in] (all w.n_in equal): the same results as one
// matmul() per target, but at decode sizes all of them share one parallel region (one wake-up
// of the thread team instead of one per matrix), e.g. the q, k and v projections.
void matmul_many(std::span<const MatmulTarget> targets, const float* x, int64_t n);

// For use inside a parallel region whose every thread calls it (thread t of n_threads): this
// thread's share of matmul_many's products (decode-sized n, fused kernels), without any barrier.
// The share is rows [rows[i].r0, rows[i].r1) of target i's outputs (for every activation row);
// targets with the same n_out get the same row ranges. rows: [targets.size()].
struct RowRange {
  int64_t r0 = 0, r1 = 0;
};
void matmul_many_part(std::span<const MatmulTarget> targets, const float* x, int64_t n, int t, int n_threads,
                      RowRange* rows);

// dst[n_in] = row r of W as f32 (embedding lookup).
void matrix_get_row(const MatrixView& w, int64_t r, float* dst);

// One source of keys and values for attention: n rows, row t of K at k + t * stride (V alike,
// with the same stride), each row starting at the tile's first key/value head.
struct KvRowsView {
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t n = 0;
};

// Causal attention for a tile of query vectors over n_kv_heads consecutive key/value heads, each
// shared by n_group consecutive query heads (grouped-query attention). The tile's query rows are
// consecutive positions of one sequence; with n_heads = n_kv_heads * n_group, query vector i is
// row i / n_heads, head h = i % n_heads:
//   q + (i / n_heads) * ldq + h * head_dim   (its head_dim values), out alike with ldo,
// and its keys and values are columns (h / n_group) * head_dim ... + head_dim of the K/V rows.
// The keys, in order, are the rows of kv[0], kv[1], ..., kv[n_kv - 1] (an ancestor chain read in
// place, the sequence's own rows last); row r of the tile sees the first n_keys0 + r of them
// (n_keys0 >= 1).  out_i = softmax(scale * q_i · Kᵀ) V over the keys it sees.
// Several key/value heads in one tile let decode read each key row's heads contiguously.
struct AttentionTile {
  const float* q = nullptr;
  float* out = nullptr;
  int64_t ldq = 0, ldo = 0;
  int32_t n_rows = 0;
  int32_t n_kv_heads = 1;
  int32_t n_group = 1;
  int32_t head_dim = 0;
  float scale = 1.0f;
  const KvRowsView* kv = nullptr;
  int32_t n_kv = 0;
  int64_t kv_stride = 0;  // floats between consecutive rows of K (and of V)
  int64_t n_keys0 = 1;
  // Prefill tiles (16 or more query vectors of one key/value head) on CPUs with AVX512_BF16:
  // queries, keys, probabilities and values rounded to bf16 and multiplied in pairs (f32 sums and
  // softmax), about twice the speed; not exact (see MatmulPrecision::BF16, which sets it for
  // prefill-sized batches). Elsewhere, or false: f32 throughout.
  bool bf16 = false;
  // bf16 tiles with the same nonzero kv_epoch and the same sources (kv, n_kv, kv_stride, head_dim)
  // may reuse each other's bf16 copies of the keys and values, kept per thread: the caller takes a
  // new epoch (next_kv_epoch) for every set of tiles over K/V that will not change while they run
  // (attention() per call). 0: every tile rounds its own.
  uint64_t kv_epoch = 0;
  // When set, the tile stops short of its softmax's last division and writes, instead of out,
  // for query vector i at partial + i * (head_dim + 2): m, the largest scaled score it saw; l, the
  // sum of e^(s - m) over its keys; then the head_dim values of sum e^(s - m) v (out_i is their
  // quotient by l). Tiles over disjoint runs of the same keys (each run's sources a piece of the
  // chain, every row seeing its first key) are then combined by attention_merge: decode splits a
  // long context over the threads that way, each reading whole K/V rows front to back.
  float* partial = nullptr;
};

// Runs one tile on the calling thread (callers parallelise over tiles). Softmax in f32 with a
// running maximum (keys in blocks), so any number of keys fits in a fixed amount of memory.
void attention_tile(const AttentionTile& t);
// A kv_epoch never handed out before in this process (never 0).
uint64_t next_kv_epoch();

// out of tile t (its q, kv, n_keys0 and partial unused) from n_parts partial results of it over
// disjoint runs of its keys: parts[p] holds what a tile with partial = parts[p] wrote.
void attention_merge(const AttentionTile& t, const float* const* parts, int n_parts);

// Activation functions, in place, on the calling thread (callers parallelise):
// gate[i] = silu(gate[i]) * up[i]  (SwiGLU: silu(g) = g / (1 + e^-g)).
void silu_mul(float* gate, const float* up, int64_t n);
// x[i] = GELU(x[i]), tanh approximation (GPT-2): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
void gelu_tanh(float* x, int64_t n);
// x[i] = GELU(x[i] + b[i]), the same values as adding b first, in one pass.
void gelu_tanh(float* x, const float* b, int64_t n);
// Normalisation of one row of n values (x and y may be the same), statistics summed in double:
//   RMSNorm:   y = x / sqrt(mean(x^2) + eps) * w
//   LayerNorm: y = (x - mean) / sqrt(var + eps) * w + b
// Every kernel table gives the same bits.
void rms_norm_row(const float* x, float* y, int64_t n, const float* w, float eps);
void layer_norm_row(const float* x, float* y, int64_t n, const float* w, const float* b, float eps);
// RoPE's rotation of n_pairs adjacent pairs: (x[2i], x[2i+1]) by the angle whose cosine and sine
// are cs[2i], cs[2i+1]: a c - b s, a s + b c. Every kernel table gives the same bits.
void rotate_pairs(float* x, const float* cs, int64_t n_pairs);
// x[i] += a[i] (b nullptr) or x[i] += a[i] + b[i] (a + b first), for i < n. The same bits in
// every kernel table.
void add_to(float* x, const float* a, const float* b, int64_t n);

// Arithmetic matmul() and matmul_many() may use for prefill-sized products (n > MATMUL_FUSED_MAX_N;
// decode-sized products are always exact), and the model's attention for batches of that size
// (AttentionTile::bf16):
//   EXACT (default): f32 multiplies and sums on exactly converted weights; logits agree with an
//     f32 reference within 1e-4 relative.
//   BF16: for every weight type, the activations (once per call) and the weights (f32, f16 and
//     q8_0 panel by panel into per-thread scratch; bf16 used in place) are rounded to bf16, then
//     multiplied with oneDNN's bf16 GEMM (f32 sums): about 2x the f32 GEMM's throughput where the
//     CPU does bf16 natively (AVX512_BF16, AMX; elsewhere matmul stays exact). The attention of
//     such batches rounds queries, keys, probabilities and values to bf16 too (AttentionTile::bf16).
//     Not exact: logits move by up to ~1.5% of the largest one (0.8-1.4% measured on stories260K,
//     llama-110m and tinyllama-1.1b, argmax kept at 95-100% of positions: bench/SPEED.md), far
//     outside the 1e-4 the runtime is tested to.
// The initial value comes from env BACKPROMPT_MATMUL ("bf16"; anything else: exact).
// Process-wide; do not change it while kernels are running.
enum class MatmulPrecision { EXACT, BF16 };
void kernels_set_matmul_precision(MatmulPrecision p);
MatmulPrecision kernels_matmul_precision();
// Whether this CPU runs oneDNN's bf16 GEMM natively (so that MatmulPrecision::BF16 applies).
bool kernels_bf16_native();
// Whether matmul_many() of n activation rows rounds them to bf16 (BF16 applies at that size on
// this CPU). The step that produces such an input can then write it as bf16 itself
// (round_to_bf16, while the row is in cache) and call matmul_many_bf16, which saves the pass
// that rounds it: the same results.
bool matmul_takes_bf16(int64_t n);
// matmul_many() from activations already rounded to bf16: xb[n][n_in], where matmul_takes_bf16(n).
void matmul_many_bf16(std::span<const MatmulTarget> targets, const uint16_t* xb, int64_t n);
// Weights whose bytes stay as they are until matmul_weights_released(the same span): under
// MatmulPrecision::BF16, a product that reads such f32 or f16 weights keeps them packed (rounded
// to bf16, in oneDNN's own layout, each thread's rows on first use) and reads the packed copy from
// then on instead of rounding them per call. That copy costs 2 bytes per weight, kept until
// released (matmul_packed_bytes: how much is held; without memory for it, the products round per
// call as before). A model declares its weights at load and releases them when destroyed.
void matmul_weights_fixed(std::span<const uint8_t> bytes);
void matmul_weights_released(std::span<const uint8_t> bytes);
size_t matmul_packed_bytes();
// dst[i] = src[i] rounded to bf16 (nearest even) for i < n, as matmul_many() rounds its input.
void round_to_bf16(const float* src, uint16_t* dst, int64_t n);

// Arithmetic of decode-sized products (n <= MATMUL_FUSED_MAX_N) with q8_0 weights:
//   EXACT (default): f32 multiplies and sums on exactly converted weights, as for every type.
//   INT8: each activation row is quantized the way q8_0 quantizes weights (per block of 32
//     values, d = max |x| / 127 and q = round(x / d)); each block's 32 products are summed as
//     int8 x int8 -> int32 (AVX512-VNNI) and scaled by the two blocks' d in f32. That takes about
//     half the instructions of converting every weight to f32, the work that holds exact q8_0
//     decode below the memory's bandwidth. Not exact: rounding the activations to 8 bits moves
//     logits by 1.3-2.8% of the largest one (measured on stories260K, llama-110m and
//     tinyllama-1.1b: bench/SPEED.md), far outside the 1e-4 the runtime is tested to. Only where the running kernels have it (kernels_int8_native(): AVX-512 with
//     VNNI); elsewhere decode stays exact. Weights of other types are always exact.
// The initial value comes from env BACKPROMPT_DECODE ("int8"; anything else: exact).
// Process-wide; do not change it while kernels are running.
enum class DecodePrecision { EXACT, INT8 };
void kernels_set_decode_precision(DecodePrecision p);
DecodePrecision kernels_decode_precision();
// Whether the kernels in use (kernels_isa()) run DecodePrecision::INT8 (so that it applies).
bool kernels_int8_native();

// Name of the SIMD path chosen at run time ("avx512", "avx2", "scalar"), for diagnostics.
// The best path this CPU supports, unless env BACKPROMPT_ISA=scalar|avx2|avx512 asks for another
// (a path the CPU cannot run, or an unknown name, is ignored).
const char* kernels_isa();

// Force a SIMD path by name ("scalar", "avx2", "avx512"; "auto" for the best this CPU has).
// Returns false and changes nothing if the name is unknown or this CPU cannot run that path.
// For tests and benchmarks: do not call while kernels are running in another thread.
bool kernels_force_isa(std::string_view name);

}  // namespace backprompt
