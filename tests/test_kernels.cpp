// Element types and compute kernels against independent references:
//   - f16/bf16 conversions against an exhaustive nearest-value search done in double (and, for
//     f16, against the CPU's F16C instructions when present);
//   - Q8_0 against its error bound and GGUF's byte layout;
//   - matmul (both strategies, every type, every instruction set this CPU runs) against a scalar
//     double-precision product of the dequantized weights, and exactly on small integers.
#include <dnnl.h>
#include <dnnl_debug.h>
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "backprompt/error.h"
#include "tensor/dtype.h"
#include "tensor/kernels.h"
#include "tensor/kernels_simd.h"
#include "test_util.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace bp = backprompt;
using bp::testing::available_isas;
using bp::testing::IsaRestore;
using bp::DType;

namespace {

constexpr DType ALL_TYPES[] = {DType::F32, DType::F16, DType::BF16, DType::Q8_0};

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// ---------------------------------------------------------------------------------------------
// Reference conversions, written from the format definitions in double precision.

// The value of an f16 bit pattern: (-1)^s * 2^(e-15) * (1 + m/1024), or m * 2^-24 when e == 0.
double f16_value(uint16_t h) {
  const int s = h >> 15, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  double v;
  if (e == 0x1f) v = m == 0 ? std::numeric_limits<double>::infinity() : std::nan("");
  else if (e == 0) v = std::ldexp(m, -24);
  else v = std::ldexp(1.0 + m / 1024.0, e - 15);
  return s ? -v : v;
}

// Nearest of two neighbouring codes lo < hi (magnitudes va < vb) to |x|, ties to the even code.
uint16_t nearest_code(double ax, uint16_t lo, double va, uint16_t hi, double vb) {
  const double da = ax - va, db = vb - ax;
  if (da < db) return lo;
  if (db < da) return hi;
  return (lo & 1) == 0 ? lo : hi;
}

// f32 -> f16 by search: positive f16 codes are ordered like their values. Beyond the largest
// finite value 65504 the next "value" is 65536, which rounds to infinity.
uint16_t f16_reference(float f) {
  const uint16_t sign = (bits_of(f) >> 16) & 0x8000;
  const double ax = std::fabs(static_cast<double>(f));
  if (std::isnan(f)) return 0x7e00;  // any NaN; callers only test NaN-ness
  if (std::isinf(f)) return sign | 0x7c00;
  uint32_t lo = 0, hi = 0x7c00;  // invariant: value(lo) <= ax < value(hi), value(0x7c00) = 65536
  while (hi - lo > 1) {
    const uint32_t mid = (lo + hi) / 2;
    if (f16_value(static_cast<uint16_t>(mid)) <= ax) lo = mid; else hi = mid;
  }
  const double vb = hi == 0x7c00 ? 65536.0 : f16_value(static_cast<uint16_t>(hi));
  return sign | nearest_code(ax, static_cast<uint16_t>(lo), f16_value(static_cast<uint16_t>(lo)),
                             static_cast<uint16_t>(hi), vb);
}

// f32 -> bf16: the two bf16 values around f are its top 16 bits and the next code.
uint16_t bf16_reference(float f) {
  const uint32_t u = bits_of(f);
  const uint16_t sign = (u >> 16) & 0x8000;
  const uint16_t lo = (u >> 16) & 0x7fff;
  if (std::isnan(f)) return 0x7fc0;
  if (std::isinf(f)) return sign | 0x7f80;
  const uint16_t hi = lo + 1;
  const double va = std::fabs(static_cast<double>(float_of(static_cast<uint32_t>(lo) << 16)));
  const double vb = hi == 0x7f80 ? std::ldexp(1.0, 128) : std::fabs(static_cast<double>(float_of(static_cast<uint32_t>(hi) << 16)));
  return sign | nearest_code(std::fabs(static_cast<double>(f)), lo, va, hi, vb);
}

// f32 bit patterns that stress rounding: random ones of every exponent, plus values next to
// f16/bf16 rounding boundaries, ties, the subnormal range and overflow.
std::vector<float> tricky_floats(size_t n_random) {
  std::vector<float> v;
  std::mt19937 rng(42);
  for (size_t i = 0; i < n_random; ++i) v.push_back(float_of(static_cast<uint32_t>(rng())));
  for (uint32_t h = 0; h < 0x7c00; h += 7) {  // around every 7th f16 value and its midpoints
    const uint32_t b = bits_of(static_cast<float>(f16_value(static_cast<uint16_t>(h))));
    const uint32_t mid = bits_of(static_cast<float>((f16_value(static_cast<uint16_t>(h)) + f16_value(static_cast<uint16_t>(h + 1))) / 2));
    for (int32_t d = -2; d <= 2; ++d) {
      v.push_back(float_of(b + d));
      v.push_back(float_of(mid + d));
      v.push_back(-float_of(mid + d));
    }
  }
  for (uint32_t b : {0x3f808000u, 0x3f818000u, 0x3f808001u, 0x3f807fffu, 0x7f7fffffu, 0x7f7f8000u,
                     0x7f7f7fffu, 0x00008000u, 0x00018000u, 0x00000001u, 0x807fffffu}) {
    v.push_back(float_of(b));
    v.push_back(-float_of(b));
  }
  for (float f : {0.0f, -0.0f, 1.0f, 65504.0f, 65519.99f, 65520.0f, 1e10f, 5.9604645e-8f,
                  2.9802322e-8f, 2.98023259e-8f, 4.4703484e-8f}) {
    v.push_back(f);
    v.push_back(-f);
  }
  return v;
}

TEST(DType, NamesAndIds) {
  for (DType t : ALL_TYPES) {
    EXPECT_TRUE(bp::dtype_is_supported(static_cast<uint32_t>(t)));
    EXPECT_EQ(bp::dtype_from_name(bp::dtype_name(t)), t);
  }
  EXPECT_STREQ(bp::dtype_name(DType::Q8_0), "q8_0");
  EXPECT_STREQ(bp::dtype_name(DType::BF16), "bf16");
  EXPECT_EQ(static_cast<uint32_t>(DType::BF16), 30u);
  for (uint32_t id : {2u, 3u, 7u, 9u, 29u, 31u, 1000u, 0xffffffffu}) EXPECT_FALSE(bp::dtype_is_supported(id));
  EXPECT_FALSE(bp::dtype_from_name("F32").has_value());
  EXPECT_FALSE(bp::dtype_from_name("").has_value());
  EXPECT_FALSE(bp::dtype_from_name("q4_0").has_value());
}

TEST(DType, BlockSizesAndRowBytes) {
  EXPECT_EQ(bp::dtype_block_size(DType::F32), 1);
  EXPECT_EQ(bp::dtype_block_size(DType::Q8_0), 32);
  EXPECT_EQ(bp::dtype_block_bytes(DType::F16), 2u);
  EXPECT_EQ(bp::dtype_block_bytes(DType::Q8_0), 34u);
  EXPECT_EQ(bp::dtype_row_bytes(DType::F32, 7), 28u);
  EXPECT_EQ(bp::dtype_row_bytes(DType::BF16, 7), 14u);
  EXPECT_EQ(bp::dtype_row_bytes(DType::Q8_0, 0), 0u);
  EXPECT_EQ(bp::dtype_row_bytes(DType::Q8_0, 768), 24u * 34u);
}

TEST(DType, F16ToF32AllCodes) {
  for (uint32_t c = 0; c < 0x10000; ++c) {
    const uint16_t h = static_cast<uint16_t>(c);
    const float f = bp::f16_to_f32(h);
    const double want = f16_value(h);
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(f)) << "code " << c;
      ASSERT_EQ(bits_of(f) >> 31, c >> 15) << "NaN sign, code " << c;
      ASSERT_EQ(bp::f32_to_f16(f), h | 0x200) << "NaN payload kept (made quiet), code " << c;
    } else {
      ASSERT_EQ(static_cast<double>(f), want) << "code " << c;
      ASSERT_EQ(bits_of(f) >> 31, c >> 15) << "sign of zero, code " << c;
      ASSERT_EQ(bp::f32_to_f16(f), h) << "round trip, code " << c;
    }
  }
}

