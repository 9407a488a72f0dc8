// Floats in a reserved range of address space whose pages are committed on first touch.
//
// A sequence's K/V grow one token at a time up to the context length. Reserving the whole range
// up front (virtual memory only) means it never moves or copies as it grows, and never pays for
// zero-filling memory it does not use: the kernel hands out zero pages as they are first written.
// Large buffers ask for transparent huge pages (MADV_HUGEPAGE), which cuts the number of
// first-touch page faults 512-fold and spares readers TLB misses; a buffer then holds memory in
// 2 MiB steps (resident memory counts only what was touched).
// Thread-safety: none (like a std::vector).
#pragma once

#include <cstddef>

namespace backprompt::detail {

class ReservedFloats {
 public:
  ReservedFloats() = default;
  // Reserves n floats, reading as 0 until written. Error(OUT_OF_MEMORY) if the address space
  // cannot be reserved.
  explicit ReservedFloats(size_t n);
  ~ReservedFloats();
  ReservedFloats(ReservedFloats&& o) noexcept;
  ReservedFloats& operator=(ReservedFloats&& o) noexcept;
  ReservedFloats(const ReservedFloats&) = delete;
  ReservedFloats& operator=(const ReservedFloats&) = delete;

  float* data() { return data_; }
  const float* data() const { return data_; }
  size_t size() const { return n_; }

 private:
  void release();
  float* data_ = nullptr;
  size_t n_ = 0;
  size_t mapped_bytes_ = 0;
};

}  // namespace backprompt::detail
