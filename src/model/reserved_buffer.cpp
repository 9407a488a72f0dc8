#include "model/reserved_buffer.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <utility>

#include "backprompt/error.h"

namespace backprompt::detail {

ReservedFloats::ReservedFloats(size_t n) : n_(n) {
  if (n == 0) return;
  const size_t bytes = n * sizeof(float);
  if (bytes / sizeof(float) != n) throw Error(ErrorCode::OUT_OF_MEMORY, "K/V buffer of " + std::to_string(n) + " floats");
  mapped_bytes_ = (bytes + HUGE_PAGE_BYTES - 1) / HUGE_PAGE_BYTES * HUGE_PAGE_BYTES;
  void* p = map_huge_aligned(mapped_bytes_, MAP_NORESERVE);
  if (p == nullptr) {
    const int err = errno;
    mapped_bytes_ = 0;
    n_ = 0;
    throw Error(ErrorCode::OUT_OF_MEMORY, "cannot reserve " + std::to_string(bytes >> 20) + " MiB for K/V: " + std::strerror(err));
  }
  data_ = static_cast<float*>(p);
  // Only worth it when the buffer spans huge pages; a failure (THP off) just leaves small pages.
  if (mapped_bytes_ >= 2 * HUGE_PAGE_BYTES) madvise(p, mapped_bytes_, MADV_HUGEPAGE);
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
