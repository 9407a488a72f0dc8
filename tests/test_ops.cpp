// The row-wise operations of model/ops.h against double-precision references written from their
// definitions, and RoPE on pieces of a row (the decode schedule's shares) against the whole row.
#include <gtest/gtest.h>

#include <omp.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "model/ops.h"
#include "tensor/kernels.h"
#include "test_util.h"

namespace bp = backprompt;
using bp::testing::random_normal;

namespace {

TEST(Ops, RmsNormMatchesDoubleReference) {
  for (int64_t n : {1, 7, 8, 9, 64, 768, 2050}) {
    const int64_t rows = 3;
    const std::vector<float> x = random_normal(rows * n, 1 + static_cast<uint32_t>(n), 3.0f), w = random_normal(n, 2);
    std::vector<float> y(static_cast<size_t>(rows * n));
    bp::ops::rms_norm(x.data(), y.data(), rows, n, w.data(), 1e-5f);
    for (int64_t r = 0; r < rows; ++r) {
      double ss = 0;
      for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[r * n + i]) * x[r * n + i];
      const double inv = 1.0 / std::sqrt(ss / n + 1e-5);
      for (int64_t i = 0; i < n; ++i) {
        const double want = x[r * n + i] * inv * w[i];
        ASSERT_NEAR(y[r * n + i], want, 1e-6 * (std::fabs(want) + 1e-3)) << "n=" << n << " row " << r << " i=" << i;
      }
    }
    std::vector<float> in_place = x;  // y may be x
    bp::ops::rms_norm(in_place.data(), in_place.data(), rows, n, w.data(), 1e-5f);
    ASSERT_EQ(std::memcmp(in_place.data(), y.data(), y.size() * sizeof(float)), 0) << "n=" << n;
  }
}

TEST(Ops, LayerNormMatchesDoubleReference) {
  for (int64_t n : {1, 7, 8, 9, 64, 768, 2050}) {
    std::vector<float> x = random_normal(2 * n, 3 + static_cast<uint32_t>(n), 2.0f);
    for (float& f : x) f += 5.0f;  // a large mean: the variance must not lose it
    const std::vector<float> w = random_normal(n, 4), b = random_normal(n, 5);
    std::vector<float> y(x.size());
    bp::ops::layer_norm(x.data(), y.data(), 2, n, w.data(), b.data(), 1e-5f);
    for (int64_t r = 0; r < 2; ++r) {
      double mean = 0, var = 0;
      for (int64_t i = 0; i < n; ++i) mean += x[r * n + i];
      mean /= n;
      for (int64_t i = 0; i < n; ++i) var += (x[r * n + i] - mean) * (x[r * n + i] - mean);
      var /= n;
      for (int64_t i = 0; i < n; ++i) {
        const double want = (x[r * n + i] - mean) / std::sqrt(var + 1e-5) * w[i] + b[i];
        ASSERT_NEAR(y[r * n + i], want, 2e-6 * (std::fabs(want) + 1.0)) << "n=" << n << " row " << r << " i=" << i;
      }
    }
  }
}

// add_norm: the residual add and the norm in one pass give the bits of add / add_residual and then
// rms_norm / layer_norm, with y in place of delta or a separate buffer, and as bf16 the rounding of
// those bits.
TEST(Ops, AddNormEqualsAddThenNorm) {
  const int64_t rows = 5, n = 40;
  const std::vector<float> x0 = random_normal(rows * n, 60, 2.0f), delta = random_normal(rows * n, 61),
                           bias = random_normal(n, 62), w = random_normal(n, 63), b = random_normal(n, 64);
  for (bool layer : {false, true}) {
    for (bool with_bias : {false, true}) {
      const bp::ops::Norm norm{w.data(), layer ? b.data() : nullptr, 1e-5f};
      std::vector<float> want_x = x0, want_y(x0.size());
      if (with_bias) {
        bp::ops::add_residual(want_x.data(), delta.data(), rows, n, bias.data());
      } else {
        bp::ops::add(want_x.data(), delta.data(), rows * n);
      }
      if (layer) {
        bp::ops::layer_norm(want_x.data(), want_y.data(), rows, n, w.data(), b.data(), 1e-5f);
      } else {
        bp::ops::rms_norm(want_x.data(), want_y.data(), rows, n, w.data(), 1e-5f);
      }
      const float* db = with_bias ? bias.data() : nullptr;
      std::vector<float> x = x0, y_in_delta = delta;  // y in place of delta
      bp::ops::add_norm(x.data(), y_in_delta.data(), db, norm, y_in_delta.data(), nullptr, rows, n);
      EXPECT_EQ(x, want_x) << layer << with_bias;
      EXPECT_EQ(y_in_delta, want_y) << layer << with_bias;
      x = x0;
      std::vector<uint16_t> yb(x0.size());
      bp::ops::add_norm(x.data(), delta.data(), db, norm, nullptr, yb.data(), rows, n);
      EXPECT_EQ(x, want_x) << layer << with_bias;
      std::vector<uint16_t> want_b(x0.size());
      bp::round_to_bf16(want_y.data(), want_b.data(), rows * n);
      EXPECT_EQ(yb, want_b) << layer << with_bias;
    }
  }
  // No delta: the norm alone.
  std::vector<float> x = x0, y(x0.size()), want(x0.size());
  bp::ops::add_norm(x.data(), nullptr, nullptr, {w.data(), nullptr, 1e-5f}, y.data(), nullptr, rows, n);
  bp::ops::rms_norm(x0.data(), want.data(), rows, n, w.data(), 1e-5f);
  EXPECT_EQ(x, x0);
  EXPECT_EQ(y, want);
}

