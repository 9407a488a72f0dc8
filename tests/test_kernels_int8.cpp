// DecodePrecision::INT8: the activations' quantization against the q8_0 rule, the VNNI products
// against integer sums computed here from the same quantized values, that matmul uses them only
// when asked and only for q8_0 weights at decode sizes, and a model decoding under INT8.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <span>
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

// Sets DecodePrecision::INT8 for its lifetime (and restores EXACT).
struct Int8Decode {
  Int8Decode() { bp::kernels_set_decode_precision(bp::DecodePrecision::INT8); }
  ~Int8Decode() { bp::kernels_set_decode_precision(bp::DecodePrecision::EXACT); }
};

// n_rows q8_0 rows of n_in values with every int8 value possible (-128 included), random f16
// scales, and every seventh block's scale zero.
std::vector<uint8_t> random_q8_rows(int64_t n_rows, int64_t n_in, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> q(-128, 127);
  std::uniform_real_distribution<float> scale(0.001f, 0.05f);
  const int64_t n_blocks = n_rows * n_in / bp::Q8_0_BLOCK;
  std::vector<bp::BlockQ8_0> blocks(static_cast<size_t>(n_blocks));
  for (int64_t b = 0; b < n_blocks; ++b) {
    bp::BlockQ8_0& blk = blocks[static_cast<size_t>(b)];
    blk.d = b % 7 == 3 ? 0 : bp::f32_to_f16(scale(rng));
    for (int8_t& v : blk.q) v = static_cast<int8_t>(q(rng));
  }
  std::vector<uint8_t> out(blocks.size() * sizeof(bp::BlockQ8_0));
  std::memcpy(out.data(), blocks.data(), out.size());
  return out;
}

// y[j][r] from the quantized values in double: sum over blocks of d_w d_x (sum of q_w q_x); and
// how far f32 arithmetic may be from it: the kernel scales partial sums (a few products each) in
// f32 and adds them in f32, each rounding off by 2^-24 of at most sum |d_w d_x q_w q_x|; 4e-6 of
// that sum is about 70 such roundings (24 blocks of 768 values take 30), and less than one unit
// d_w d_x of any one block's integer sum.
struct Reference {
  std::vector<double> y, bound;
};
Reference int8_reference(const bp::MatrixView& w, const bp::detail::QuantizedRows& x) {
  const int64_t n_blocks = w.n_in / bp::Q8_0_BLOCK;
  Reference ref;
  ref.y.resize(static_cast<size_t>(x.n * w.n_out));
  ref.bound.resize(ref.y.size());
  for (int64_t j = 0; j < x.n; ++j) {
    for (int64_t r = 0; r < w.n_out; ++r) {
      const auto* blocks = reinterpret_cast<const bp::BlockQ8_0*>(w.row(r));
      double sum = 0, sum_abs = 0;
      for (int64_t b = 0; b < n_blocks; ++b) {
        int64_t dot = 0, dot_abs = 0;
        for (int i = 0; i < bp::Q8_0_BLOCK; ++i) {
          const int64_t p = int64_t{blocks[b].q[i]} * (int64_t{x.u[static_cast<size_t>(j * w.n_in + b * bp::Q8_0_BLOCK + i)]} - 128);
          dot += p;
          dot_abs += p < 0 ? -p : p;
        }
        const double scale = static_cast<double>(bp::f16_to_f32(blocks[b].d)) * x.d[static_cast<size_t>(j * n_blocks + b)];
        sum += scale * static_cast<double>(dot);
        sum_abs += std::abs(scale) * static_cast<double>(dot_abs);
      }
      ref.y[static_cast<size_t>(j * w.n_out + r)] = sum;
      ref.bound[static_cast<size_t>(j * w.n_out + r)] = 4e-6 * sum_abs + 1e-30;
    }
  }
  return ref;
}

