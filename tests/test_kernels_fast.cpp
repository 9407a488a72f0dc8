// The speed-oriented kernel entry points against the plain ones: matmul_many against one matmul
// per target, the SIMD activation functions against the portable ones, and the optional bf16
// arithmetic (MatmulPrecision::BF16, every weight type) against exact f32 within bf16's rounding.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "backprompt/model.h"
#include "model/runtime.h"
#include "tensor/kernels.h"
#include "tensor/kernels_simd.h"
#include "test_util.h"

namespace bp = backprompt;
using bp::DType;
using bp::testing::random_normal;
using bp::testing::random_tokens;

namespace {

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
    for (int64_t i = 0; i < 3; ++i) w.push_back(quantized(t, random_normal(n_in * n_outs[i], 10 + static_cast<uint32_t>(i)), n_in));
    for (int64_t n : {1, 3, 40}) {
      const std::vector<float> x = random_normal(n * n_in, 3);
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
    std::vector<float> x = random_normal(n, 5, 3.0f), up = random_normal(n, 6);
    x[0] = n > 1 ? -90.0f : x[0];  // saturated exponentials
    if (n > 2) x[1] = 90.0f;
    std::vector<float> want_silu = x, got_silu = x, want_gelu = x, got_gelu = x;
    bp::detail::silu_mul_portable(want_silu.data(), up.data(), n);
    bp::detail::gelu_tanh_portable(want_gelu.data(), nullptr, n);
    bp::silu_mul(got_silu.data(), up.data(), n);
    bp::gelu_tanh(got_gelu.data(), n);
    std::vector<float> biased = x, got_biased = x;  // GELU(x + b) in one pass: the bits of adding first
    for (int64_t i = 0; i < n; ++i) biased[static_cast<size_t>(i)] += up[static_cast<size_t>(i)];
    bp::gelu_tanh(biased.data(), n);
    bp::gelu_tanh(got_biased.data(), up.data(), n);
    EXPECT_EQ(got_biased, biased) << "biased gelu n=" << n;
    for (int64_t i = 0; i < n; ++i) {
      const size_t k = static_cast<size_t>(i);
      EXPECT_NEAR(got_silu[k], want_silu[k], 1e-6 * std::max(1.0f, std::abs(want_silu[k]))) << "silu n=" << n << " i=" << i;
      EXPECT_NEAR(got_gelu[k], want_gelu[k], 1e-6 * std::max(1.0f, std::abs(want_gelu[k]))) << "gelu n=" << n << " i=" << i;
    }
  }
  EXPECT_EQ(bp::kernels_isa(), saved);
}

// Every kernel table's norms and RoPE rotation give the portable ones' bits (the model's results
// do not depend on the instruction set there), including tails, in place, and a row with a large
// offset.
TEST(KernelsFast, RowKernelsMatchPortableBitForBit) {
  const std::string saved = bp::kernels_isa();
  for (const char* isa : {"scalar", "avx2", "avx512"}) {
    if (!bp::kernels_force_isa(isa)) continue;
    for (int64_t n : {1, 7, 8, 9, 16, 17, 100, 768}) {
      std::vector<float> x = random_normal(n, 20 + static_cast<uint32_t>(n), 3.0f);
      for (float& v : x) v += 1000.0f;  // LayerNorm's variance about a far-off mean
      const std::vector<float> w = random_normal(n, 21), b = random_normal(n, 22);
      std::vector<float> want(static_cast<size_t>(n)), got(static_cast<size_t>(n)), in_place = x;
      bp::detail::rms_norm_row_portable(x.data(), want.data(), n, w.data(), 1e-5f);
      bp::rms_norm_row(x.data(), got.data(), n, w.data(), 1e-5f);
      EXPECT_EQ(got, want) << isa << " rms n=" << n;
      bp::rms_norm_row(in_place.data(), in_place.data(), n, w.data(), 1e-5f);
      EXPECT_EQ(in_place, want) << isa << " rms in place n=" << n;
      bp::detail::layer_norm_row_portable(x.data(), want.data(), n, w.data(), b.data(), 1e-5f);
      bp::layer_norm_row(x.data(), got.data(), n, w.data(), b.data(), 1e-5f);
      EXPECT_EQ(got, want) << isa << " layer n=" << n;
      const std::vector<float> cs = random_normal(2 * n, 23);
      std::vector<float> rot_want = random_normal(2 * n, 24), rot_got = rot_want;
      bp::detail::rotate_pairs_portable(rot_want.data(), cs.data(), n);
      bp::rotate_pairs(rot_got.data(), cs.data(), n);
      EXPECT_EQ(rot_got, rot_want) << isa << " rotate n=" << n;
      for (const float* bias : {static_cast<const float*>(nullptr), b.data()}) {
        std::vector<float> sum_want = x, sum_got = x;
        bp::detail::add_to_portable(sum_want.data(), w.data(), bias, n);
        bp::add_to(sum_got.data(), w.data(), bias, n);
        EXPECT_EQ(sum_got, sum_want) << isa << " add_to n=" << n << (bias != nullptr ? " with bias" : "");
      }
    }
  }
  ASSERT_TRUE(bp::kernels_force_isa(saved));
}