TEST(Ops, RopeMatchesDefinitionAndPiecesMatchWholeRow) {
  struct Case {
    int32_t n_heads, head_dim, rope_dim;
  };
  for (const Case& c : {Case{4, 64, 64}, Case{3, 64, 32}, Case{2, 10, 6}}) {
    const int32_t pos = 37, n_pairs = c.rope_dim / 2;
    std::vector<float> cs(static_cast<size_t>(2 * n_pairs));
    bp::ops::rope_angles(&pos, 1, c.rope_dim, 10000.0f, cs.data());
    const int64_t n = static_cast<int64_t>(c.n_heads) * c.head_dim;
    const std::vector<float> x = random_normal(n, 7);

    std::vector<float> whole = x;
    bp::ops::rope(whole.data(), c.n_heads, c.head_dim, c.rope_dim, cs.data());
    for (int32_t h = 0; h < c.n_heads; ++h) {
      for (int32_t d = 0; d < c.head_dim; d += 2) {
        const int64_t e = static_cast<int64_t>(h) * c.head_dim + d;
        double a = x[e], b = x[e + 1];
        if (d < c.rope_dim) {
          const double theta = pos * std::pow(10000.0, -static_cast<double>(d) / c.rope_dim);
          const double ra = a * std::cos(theta) - b * std::sin(theta), rb = a * std::sin(theta) + b * std::cos(theta);
          a = ra;
          b = rb;
        }
        ASSERT_NEAR(whole[e], a, 1e-5) << "head " << h << " d=" << d;
        ASSERT_NEAR(whole[e + 1], b, 1e-5) << "head " << h << " d=" << d;
      }
    }

    // Any split into even-bounded pieces (shares of the decode schedule) gives the same bits.
    for (int64_t step : {2, 6, 16, 34, 64}) {
      std::vector<float> pieces = x;
      for (int64_t e0 = 0; e0 < n; e0 += step) {
        bp::ops::rope_range(pieces.data(), e0, std::min(n, e0 + step), c.head_dim, c.rope_dim, cs.data());
      }
      ASSERT_EQ(std::memcmp(pieces.data(), whole.data(), whole.size() * sizeof(float)), 0)
          << "head_dim " << c.head_dim << " rope_dim " << c.rope_dim << " pieces of " << step;
    }
  }
}

// The team barrier: in each round every thread writes its slot, meets the others, and must then
// read every slot of this round (none left from the last), for 2 and 3 threads (3 on 2 cores: a
// thread is often descheduled while the others wait, so the futex path runs as well).
TEST(TeamBarrier, EveryThreadSeesEveryWriteFromBeforeTheBarrier) {
  for (int n_threads : {2, 3}) {
    bp::ops::TeamBarrier barrier;
    std::vector<int64_t> slots(static_cast<size_t>(n_threads) * 16, -1);  // a cache line per thread
    std::atomic<int64_t> stale{0}, team_size{0};
    constexpr int64_t ROUNDS = 1000;
#pragma omp parallel num_threads(n_threads)
    {
      const int t = omp_get_thread_num(), n = omp_get_num_threads();
      if (t == 0) team_size = n;
      for (int64_t round = 0; round < ROUNDS; ++round) {
        slots[static_cast<size_t>(t) * 16] = round;
        barrier.wait(n);
        for (int u = 0; u < n; ++u) {
          if (slots[static_cast<size_t>(u) * 16] != round) ++stale;
        }
        barrier.wait(n);  // nobody writes the next round's value before everyone has read
      }
    }
    EXPECT_EQ(stale.load(), 0) << n_threads << " threads";
    if (team_size.load() < 2) GTEST_SKIP() << "OpenMP gave a team of one thread";
  }
}

}  // namespace