TEST(KernelsInt8, QuantizationFollowsTheQ8_0Rule) {
  const int64_t n_in = 7 * bp::Q8_0_BLOCK;
  std::vector<float> x = random_normal(2 * n_in, 3);
  for (int i = 0; i < bp::Q8_0_BLOCK; ++i) x[static_cast<size_t>(bp::Q8_0_BLOCK + i)] = 0.0f;  // block 1: zeros
  x[2 * bp::Q8_0_BLOCK + 5] = 1e4f;                                                         // block 2: an outlier
  x[3 * bp::Q8_0_BLOCK + 9] = std::nanf("");                                                // block 3: NaN
  x[4 * bp::Q8_0_BLOCK] = -std::numeric_limits<float>::infinity();                         // block 4: -inf
  for (int i = 0; i < bp::Q8_0_BLOCK; ++i) x[static_cast<size_t>(5 * bp::Q8_0_BLOCK + i)] = 1e-30f * (i - 16);  // tiny
  bp::detail::QuantizedRows q;
  bp::detail::quantize_rows_q8(x.data(), 2, n_in, q);
  ASSERT_EQ(q.n, 2);
  ASSERT_EQ(q.u.size(), x.size());
  ASSERT_EQ(q.d.size(), size_t{14});
  for (size_t b = 0; b < q.d.size(); ++b) {
    const float* xb = x.data() + b * bp::Q8_0_BLOCK;
    const uint8_t* ub = q.u.data() + b * bp::Q8_0_BLOCK;
    const float d = q.d[b];
    if (b == 3 || b == 4) {
      EXPECT_TRUE(std::isnan(d)) << "block " << b << " holds a non-finite value";
      continue;
    }
    float amax = 0.0f;
    for (int i = 0; i < bp::Q8_0_BLOCK; ++i) amax = std::max(amax, std::abs(xb[i]));
    EXPECT_EQ(d, amax / 127.0f) << "block " << b;
    bool reached = false;
    for (int i = 0; i < bp::Q8_0_BLOCK; ++i) {
      const int v = int{ub[i]} - 128;
      ASSERT_LE(std::abs(v), 127) << "block " << b;
      if (d == 0.0f) {
        EXPECT_EQ(v, 0) << "block " << b;
        continue;
      }
      EXPECT_LE(std::abs(xb[i] - d * static_cast<float>(v)), 0.5001f * d) << "block " << b << " value " << i;
      reached = reached || std::abs(v) == 127;
    }
    EXPECT_TRUE(d == 0.0f || reached) << "block " << b << ": its largest value must map to +-127";
  }
  // The kernels' own quantizer gives the same bytes and scales, on these blocks and on many more
  // (values on a coarse grid, so that some land exactly halfway between two steps).
  const bp::detail::KernelIsa& isa = bp::detail::kernel_isa();
  if (isa.quantize_q8 == nullptr) return;
  std::vector<float> many = random_normal(50 * n_in, 4, 3.0f);
  for (size_t i = 0; i < many.size(); i += 3) many[i] = std::round(many[i] * 8.0f) / 8.0f;
  for (const std::vector<float>* v : {&x, &many}) {
    const int64_t rows = static_cast<int64_t>(v->size()) / n_in;
    bp::detail::QuantizedRows portable, fast;
    bp::detail::quantize_rows_q8(v->data(), rows, n_in, portable);
    isa.quantize_q8(v->data(), rows, n_in, fast);
    EXPECT_EQ(fast.n, portable.n);
    EXPECT_EQ(fast.u, portable.u);
    ASSERT_EQ(fast.d.size(), portable.d.size());
    for (size_t b = 0; b < portable.d.size(); ++b) {
      EXPECT_TRUE(fast.d[b] == portable.d[b] || (std::isnan(fast.d[b]) && std::isnan(portable.d[b]))) << "block " << b;
    }
  }
}