// Sets MatmulPrecision::BF16 for its lifetime (and restores EXACT), so that a failed assertion
// cannot leave it set for the tests that follow.
struct Bf16Precision {
  Bf16Precision() { bp::kernels_set_matmul_precision(bp::MatmulPrecision::BF16); }
  ~Bf16Precision() { bp::kernels_set_matmul_precision(bp::MatmulPrecision::EXACT); }
};

// Asserts |got - exact| <= bound for every element of y[n][w.n_out], where bound is what rounding
// the activations (and, unless the weights are bf16, the weights) to bf16 allows: each factor is
// off by at most 2^-9 relative, so each product by at most 2^-9 (2^-8 + 2^-18 for both), and the
// sum by that much of sum |w x|; plus a little for f32 summation in a different order.
void expect_within_bf16_rounding(const bp::MatrixView& w, const std::vector<float>& x, int64_t n,
                                 const std::vector<float>& got, const std::vector<float>& exact, const std::string& what) {
  const double rel = w.type == DType::BF16 ? 1.0 / 512 : 1.0 / 256 + 1.0 / 262144;
  std::vector<float> wd(static_cast<size_t>(w.n_in));  // [n_in] one weight row as f32
  for (int64_t c = 0; c < w.n_out; ++c) {
    bp::dequantize_row(w.type, w.row(c), wd.data(), w.n_in);
    for (int64_t r = 0; r < n; ++r) {
      double sum_abs = 0;
      for (int64_t k = 0; k < w.n_in; ++k) sum_abs += std::abs(static_cast<double>(wd[static_cast<size_t>(k)]) * x[static_cast<size_t>(r * w.n_in + k)]);
      const size_t i = static_cast<size_t>(r * w.n_out + c);
      ASSERT_NEAR(got[i], exact[i], sum_abs * rel + 1e-5 * (1 + sum_abs)) << what << " row " << r << " col " << c;
    }
  }
}

TEST(KernelsFast, Bf16PrecisionIsCloseAndOptIn) {
  EXPECT_EQ(bp::kernels_matmul_precision(), bp::MatmulPrecision::EXACT) << "exact must be the default";
  if (!bp::kernels_bf16_native()) GTEST_SKIP() << "no native bf16 GEMM on this CPU";
  const int64_t n = 300, n_in = 256, n_out = 130;  // large enough to convert x on several threads
  const std::vector<float> wf = random_normal(n_in * n_out, 8, 0.0625f), x = random_normal(n * n_in, 9);
  const int saved_threads = omp_get_max_threads();
  for (DType t : {DType::BF16, DType::F32, DType::F16, DType::Q8_0}) {
    const std::vector<uint8_t> w = quantized(t, wf, n_in);
    const bp::MatrixView view{t, w.data(), n_in, n_out};
    std::vector<float> exact(static_cast<size_t>(n * n_out)), fast(exact.size());
    bp::matmul(view, x.data(), n, exact.data());
    for (int threads : {1, 2, 3}) {
      omp_set_num_threads(threads);
      std::fill(fast.begin(), fast.end(), std::nanf(""));
      {
        const Bf16Precision bf16;
        bp::matmul(view, x.data(), n, fast.data());
      }
      EXPECT_NE(fast, exact) << bp::dtype_name(t) << ": the bf16 path did not run";
      expect_within_bf16_rounding(view, x, n, fast, exact, std::string(bp::dtype_name(t)) + " threads=" + std::to_string(threads));
    }
  }
  omp_set_num_threads(saved_threads);
}

