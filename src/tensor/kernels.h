// Compute kernels used by the model runtime. All take f32 activations; weights come in any
// DType and are read in place from the mmap.
//
// Threading: each call uses the OpenMP thread team (omp_get_max_threads()); call from one
// thread at a time. CPU features are detected at run time; every fast path has a portable one.
#pragma once

#include <cstddef>
#include <cstdint>
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

// dst[n_in] = row r of W as f32 (embedding lookup).
void matrix_get_row(const MatrixView& w, int64_t r, float* dst);

// Name of the SIMD path chosen at run time ("avx512", "avx2", "scalar"), for diagnostics.
// The best path this CPU supports, unless env BACKPROMPT_ISA=scalar|avx2|avx512 asks for another
// (a path the CPU cannot run, or an unknown name, is ignored).
const char* kernels_isa();

// Force a SIMD path by name ("scalar", "avx2", "avx512"; "auto" for the best this CPU has).
// Returns false and changes nothing if the name is unknown or this CPU cannot run that path.
// For tests and benchmarks: do not call while kernels are running in another thread.
bool kernels_force_isa(std::string_view name);

}  // namespace backprompt