// Every shape the kernel splits differently: one block, an odd block left after pairs, rows in
// quads (one activation row) and left over, 1 to 5 activation rows (groups of 4 and the rest),
// a range of rows inside the matrix (the rest of y untouched).
TEST(KernelsInt8, ProductsEqualIntegerSums) {
  const bp::detail::KernelIsa& isa = bp::detail::kernel_isa();
  if (isa.matvec_q8_int8 == nullptr) GTEST_SKIP() << "no int8 products in the " << isa.name << " kernels";
  for (int64_t n_in : {32, 96, 256, 768}) {
    for (int64_t n_out : {1, 7, 37}) {
      const std::vector<uint8_t> w = random_q8_rows(n_out, n_in, static_cast<uint32_t>(n_in + n_out));
      const bp::MatrixView view{DType::Q8_0, w.data(), n_in, n_out};
      for (int64_t n : {1, 2, 4, 5}) {
        bp::detail::QuantizedRows x;
        bp::detail::quantize_rows_q8(random_normal(n * n_in, static_cast<uint32_t>(n), 2.0f).data(), n, n_in, x);
        const Reference ref = int8_reference(view, x);
        const int64_t r0 = n_out > 4 ? 2 : 0, r1 = n_out > 4 ? n_out - 1 : n_out;
        std::vector<float> y(static_cast<size_t>(n * n_out), std::nanf(""));
        isa.matvec_q8_int8(view, x, y.data(), r0, r1);
        for (int64_t j = 0; j < n; ++j) {
          for (int64_t r = 0; r < n_out; ++r) {
            const size_t i = static_cast<size_t>(j * n_out + r);
            const std::string what = "n_in=" + std::to_string(n_in) + " n_out=" + std::to_string(n_out) +
                                     " n=" + std::to_string(n) + " row " + std::to_string(r) + " x " + std::to_string(j);
            if (r < r0 || r >= r1) {
              EXPECT_TRUE(std::isnan(y[i])) << what << ": outside the range, must be untouched";
            } else {
              ASSERT_NEAR(y[i], ref.y[i], ref.bound[i]) << what;
            }
          }
        }
      }
    }
  }
}

TEST(KernelsInt8, MatmulUsesItOnlyWhenAskedForQ8_0AtDecodeSizes) {
  EXPECT_EQ(bp::kernels_decode_precision(), bp::DecodePrecision::EXACT) << "exact must be the default";
  if (!bp::kernels_int8_native()) GTEST_SKIP() << "no int8 products in the " << bp::kernels_isa() << " kernels";
  const int64_t n_in = 256, n_out = 130;
  const std::vector<float> wf = random_normal(n_in * n_out, 4, 0.1f);
  const int saved_threads = omp_get_max_threads();
  for (DType t : {DType::Q8_0, DType::F16}) {
    std::vector<uint8_t> w(bp::dtype_row_bytes(t, n_in) * n_out);
    for (int64_t r = 0; r < n_out; ++r) bp::quantize_row(t, wf.data() + r * n_in, w.data() + r * bp::dtype_row_bytes(t, n_in), n_in);
    const bp::MatrixView view{t, w.data(), n_in, n_out};
    for (int64_t n : {1, 3, 40}) {
      const std::vector<float> x = random_normal(n * n_in, 5);
      std::vector<float> exact(static_cast<size_t>(n * n_out)), got(exact.size());
      bp::matmul(view, x.data(), n, exact.data());
      for (int threads : {1, 2, 3}) {
        omp_set_num_threads(threads);
        {
          const Int8Decode int8;
          bp::matmul(view, x.data(), n, got.data());
        }
        const std::string what = std::string(bp::dtype_name(t)) + " n=" + std::to_string(n) + " threads=" + std::to_string(threads);
        if (t != DType::Q8_0 || n > bp::MATMUL_FUSED_MAX_N) {
          EXPECT_EQ(got, exact) << what << ": must stay exact";
          continue;
        }
        bp::detail::QuantizedRows xq;
        bp::detail::quantize_rows_q8(x.data(), n, n_in, xq);
        const Reference ref = int8_reference(view, xq);
        for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], ref.y[i], ref.bound[i]) << what << " element " << i;
        EXPECT_NE(got, exact) << what << ": the int8 path did not run";
      }
    }
  }
  omp_set_num_threads(saved_threads);
}