// matmul_many under BF16 (x rounded once for all targets) against exact products.
TEST(KernelsFast, Bf16PrecisionMatmulMany) {
  if (!bp::kernels_bf16_native()) GTEST_SKIP() << "no native bf16 GEMM on this CPU";
  const int64_t n = 70, n_in = 128;
  const int64_t n_outs[] = {64, 17, 130};
  const DType types[] = {DType::Q8_0, DType::F16, DType::BF16};  // mixed types in one call
  const std::vector<float> x = random_normal(n * n_in, 12);
  std::vector<std::vector<uint8_t>> w;
  std::vector<std::vector<float>> exact(3), got(3);
  std::vector<bp::MatmulTarget> targets;
  for (size_t i = 0; i < 3; ++i) {
    w.push_back(quantized(types[i], random_normal(n_in * n_outs[i], 20 + static_cast<uint32_t>(i), 0.1f), n_in));
    const bp::MatrixView view{types[i], w[i].data(), n_in, n_outs[i]};
    exact[i].resize(static_cast<size_t>(n * n_outs[i]));
    got[i].assign(exact[i].size(), std::nanf(""));
    bp::matmul(view, x.data(), n, exact[i].data());
    targets.push_back({view, got[i].data()});
  }
  {
    const Bf16Precision bf16;
    bp::matmul_many(targets, x.data(), n);
  }
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_NE(got[i], exact[i]) << "target " << i << ": the bf16 path did not run";
    expect_within_bf16_rounding(targets[i].w, x, n, got[i], exact[i], "target " + std::to_string(i));
  }
}

// Products from activations the caller rounded (matmul_takes_bf16, round_to_bf16,
// matmul_many_bf16) give matmul_many's bits under BF16, also where no bf16 GEMM applies (unequal
// n_in: the exact products of the rounded rows). Outside BF16, or at decode sizes, nothing takes
// bf16.
TEST(KernelsFast, Bf16PrecisionFromRoundedActivations) {
  if (!bp::kernels_bf16_native()) GTEST_SKIP() << "no native bf16 GEMM on this CPU";
  const int64_t n = 48, n_in = 96;
  EXPECT_FALSE(bp::matmul_takes_bf16(n));
  const std::vector<float> x = random_normal(n * n_in, 50);
  std::vector<uint16_t> xb(x.size());
  std::vector<std::vector<uint8_t>> w;
  std::vector<std::vector<float>> want(2), got(2);
  std::vector<bp::MatmulTarget> want_targets, got_targets;
  const DType types[] = {DType::F16, DType::Q8_0};
  for (size_t i = 0; i < 2; ++i) {
    w.push_back(quantized(types[i], random_normal(n_in * 40, 51 + static_cast<uint32_t>(i), 0.1f), n_in));
    const bp::MatrixView view{types[i], w[i].data(), n_in, 40};
    want[i].assign(static_cast<size_t>(n * 40), std::nanf(""));
    got[i].assign(want[i].size(), std::nanf(""));
    want_targets.push_back({view, want[i].data()});
    got_targets.push_back({view, got[i].data()});
  }
  std::vector<float> exact(static_cast<size_t>(n * 40));
  bp::matmul(want_targets[0].w, x.data(), n, exact.data());
  {
    const Bf16Precision bf16;
    ASSERT_TRUE(bp::matmul_takes_bf16(n));
    EXPECT_FALSE(bp::matmul_takes_bf16(bp::MATMUL_FUSED_MAX_N));
    bp::round_to_bf16(x.data(), xb.data(), n * n_in);
    bp::matmul_many(want_targets, x.data(), n);
    bp::matmul_many_bf16(got_targets, xb.data(), n);
  }
  EXPECT_NE(want[0], exact) << "the bf16 path did not run";
  for (size_t i = 0; i < 2; ++i) EXPECT_EQ(got[i], want[i]) << "target " << i;

  // A call the bf16 GEMM declines as a whole (here: one target is an empty matrix) gets one
  // matmul() per target of the rounded rows widened back to f32 (exactly).
  std::vector<float> widened(x.size()), want_fallback(static_cast<size_t>(n * 40)), got_fallback(want_fallback.size());
  for (size_t i = 0; i < widened.size(); ++i) widened[i] = bp::bf16_to_f32(xb[i]);
  float unused = 0;
  {
    const Bf16Precision bf16;
    bp::matmul(want_targets[0].w, widened.data(), n, want_fallback.data());
    const bp::MatmulTarget declined[] = {{want_targets[0].w, got_fallback.data()},
                                         {bp::MatrixView{DType::F32, &unused, n_in, 0}, &unused}};
    bp::matmul_many_bf16(declined, xb.data(), n);
  }
  EXPECT_EQ(got_fallback, want_fallback);
}

