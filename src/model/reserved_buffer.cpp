#include "model/reserved_buffer.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#include "backprompt/error.h"

namespace backprompt::detail {

namespace {
constexpr size_t HUGE_PAGE = size_t{2} << 20;  // x86-64 transparent huge page
constexpr size_t SMALL_PAGE = size_t{4} << 10;

// A private anonymous mapping of `bytes` (a multiple of SMALL_PAGE) that starts on a huge-page
// boundary (one huge page more is reserved, then trimmed). nullptr and errno on failure.
void* map_aligned(size_t bytes, int extra_flags) {
  const size_t raw_bytes = bytes + HUGE_PAGE;
  void* raw = mmap(nullptr, raw_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | extra_flags, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const auto raw_begin = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t begin = (raw_begin + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
  if (begin > raw_begin) munmap(raw, begin - raw_begin);
  const uintptr_t end = begin + bytes, raw_end = raw_begin + raw_bytes;
  if (raw_end > end) munmap(reinterpret_cast<void*>(end), raw_end - end);
  return reinterpret_cast<void*>(begin);
}
}  // namespace

void* big_alloc(size_t bytes) {
  if (bytes < HUGE_PAGE) return std::malloc(bytes == 0 ? 1 : bytes);
  if (bytes > static_cast<size_t>(-1) - 2 * HUGE_PAGE) return nullptr;
  const size_t mapped = (bytes + SMALL_PAGE - 1) / SMALL_PAGE * SMALL_PAGE;
  void* p = map_aligned(mapped, 0);
  // Over the whole mapping, so that it stays one VMA: its last part, short of a huge page, keeps
  // small pages anyway. A failure (THP off) leaves small pages.
  if (p != nullptr) madvise(p, mapped, MADV_HUGEPAGE);
  return p;
}

void big_free(void* p, size_t bytes) {
  if (p == nullptr) return;
  if (bytes < HUGE_PAGE) {
    std::free(p);
    return;
  }
  munmap(p, (bytes + SMALL_PAGE - 1) / SMALL_PAGE * SMALL_PAGE);
}

ReservedFloats::ReservedFloats(size_t n) : n_(n) {
  if (n == 0) return;
  const size_t bytes = n * sizeof(float);
  if (bytes / sizeof(float) != n) throw Error(ErrorCode::OUT_OF_MEMORY, "K/V buffer of " + std::to_string(n) + " floats");
  mapped_bytes_ = (bytes + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
  void* p = map_aligned(mapped_bytes_, MAP_NORESERVE);
  if (p == nullptr) {
    const int err = errno;
    mapped_bytes_ = 0;
    n_ = 0;
    throw Error(ErrorCode::OUT_OF_MEMORY, "cannot reserve " + std::to_string(bytes >> 20) + " MiB for K/V: " + std::strerror(err));
  }
  data_ = static_cast<float*>(p);
  // Only worth it when the buffer spans huge pages; a failure (THP off) just leaves small pages.
  if (mapped_bytes_ >= 2 * HUGE_PAGE) madvise(p, mapped_bytes_, MADV_HUGEPAGE);
}

ReservedFloats::~ReservedFloats() { release(); }

ReservedFloats::ReservedFloats(ReservedFloats&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)), n_(std::exchange(o.n_, 0)), mapped_bytes_(std::exchange(o.mapped_bytes_, 0)) {}

ReservedFloats& ReservedFloats::operator=(ReservedFloats&& o) noexcept {
  if (this != &o) {
    release();
    data_ = std::exchange(o.data_, nullptr);
    n_ = std::exchange(o.n_, 0);
    mapped_bytes_ = std::exchange(o.mapped_bytes_, 0);
  }
  return *this;
}

void ReservedFloats::release() {
  if (data_ != nullptr) munmap(data_, mapped_bytes_);
  data_ = nullptr;
  n_ = 0;
  mapped_bytes_ = 0;
}

}  // namespace backprompt::detail