TEST(DType, F32ToF16RoundsToNearestEven) {
  EXPECT_EQ(bp::f32_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(bp::f32_to_f16(-2.0f), 0xc000);
  EXPECT_EQ(bp::f32_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(bp::f32_to_f16(65519.99f), 0x7bff);
  EXPECT_EQ(bp::f32_to_f16(65520.0f), 0x7c00);                     // tie -> even -> infinity
  EXPECT_EQ(bp::f32_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);  // tie -> even (down)
  EXPECT_EQ(bp::f32_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);  // tie -> even (up)
  EXPECT_EQ(bp::f32_to_f16(std::ldexp(1.0f, -24)), 0x0001);        // smallest subnormal
  EXPECT_EQ(bp::f32_to_f16(std::ldexp(1.0f, -25)), 0x0000);        // tie -> even (zero)
  EXPECT_EQ(bp::f32_to_f16(std::ldexp(3.0f, -25)), 0x0002);        // tie -> even (up)
  EXPECT_EQ(bp::f32_to_f16(std::ldexp(1023.5f, -24)), 0x0400);     // rounds up to the smallest normal
  EXPECT_EQ(bp::f32_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(bp::f32_to_f16(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(bp::f32_to_f16(-std::numeric_limits<float>::infinity()), 0xfc00);
  EXPECT_EQ(bp::f32_to_f16(std::numeric_limits<float>::denorm_min()), 0x0000);
  const uint16_t nan = bp::f32_to_f16(float_of(0x7f800001));  // signalling NaN, low payload
  EXPECT_EQ(nan & 0x7c00, 0x7c00);
  EXPECT_NE(nan & 0x3ff, 0);

  for (float f : tricky_floats(200000)) {
    const uint16_t got = bp::f32_to_f16(f);
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(bp::f16_to_f32(got))) << "bits " << std::hex << bits_of(f);
    } else {
      ASSERT_EQ(got, f16_reference(f)) << "bits " << std::hex << bits_of(f);
    }
  }
}

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("f16c"))) uint16_t f16_hardware(float f) {
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
__attribute__((target("f16c"))) float f16_hardware_to_f32(uint16_t h) { return _cvtsh_ss(h); }

// A second, independent oracle: the CPU's own conversion instructions agree bit for bit.
TEST(DType, F16MatchesF16cInstructions) {
  if (!bp::detail::cpu_has_f16c()) GTEST_SKIP() << "this CPU has no F16C";
  for (uint32_t c = 0; c < 0x10000; ++c) {
    const float want = f16_hardware_to_f32(static_cast<uint16_t>(c));
    ASSERT_EQ(bits_of(bp::f16_to_f32(static_cast<uint16_t>(c))), bits_of(want)) << "code " << c;
  }
  for (float f : tricky_floats(1000000)) {
    ASSERT_EQ(bp::f32_to_f16(f), f16_hardware(f)) << "bits " << std::hex << bits_of(f);
  }
}
#endif

TEST(DType, Bf16RoundTripAndRounding) {
  for (uint32_t c = 0; c < 0x10000; ++c) {
    const float f = bp::bf16_to_f32(static_cast<uint16_t>(c));
    ASSERT_EQ(bits_of(f), c << 16);
    if (!std::isnan(f)) ASSERT_EQ(bp::f32_to_bf16(f), c) << "code " << c;
    else ASSERT_TRUE(std::isnan(bp::bf16_to_f32(bp::f32_to_bf16(f)))) << "code " << c;
  }
  EXPECT_EQ(bp::f32_to_bf16(float_of(0x3f808000)), 0x3f80);  // tie -> even (down)
  EXPECT_EQ(bp::f32_to_bf16(float_of(0x3f818000)), 0x3f82);  // tie -> even (up)
  EXPECT_EQ(bp::f32_to_bf16(float_of(0x3f808001)), 0x3f81);
  EXPECT_EQ(bp::f32_to_bf16(float_of(0x7f7fffff)), 0x7f80);  // overflows to infinity
  EXPECT_EQ(bp::f32_to_bf16(float_of(0x00008000)), 0x0000);  // subnormal tie -> even (zero)
  EXPECT_EQ(bp::f32_to_bf16(float_of(0x7f800001)) & 0x7fff, 0x7fc0);  // NaN never becomes inf
  EXPECT_EQ(bp::f32_to_bf16(float_of(0xff800001)), 0xffc0);
  for (float f : tricky_floats(200000)) {
    const uint16_t got = bp::f32_to_bf16(f);
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(bp::bf16_to_f32(got))) << "bits " << std::hex << bits_of(f);
    } else {
      ASSERT_EQ(got, bf16_reference(f)) << "bits " << std::hex << bits_of(f);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Rows

std::vector<float> random_floats(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> v(n);
  for (float& f : v) f = u(rng);
  return v;
}

TEST(DType, QuantizeRowFloatTypes) {
  const std::vector<float> x = random_floats(37, 1, 100.0f);
  std::vector<uint8_t> buf(37 * 4);
  std::vector<float> back(37);
  bp::quantize_row(DType::F32, x.data(), buf.data(), 37);
  bp::dequantize_row(DType::F32, buf.data(), back.data(), 37);
  EXPECT_EQ(back, x);
  for (DType t : {DType::F16, DType::BF16}) {
    bp::quantize_row(t, x.data(), buf.data(), 37);
    bp::dequantize_row(t, buf.data(), back.data(), 37);
    for (int i = 0; i < 37; ++i) {
      uint16_t h;
      std::memcpy(&h, buf.data() + 2 * i, 2);
      EXPECT_EQ(h, t == DType::F16 ? bp::f32_to_f16(x[i]) : bp::f32_to_bf16(x[i])) << i;
      EXPECT_EQ(back[i], t == DType::F16 ? bp::f16_to_f32(h) : bp::bf16_to_f32(h)) << i;
    }
  }
}

TEST(DType, Q8_0Layout) {
  // Block 0: x_i = i - 16 (max |x| = 16); block 1: all zero.
  std::vector<float> x(64, 0.0f);
  for (int i = 0; i < 32; ++i) x[i] = static_cast<float>(i - 16);
  std::vector<uint8_t> buf(bp::dtype_row_bytes(DType::Q8_0, 64));
  ASSERT_EQ(buf.size(), 68u);
  bp::quantize_row(DType::Q8_0, x.data(), buf.data(), 64);
  uint16_t d0, d1;
  std::memcpy(&d0, buf.data(), 2);
  std::memcpy(&d1, buf.data() + 34, 2);
  EXPECT_EQ(d0, bp::f32_to_f16(16.0f / 127.0f));
  EXPECT_EQ(d1, 0);
  for (int i = 0; i < 32; ++i) {
    const int8_t q = static_cast<int8_t>(buf[2 + i]);
    EXPECT_EQ(q, static_cast<int8_t>(std::round((i - 16) * (127.0f / 16.0f)))) << i;
    EXPECT_EQ(static_cast<int8_t>(buf[36 + i]), 0) << i;
  }
  EXPECT_EQ(static_cast<int8_t>(buf[2]), -127);  // the largest magnitude maps to +-127
  std::vector<float> back(64);
  bp::dequantize_row(DType::Q8_0, buf.data(), back.data(), 64);
  for (int i = 0; i < 32; ++i) {
    EXPECT_EQ(back[i], bp::f16_to_f32(d0) * static_cast<int8_t>(buf[2 + i])) << i;
    EXPECT_EQ(back[32 + i], 0.0f) << i;
  }
}

TEST(DType, Q8_0ErrorBound) {
  // Blocks at very different scales. Per element, |x - d16 * q| <= d/2 (rounding of x/d) plus
  // 127 * |d - d16| (the scale stored as f16: relative error <= 2^-11 where d16 is normal, so
  // 0.57 * d in all; tiny scales become f16 subnormals and lose more).
  const int64_t n = 32 * 64;
  std::vector<float> x = random_floats(n, 7);
  for (int64_t b = 0; b < n / 32; ++b) {
    const float scale = std::ldexp(1.0f, static_cast<int>(b % 24) - 12);
    for (int i = 0; i < 32; ++i) x[b * 32 + i] *= scale;
  }
  std::vector<uint8_t> buf(bp::dtype_row_bytes(DType::Q8_0, n));
  std::vector<float> back(n);
  bp::quantize_row(DType::Q8_0, x.data(), buf.data(), n);
  bp::dequantize_row(DType::Q8_0, buf.data(), back.data(), n);
  for (int64_t b = 0; b < n / 32; ++b) {
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[b * 32 + i]));
    const double d = amax / 127.0f;
    const double d16 = bp::f16_to_f32(bp::f32_to_f16(amax / 127.0f));
    if (d >= std::ldexp(1.0, -14)) {
      ASSERT_LE(std::fabs(d - d16), std::ldexp(d, -11)) << "block " << b;
    }
    const double bound = 0.5 * d + 127 * std::fabs(d - d16);
    if (d >= std::ldexp(1.0, -14)) {
      ASSERT_LE(bound, 0.57 * d);
    }
    for (int i = 0; i < 32; ++i) {
      ASSERT_LE(std::fabs(x[b * 32 + i] - back[b * 32 + i]), bound * (1 + 1e-6)) << "block " << b << " i " << i;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Kernels: run a body under every instruction set this CPU can run, restoring the default.

TEST(Kernels, IsaSelection) {
  IsaRestore restore;
  const std::string isa = bp::kernels_isa();
  EXPECT_TRUE(isa == "scalar" || isa == "avx2" || isa == "avx512") << isa;
  EXPECT_FALSE(bp::kernels_force_isa("sse9"));
  EXPECT_EQ(bp::kernels_isa(), isa);
  for (const std::string& name : available_isas()) {
    EXPECT_TRUE(bp::kernels_force_isa(name));
    EXPECT_EQ(bp::kernels_isa(), name);
  }
  EXPECT_TRUE(bp::kernels_force_isa("auto"));
  EXPECT_EQ(bp::kernels_isa(), available_isas().back());
  std::printf("kernels ISA available: %s", available_isas().back().c_str());
  std::printf(" (default %s)\n", isa.c_str());
}

TEST(Kernels, DequantizeRowSameOnEveryIsa) {
  IsaRestore restore;
  for (DType t : ALL_TYPES) {
    for (int64_t n : {32, 64, 96, 160, 768}) {
      std::vector<float> x = random_floats(n, 3, 5.0f);
      x[0] = 0.0f;
      x[1] = -1e-6f;
      std::vector<uint8_t> buf(bp::dtype_row_bytes(t, n));
      bp::quantize_row(t, x.data(), buf.data(), n);
      std::vector<float> want(n), got(n);
      bp::dequantize_row(t, buf.data(), want.data(), n);
      for (const std::string& isa : available_isas()) {
        ASSERT_TRUE(bp::kernels_force_isa(isa));
        bp::detail::kernel_isa().dequantize_row(t, buf.data(), got.data(), n);
        ASSERT_EQ(std::memcmp(got.data(), want.data(), n * sizeof(float)), 0)
            << bp::dtype_name(t) << " n=" << n << " isa=" << isa;
        bp::MatrixView w{t, buf.data(), n, 1};
        std::fill(got.begin(), got.end(), -1.0f);
        bp::matrix_get_row(w, 0, got.data());
        ASSERT_EQ(std::memcmp(got.data(), want.data(), n * sizeof(float)), 0)
            << "matrix_get_row " << bp::dtype_name(t) << " n=" << n << " isa=" << isa;
      }
    }
  }
  // Element types with a row length that is not a multiple of the vector width.
  for (DType t : {DType::F16, DType::BF16}) {
    const int64_t n = 37;
    const std::vector<float> x = random_floats(n, 4);
    std::vector<uint8_t> buf(bp::dtype_row_bytes(t, n));
    bp::quantize_row(t, x.data(), buf.data(), n);
    std::vector<float> want(n), got(n + 1, 99.0f);
    bp::dequantize_row(t, buf.data(), want.data(), n);
    for (const std::string& isa : available_isas()) {
      ASSERT_TRUE(bp::kernels_force_isa(isa));
      bp::detail::kernel_isa().dequantize_row(t, buf.data(), got.data(), n);
      ASSERT_EQ(std::memcmp(got.data(), want.data(), n * sizeof(float)), 0) << isa;
      ASSERT_EQ(got[n], 99.0f) << "wrote past the row, " << isa;
    }
  }
}

// A weight matrix in type t, and its dequantized values.
struct TestMatrix {
  std::vector<uint8_t> bytes;  // [n_out][row_bytes]
  std::vector<float> values;   // [n_out][n_in], dequantized
  bp::MatrixView view;
};

// integers: weights and activations are small integers, so every f32 sum is exact.
TestMatrix make_matrix(DType t, int64_t n_in, int64_t n_out, uint32_t seed, bool integers) {
  TestMatrix m;
  m.bytes.resize(bp::dtype_row_bytes(t, n_in) * n_out);
  std::mt19937 rng(seed);
  if (integers && t == DType::Q8_0) {
    // Blocks with scale 1 and q in [-4, 4].
    auto* blocks = reinterpret_cast<bp::BlockQ8_0*>(m.bytes.data());
    for (int64_t b = 0; b < n_in / 32 * n_out; ++b) {
      blocks[b].d = bp::f32_to_f16(1.0f);
      for (int8_t& q : blocks[b].q) q = static_cast<int8_t>(static_cast<int>(rng() % 9) - 4);
    }
  } else {
    std::vector<float> src(n_in * n_out);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (float& f : src) f = integers ? static_cast<float>(static_cast<int>(rng() % 9) - 4) : u(rng);
    for (int64_t r = 0; r < n_out; ++r) {
      bp::quantize_row(t, src.data() + r * n_in, m.bytes.data() + r * bp::dtype_row_bytes(t, n_in), n_in);
    }
  }
  m.values.resize(n_in * n_out);
  for (int64_t r = 0; r < n_out; ++r) {
    bp::dequantize_row(t, m.bytes.data() + r * bp::dtype_row_bytes(t, n_in), m.values.data() + r * n_in, n_in);
  }
  m.view = bp::MatrixView{t, m.bytes.data(), n_in, n_out};
  return m;
}

std::vector<float> make_x(int64_t n, int64_t n_in, uint32_t seed, bool integers) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> x(n * n_in);
  for (float& f : x) f = integers ? static_cast<float>(static_cast<int>(rng() % 9) - 4) : u(rng);
  return x;
}

// The double-precision product on the dequantized weights, and sum_k |w_k x_k| per output.
struct Reference {
  std::vector<double> y;        // [n][n_out]
  std::vector<double> abs_sum;  // [n][n_out]
};

Reference reference_product(const TestMatrix& m, const std::vector<float>& x, int64_t n) {
  const int64_t n_in = m.view.n_in, n_out = m.view.n_out;
  Reference ref{std::vector<double>(n * n_out), std::vector<double>(n * n_out)};
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t r = 0; r < n_out; ++r) {
      double sum = 0.0, sum_abs = 0.0;
      for (int64_t k = 0; k < n_in; ++k) {
        const double p = static_cast<double>(m.values[r * n_in + k]) * x[j * n_in + k];
        sum += p;
        sum_abs += std::fabs(p);
      }
      ref.y[j * n_out + r] = sum;
      ref.abs_sum[j * n_out + r] = sum_abs;
    }
  }
  return ref;
}

// Each output within 2e-6 * sqrt(n_in) of sum_k |w_k x_k| (f32 sums err by about
// sqrt(n_in) * 6e-8 relative to that sum). exact: integer inputs, where every f32 partial sum
// is exact. y has one sentinel element (12345) past the end.
void check_product(const Reference& ref, int64_t n_in, const std::vector<float>& y, bool exact,
                   const std::string& what) {
  const double tol = 2e-6 * std::sqrt(static_cast<double>(n_in));
  for (size_t i = 0; i < ref.y.size(); ++i) {
    if (exact) {
      ASSERT_EQ(y[i], ref.y[i]) << what << " at flat index " << i;
    } else {
      ASSERT_LE(std::fabs(y[i] - ref.y[i]), tol * ref.abs_sum[i] + 1e-30) << what << " at flat index " << i;
    }
  }
  ASSERT_EQ(y[ref.y.size()], 12345.0f) << what << ": wrote past the end of y";
}

struct Shape {
  int64_t n_in, n_out;
};

void check_all_paths(bool integers) {
  IsaRestore restore;
  const int64_t ns[] = {1, 2, 3, 4, 5, 7, 8, 9, 33, 64, 300};
  for (DType t : ALL_TYPES) {
    // Decode reads rows of under 8 KiB one at a time and longer rows in tiles: 2112 and 4128
    // inputs put f32, f16 / bf16 and q8_0 rows on both sides of that line.
    std::vector<Shape> shapes = {{32, 1}, {64, 7}, {96, 33}, {768, 129}, {2112, 9}, {4128, 3}};
    if (t != DType::Q8_0) shapes.insert(shapes.end(), {{17, 5}, {50, 19}, {8, 3}});
    for (const Shape& s : shapes) {
      const TestMatrix m = make_matrix(t, s.n_in, s.n_out, 11 + s.n_in, integers);
      for (int64_t n : ns) {
        const std::vector<float> x = make_x(n, s.n_in, 5 + n, integers);
        const Reference ref = reference_product(m, x, n);
        std::vector<float> y(n * s.n_out + 1);
        auto run = [&](const std::string& path, auto fn) {
          std::fill(y.begin(), y.end(), std::nanf(""));
          y.back() = 12345.0f;
          fn(m.view, x.data(), n, y.data());
          check_product(ref, s.n_in, y, integers,
                        std::string(bp::dtype_name(t)) + " " + path + " isa=" + bp::kernels_isa() +
                            " n=" + std::to_string(n) + " n_in=" + std::to_string(s.n_in) +
                            " n_out=" + std::to_string(s.n_out));
        };
        for (const std::string& isa : available_isas()) {
          ASSERT_TRUE(bp::kernels_force_isa(isa));
          run("fused", bp::detail::matmul_fused);
          if (n >= 2) run("gemm", bp::detail::matmul_gemm);
          if (::testing::Test::HasFatalFailure()) return;
        }
        run("matmul", bp::matmul);
        if (::testing::Test::HasFatalFailure()) return;
      }
    }
  }
}

TEST(Kernels, MatmulMatchesDoubleReference) { check_all_paths(false); }

TEST(Kernels, MatmulExactOnSmallIntegers) { check_all_paths(true); }

// One activation row times a q8_0 matrix of 2 MiB and more (four streams on AVX-512, blocks in
// pairs, prefetched ahead; row counts that leave rows over after the quarters; an even and an odd
// number of blocks per row), on 1, 2 and 3 threads.
TEST(Kernels, Q8_0DecodeOfLargeMatrices) {
  IsaRestore restore;
  const int saved = omp_get_max_threads();
  for (const int64_t n_in : {1024, 1056}) {
    for (bool integers : {true, false}) {
      const int64_t n_out = (int64_t{4} << 20) / (n_in / 32 * 34) + 7;
      const TestMatrix m = make_matrix(DType::Q8_0, n_in, n_out, 21, integers);
      const std::vector<float> x = make_x(1, n_in, 22, integers);
      const Reference ref = reference_product(m, x, 1);
      for (const std::string& isa : available_isas()) {
        ASSERT_TRUE(bp::kernels_force_isa(isa));
        for (int threads : {1, 2, 3}) {
          omp_set_num_threads(threads);
          std::vector<float> y(n_out + 1, std::nanf(""));
          y.back() = 12345.0f;
          bp::matmul(m.view, x.data(), 1, y.data());
          check_product(ref, n_in, y, integers, isa + " threads=" + std::to_string(threads) + " n_in=" + std::to_string(n_in));
        }
      }
    }
  }
  omp_set_num_threads(saved);
}

TEST(Kernels, MatmulAnyThreadCount) {
  IsaRestore restore;
  const int saved = omp_get_max_threads();
  const TestMatrix m = make_matrix(DType::Q8_0, 256, 301, 9, true);
  for (int threads : {1, 3, 5}) {
    omp_set_num_threads(threads);
    for (int64_t n : {1, 3, 20}) {
      const std::vector<float> x = make_x(n, 256, 2, true);
      std::vector<float> y(n * 301 + 1, std::nanf(""));
      y.back() = 12345.0f;
      bp::matmul(m.view, x.data(), n, y.data());
      check_product(reference_product(m, x, n), 256, y, true, "threads=" + std::to_string(threads) + " n=" + std::to_string(n));
    }
  }
  omp_set_num_threads(saved);
}

TEST(Kernels, DnnlFailureNamesWhatWentWrong) {
  bp::detail::DnnlFailure none;
  EXPECT_FALSE(none.failed());

  bp::detail::DnnlFailure oom;
  oom.record(dnnl_out_of_memory);
  oom.record(dnnl_runtime_error);  // the first failure is the one reported
  ASSERT_TRUE(oom.failed());
  try {
    oom.raise("8 x 64 activations");
    FAIL() << "raise() returned";
  } catch (const bp::Error& e) {
    EXPECT_EQ(e.code(), bp::ErrorCode::OUT_OF_MEMORY);
    EXPECT_NE(std::string(e.what()).find("8 x 64 activations"), std::string::npos) << e.what();
  }

  bp::detail::DnnlFailure other;
  other.record(dnnl_runtime_error);
  try {
    other.raise("8 x 64 activations");
    FAIL() << "raise() returned";
  } catch (const bp::Error& e) {
    EXPECT_EQ(e.code(), bp::ErrorCode::UNSUPPORTED) << "not every oneDNN failure is a lack of memory";
    EXPECT_NE(std::string(e.what()).find(dnnl_status2str(dnnl_runtime_error)), std::string::npos) << e.what();
  }
}

TEST(Kernels, MatmulEmptyShapes) {
  std::vector<float> w(64, 1.0f), x(64, 1.0f), y(8, 7.0f);
  bp::matmul(bp::MatrixView{DType::F32, w.data(), 8, 8}, x.data(), 0, y.data());  // n = 0
  EXPECT_EQ(y[0], 7.0f);
  bp::matmul(bp::MatrixView{DType::F32, w.data(), 0, 8}, x.data(), 1, y.data());  // n_in = 0
  for (float v : y) EXPECT_EQ(v, 0.0f);
  y.assign(8, 7.0f);
  bp::matmul(bp::MatrixView{DType::F32, w.data(), 8, 0}, x.data(), 1, y.data());  // n_out = 0
  EXPECT_EQ(y[0], 7.0f);
}

}  // namespace