// All positions' logits of `tokens` appended in pieces of the given sizes (cycled).
std::vector<float> logits_in_steps(const bp::Model& m, const std::vector<int32_t>& tokens, const std::vector<size_t>& steps) {
  bp::Sequence seq(m);
  std::vector<float> all;
  for (size_t done = 0, k = 0; done < tokens.size(); ++k) {
    const size_t step = std::min(steps[k % steps.size()], tokens.size() - done);
    const std::vector<float> got = seq.append(std::span<const int32_t>(tokens.data() + done, step), bp::LogitsMode::ALL);
    all.insert(all.end(), got.begin(), got.end());
    done += step;
  }
  return all;
}

// max |a - b| over all positions and logits, and max |b|.
struct Spread {
  double diff = 0, ref = 0;
};
Spread spread(const std::vector<float>& a, const std::vector<float>& b) {
  Spread s;
  for (size_t i = 0; i < a.size(); ++i) {
    s.diff = std::max(s.diff, static_cast<double>(std::abs(a[i] - b[i])));
    s.ref = std::max(s.ref, static_cast<double>(std::abs(b[i])));
  }
  return s;
}

// A model under INT8. Rounding activations to 8 bits is discontinuous: a difference of one f32
// rounding upstream (attention over 7 rows at once or one by one) can move a value across a
// rounding boundary, so different chunkings agree only to about the int8 error, not to the
// runtime's 1e-4 (measured here: about 1% of the largest logit either way). What must hold: the
// same chunking twice gives the same bits; the K/V cached under INT8 and reused serve logits as
// close to one-token-at-a-time decode as int8 is to exact (a wrong or stale K/V row moves them
// by the size of the logits); and INT8 stays within 5% of the exact logits, and differs from them.
TEST(KernelsInt8, ModelDecodeUnderInt8) {
  if (!bp::kernels_int8_native()) GTEST_SKIP() << "no int8 products in the " << bp::kernels_isa() << " kernels";
  for (bp::Arch arch : {bp::Arch::LLAMA, bp::Arch::GPT2}) {
    const auto model = bp::Model::load(bp::testing::generated_model(arch, DType::Q8_0, "small"));
    const int32_t V = model->config().n_vocab;
    const std::vector<int32_t> tokens = random_tokens(V, 90, 23);
    const std::vector<float> exact = logits_in_steps(*model, tokens, {1});
    std::vector<float> ones, again, mixed;
    {
      const Int8Decode int8;
      ones = logits_in_steps(*model, tokens, {1});
      again = logits_in_steps(*model, tokens, {1});
      mixed = logits_in_steps(*model, tokens, {7, 1, 32, 2, 1, 13});
    }
    const std::string name = bp::arch_name(arch);
    EXPECT_EQ(again, ones) << name << ": the same chunking must give the same bits";
    const Spread vs_exact = spread(ones, exact), chunks = spread(mixed, ones);
    EXPECT_GT(vs_exact.diff, 0.0) << name << ": the int8 path did not run";
    EXPECT_LE(vs_exact.diff, 0.05 * vs_exact.ref) << name << ": int8 decode strayed from the exact logits";
    EXPECT_LE(chunks.diff, 0.05 * chunks.ref) << name << ": cached K/V under int8 strayed from stepwise decode";
    std::printf("%s: int8 vs exact max |diff| %.3g of max |logit| %.3g; chunked vs stepwise %.3g\n", name.c_str(),
                vs_exact.diff, vs_exact.ref, chunks.diff);
  }
}

}  // namespace