// Rows of non-bf16 weights are rounded to bf16 in panels of about 4 MiB per thread: a matrix
// wider than one panel, on one thread, crosses a panel boundary.
TEST(KernelsFast, Bf16PrecisionAcrossWeightPanels) {
  if (!bp::kernels_bf16_native()) GTEST_SKIP() << "no native bf16 GEMM on this CPU";
  const int64_t n = 40, n_in = 256, n_out = 8192 + 48;  // 4 MiB of bf16 rows is 8192 rows of 256
  const std::vector<uint8_t> w = quantized(DType::Q8_0, random_normal(n_in * n_out, 30, 0.1f), n_in);
  const std::vector<float> x = random_normal(n * n_in, 31);
  const bp::MatrixView view{DType::Q8_0, w.data(), n_in, n_out};
  std::vector<float> exact(static_cast<size_t>(n * n_out)), fast(exact.size(), std::nanf(""));
  bp::matmul(view, x.data(), n, exact.data());
  const int saved_threads = omp_get_max_threads();
  omp_set_num_threads(1);
  {
    const Bf16Precision bf16;
    bp::matmul(view, x.data(), n, fast.data());
  }
  omp_set_num_threads(saved_threads);
  EXPECT_NE(fast, exact) << "the bf16 path did not run";
  expect_within_bf16_rounding(view, x, n, fast, exact, "q8_0 one thread");
}

// Weights declared fixed (a model's) are packed on first use under BF16 (f32 and f16; bf16 and
// q8_0 stay in place) and give the products of the unpacked path: within bf16 rounding of the
// exact ones and equal to the per-call rounding's, before and after the copy is made, on 1 and 2
// threads (each thread packs its own rows). Released, the copies are gone.
TEST(KernelsFast, Bf16PackedWeights) {
  if (!bp::kernels_bf16_native()) GTEST_SKIP() << "no native bf16 GEMM on this CPU";
  const int64_t n = 40, n_in = 192, n_out = 130;
  const size_t held_before = bp::matmul_packed_bytes();
  const int saved_threads = omp_get_max_threads();
  for (DType t : {DType::F32, DType::F16, DType::BF16, DType::Q8_0}) {
    const std::vector<uint8_t> w = quantized(t, random_normal(n_in * n_out, 60, 0.1f), n_in);
    const std::vector<float> x = random_normal(n * n_in, 61);
    const bp::MatrixView view{t, w.data(), n_in, n_out};
    std::vector<float> exact(static_cast<size_t>(n * n_out)), unpacked(exact.size(), std::nanf(""));
    bp::matmul(view, x.data(), n, exact.data());
    for (int threads : {1, 2}) {
      omp_set_num_threads(threads);
      const std::string what = std::string(bp::dtype_name(t)) + " threads=" + std::to_string(threads);
      {
        const Bf16Precision bf16;
        bp::matmul(view, x.data(), n, unpacked.data());  // not declared fixed: rounded per call
        bp::matmul_weights_fixed(w);
        for (int call = 0; call < 2; ++call) {  // the first call packs, the second reads the copy
          std::vector<float> packed(exact.size(), std::nanf(""));
          bp::matmul(view, x.data(), n, packed.data());
          EXPECT_NE(packed, exact) << what << ": the bf16 path did not run";
          expect_within_bf16_rounding(view, x, n, packed, exact, what);
          for (size_t i = 0; i < packed.size(); ++i) {
            ASSERT_NEAR(packed[i], unpacked[i], 1e-5 * (1 + std::abs(unpacked[i]))) << what << " call " << call << " at " << i;
          }
        }
      }
      const bool packs = t == DType::F32 || t == DType::F16;
      EXPECT_EQ(bp::matmul_packed_bytes() > held_before, packs) << what;
      if (packs) {
        EXPECT_GE(bp::matmul_packed_bytes() - held_before, static_cast<size_t>(n_in * n_out * 2)) << what;
      }
      bp::matmul_weights_released(w);
      EXPECT_EQ(bp::matmul_packed_bytes(), held_before) << what << ": released copies still held";
    }
  }
  omp_set_num_threads(saved_threads);
}

