// Vector math for the AVX-512 kernel files (internal to src/tensor; include only from files whose
// functions carry the AVX-512 target attribute, see kernels_avx512.cpp).
#pragma once

#if defined(__x86_64__) || defined(__i386__)

// GCC 12 warns that _mm512_undefined_*() inside its own intrinsic headers "may be used
// uninitialized" (a false positive; the value is deliberately undefined).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#define BP_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

namespace backprompt::detail {

// e^x per lane: Cody-Waite range reduction (x = n ln2 + r) and Cephes' degree-6 polynomial for
// e^r (relative error ~2e-7); arguments below -87.3 give exactly 0, above 88.7 saturate.
BP_TARGET_AVX512 inline __m512 exp_ps(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

// e^x for x <= 0 (a score minus the running maximum), relative error under 3e-6:
// x = (n + f) / log2(e) with f in [-1/2, 1/2], 2^f by a degree-4 polynomial (coefficients fitted
// here for relative error), then scaled by 2^n; -inf and anything below -87.3 give exactly 0.
// The bf16 tiles round the probabilities to bf16 (relative error up to 2^-9) anyway, so exp_ps's
// 2e-7 buys nothing there, and this takes 10 instructions against its 16.
BP_TARGET_AVX512 inline __m512 exp_nonpositive(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ);
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(0.009570094756782055f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05591785907745361f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.240247443318367f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931217908859253f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.9999992847442627f));
  return _mm512_maskz_scalef_ps(live, p, n);
}

}  // namespace backprompt::detail

#endif
