// ReservedFloats: zero until written, writable anywhere in range, movable, and a large
// reservation costs address space only.
#include <gtest/gtest.h>

#include <cstdint>
#include <utility>

#include "model/reserved_buffer.h"

namespace backprompt::detail {
namespace {

TEST(ReservedFloats, ReadsZeroAndKeepsWrites) {
  ReservedFloats a(3'000'000);  // spans several huge pages
  ASSERT_EQ(a.size(), 3'000'000u);
  ASSERT_EQ(reinterpret_cast<uintptr_t>(a.data()) % 64, 0u);
  EXPECT_EQ(a.data()[0], 0.0f);
  EXPECT_EQ(a.data()[2'999'999], 0.0f);
  a.data()[1'234'567] = 4.5f;
  a.data()[2'999'999] = -1.0f;
  ReservedFloats b(std::move(a));
  EXPECT_EQ(a.size(), 0u);
  EXPECT_EQ(a.data(), nullptr);
  EXPECT_EQ(b.data()[1'234'567], 4.5f);
  EXPECT_EQ(b.data()[2'999'999], -1.0f);
  EXPECT_EQ(b.data()[1'234'568], 0.0f);
  ReservedFloats c(10);
  c = std::move(b);
  EXPECT_EQ(c.data()[1'234'567], 4.5f);
}

TEST(ReservedFloats, LargeReservationTouchesOnlyWhatIsWritten) {
  // 16 GiB of address space: fine to reserve, as long as only a little of it is written.
  ReservedFloats big(size_t{1} << 32);
  ASSERT_NE(big.data(), nullptr);
  big.data()[0] = 1.0f;
  big.data()[(size_t{1} << 32) - 1] = 2.0f;
  EXPECT_EQ(big.data()[0] + big.data()[(size_t{1} << 32) - 1], 3.0f);
}

TEST(ReservedFloats, EmptyIsEmpty) {
  ReservedFloats e(0);
  EXPECT_EQ(e.size(), 0u);
  EXPECT_EQ(e.data(), nullptr);
}

}  // namespace
}  // namespace backprompt::detail