// Decode-sized products (n <= MATMUL_FUSED_MAX_N) stay exact under BF16, for every weight type.
TEST(KernelsFast, Bf16PrecisionKeepsDecodeExact) {
  const int64_t n_in = 128, n_out = 80;
  const std::vector<float> wf = random_normal(n_in * n_out, 40, 0.1f);
  for (DType t : {DType::F32, DType::F16, DType::BF16, DType::Q8_0}) {
    const std::vector<uint8_t> w = quantized(t, wf, n_in);
    const bp::MatrixView view{t, w.data(), n_in, n_out};
    for (int64_t n : {int64_t{1}, int64_t{5}, bp::MATMUL_FUSED_MAX_N}) {
      const std::vector<float> x = random_normal(n * n_in, 41);
      std::vector<float> exact(static_cast<size_t>(n * n_out)), fast(exact.size(), std::nanf(""));
      bp::matmul(view, x.data(), n, exact.data());
      {
        const Bf16Precision bf16;
        bp::matmul(view, x.data(), n, fast.data());
      }
      ASSERT_EQ(fast, exact) << bp::dtype_name(t) << " n=" << n;
    }
  }
}

// A model's prefill under BF16 (norms, SwiGLU and GELU writing the products' bf16 input, attention
// tiles in bf16): every weight type, both architectures, within bf16's error of the exact logits
// (measured here: well under 5% of the largest logit; a wrong input buffer moves them by the size
// of the logits) and not equal to them; the same bits twice.
TEST(KernelsFast, Bf16PrecisionModelPrefill) {
  if (!bp::kernels_bf16_native()) GTEST_SKIP() << "no native bf16 GEMM on this CPU";
  for (bp::Arch arch : {bp::Arch::LLAMA, bp::Arch::GPT2}) {
    for (DType t : {DType::F32, DType::F16, DType::BF16, DType::Q8_0}) {
      const auto model = bp::Model::load(bp::testing::generated_model(arch, t, "small"));
      const std::vector<int32_t> tokens = random_tokens(model->config().n_vocab, 80, 31);
      auto prefill = [&] { return bp::Sequence(*model).append(tokens, bp::LogitsMode::ALL); };
      const std::vector<float> exact = prefill();
      std::vector<float> fast, again;
      {
        const Bf16Precision bf16;
        fast = prefill();
        again = prefill();
      }
      const std::string what = std::string(bp::arch_name(arch)) + " " + bp::dtype_name(t);
      double diff = 0, ref = 0;
      for (size_t i = 0; i < exact.size(); ++i) {
        diff = std::max(diff, static_cast<double>(std::abs(fast[i] - exact[i])));
        ref = std::max(ref, static_cast<double>(std::abs(exact[i])));
      }
      EXPECT_GT(diff, 0.0) << what << ": the bf16 path did not run";
      EXPECT_LE(diff, 0.05 * ref) << what << ": bf16 prefill strayed from the exact logits";
      EXPECT_EQ(again, fast) << what;
    }
  }
}

}  // namespace
