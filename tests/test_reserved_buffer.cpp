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

TEST(BigAlloc, LargeBuffersStartOnHugePagesAndHoldTheirBytes) {
  for (size_t bytes : {size_t{2} << 20, (size_t{3} << 20) + 12, size_t{40} << 20}) {
    auto* p = static_cast<uint8_t*>(big_alloc(bytes));
    ASSERT_NE(p, nullptr) << bytes;
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % (uintptr_t{2} << 20), 0u) << bytes;
    for (size_t i = 0; i < bytes; ++i) p[i] = static_cast<uint8_t>(i * 7 + 1);  // every byte, up to the last one
    size_t wrong = 0;
    for (size_t i = 0; i < bytes; ++i) wrong += p[i] != static_cast<uint8_t>(i * 7 + 1);
    EXPECT_EQ(wrong, 0u) << bytes;
    big_free(p, bytes);
  }
}

TEST(BigAlloc, SmallBuffersAndNothing) {
  for (size_t bytes : {size_t{0}, size_t{1}, size_t{4096}, (size_t{2} << 20) - 1}) {
    auto* p = static_cast<uint8_t*>(big_alloc(bytes));
    ASSERT_NE(p, nullptr) << bytes;
    for (size_t i = 0; i < bytes; ++i) p[i] = static_cast<uint8_t>(i);
    size_t wrong = 0;
    for (size_t i = 0; i < bytes; ++i) wrong += p[i] != static_cast<uint8_t>(i);
    EXPECT_EQ(wrong, 0u) << bytes;
    big_free(p, bytes);
  }
  big_free(nullptr, size_t{8} << 20);  // nothing to free
}

TEST(BigVector, BehavesAsAVector) {
  BigVector<float> v(10, 1.5f);  // a value fills
  for (float f : v) EXPECT_EQ(f, 1.5f);
  v.resize(size_t{3} << 20);  // grows past 2 MiB: moves to a mapping; the old elements come along
  for (size_t i = 0; i < 10; ++i) EXPECT_EQ(v[i], 1.5f);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i % 1000);
  BigVector<float> copy = v;
  BigVector<float> moved = std::move(v);
  ASSERT_EQ(copy.size(), size_t{3} << 20);
  ASSERT_EQ(moved.size(), copy.size());
  EXPECT_EQ(copy[12345], 345.0f);
  EXPECT_EQ(moved.back(), static_cast<float>(((size_t{3} << 20) - 1) % 1000));
  moved.resize(5, 0.0f);  // shrinks in place
  moved.shrink_to_fit();  // back to malloc
  EXPECT_EQ(moved[4], 4.0f);
}

}  // namespace
}  // namespace backprompt::detail
