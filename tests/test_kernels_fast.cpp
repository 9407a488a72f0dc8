// The speed-oriented kernel entry points against the plain ones: matmul_many against one matmul
// per target, the SIMD activation functions against the portable ones, and the optional bf16
// arithmetic (MatmulPrecision::BF16) against exact f32 within bf16's rounding.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "tensor/kernels.h"
#include "tensor/kernels_simd.h"

namespace bp = backprompt;
using bp::DType;

namespace {

std::vector<float> random_floats(int64_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = normal(rng);
  return v;
}

std::vector<uint8_t> quantized(DType t, const std::vector<float>& values, int64_t n_in) {
  const int64_t n_rows = static_cast<int64_t>(values.size()) / n_in;
  std::vector<uint8_t> out(bp::dtype_row_bytes(t, n_in) * static_cast<size_t>(n_rows));
  for (int64_t r = 0; r < n_rows; ++r) {
    bp::quantize_row(t, values.data() + r * n_in, out.data() + r * bp::dtype_row_bytes(t, n_in), n_in);
  }
  return out;
}

TEST(KernelsFast, MatmulManyEqualsOneMatmulPerTarget) {
  const int64_t n_in = 96;
  const int64_t n_outs[] = {48, 17, 130};  // unequal targets, one not a multiple of 16
  for (DType t : {DType::F32, DType::F16, DType::BF16, DType::Q8_0}) {
    std::vector<std::vector<uint8_t>> w;
    for (int64_t i = 0; i < 3; ++i) w.push_back(quantized(t, random_floats(n_in * n_outs[i], 10 + static_cast<uint32_t>(i)), n_in));
    for (int64_t n : {1, 3, 40}) {
      const std::vector<float> x = random_floats(n * n_in, 3);
      std::vector<std::vector<float>> want(3), got(3);
      std::vector<bp::MatmulTarget> targets;
      for (int64_t i = 0; i < 3; ++i) {
        const bp::MatrixView view{t, w[static_cast<size_t>(i)].data(), n_in, n_outs[i]};
        want[static_cast<size_t>(i)].resize(static_cast<size_t>(n * n_outs[i]));
        got[static_cast<size_t>(i)].assign(static_cast<size_t>(n * n_outs[i]), std::nanf(""));
        bp::matmul(view, x.data(), n, want[static_cast<size_t>(i)].data());
        targets.push_back({view, got[static_cast<size_t>(i)].data()});
      }
      bp::matmul_many(targets, x.data(), n);
      for (size_t i = 0; i < 3; ++i) {
        ASSERT_EQ(got[i], want[i]) << bp::dtype_name(t) << " n=" << n << " target " << i;
      }
    }
  }
}

TEST(KernelsFast, ActivationsMatchPortable) {
  const std::string saved = bp::kernels_isa();
  for (int64_t n : {1, 15, 16, 17, 1000}) {
    std::vector<float> x = random_floats(n, 5, 3.0f), up = random_floats(n, 6);
    x[0] = n > 1 ? -90.0f : x[0];  // saturated exponentials
    if (n > 2) x[1] = 90.0f;
    std::vector<float> want_silu = x, got_silu = x, want_gelu = x, got_gelu = x;
    bp::detail::silu_mul_portable(want_silu.data(), up.data(), n);
    bp::detail::gelu_tanh_portable(want_gelu.data(), n);
    bp::silu_mul(got_silu.data(), up.data(), n);
    bp::gelu_tanh(got_gelu.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      const size_t k = static_cast<size_t>(i);
      EXPECT_NEAR(got_silu[k], want_silu[k], 1e-6 * std::max(1.0f, std::abs(want_silu[k]))) << "silu n=" << n << " i=" << i;
      EXPECT_NEAR(got_gelu[k], want_gelu[k], 1e-6 * std::max(1.0f, std::abs(want_gelu[k]))) << "gelu n=" << n << " i=" << i;
    }
  }
  EXPECT_EQ(bp::kernels_isa(), saved);
}

TEST(KernelsFast, Bf16PrecisionIsCloseAndOptIn) {
  EXPECT_EQ(bp::kernels_matmul_precision(), bp::MatmulPrecision::EXACT) << "exact must be the default";
  if (!bp::kernels_bf16_native()) GTEST_SKIP() << "no native bf16 GEMM on this CPU";
  const int64_t n = 300, n_in = 256, n_out = 130;  // large enough to convert x on several threads
  const std::vector<float> wf = random_floats(n_in * n_out, 8, 0.0625f), x = random_floats(n * n_in, 9);
  const std::vector<uint8_t> w = quantized(DType::BF16, wf, n_in);
  const bp::MatrixView view{DType::BF16, w.data(), n_in, n_out};
  std::vector<float> exact(static_cast<size_t>(n * n_out)), fast(exact.size());
  bp::matmul(view, x.data(), n, exact.data());
  const int saved_threads = omp_get_max_threads();
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    bp::kernels_set_matmul_precision(bp::MatmulPrecision::BF16);
    std::fill(fast.begin(), fast.end(), std::nanf(""));
    bp::matmul(view, x.data(), n, fast.data());
    bp::kernels_set_matmul_precision(bp::MatmulPrecision::EXACT);
    // Each activation is off by at most 2^-9 relative: the sum by at most 2^-9 sum |w x|.
    std::vector<float> wd(static_cast<size_t>(n_in * n_out));  // [n_out][n_in] the weights as f32
    for (int64_t c = 0; c < n_out; ++c) bp::dequantize_row(DType::BF16, view.row(c), wd.data() + c * n_in, n_in);
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t c = 0; c < n_out; ++c) {
        double bound = 0;
        for (int64_t k = 0; k < n_in; ++k) bound += std::abs(static_cast<double>(wd[static_cast<size_t>(c * n_in + k)]) * x[static_cast<size_t>(r * n_in + k)]);
        const size_t i = static_cast<size_t>(r * n_out + c);
        ASSERT_NEAR(fast[i], exact[i], bound / 512 + 1e-6) << "threads=" << threads << " row " << r << " col " << c;
      }
    }
  }
  omp_set_num_threads(saved_threads);
}

}  // namespace
