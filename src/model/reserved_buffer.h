// Floats in a reserved range of address space whose pages are committed on first touch.
//
// A sequence's K/V grow one token at a time up to the context length. Reserving the whole range
// up front (virtual memory only) means it never moves or copies as it grows, and never pays for
// zero-filling memory it does not use: the kernel hands out zero pages as they are first written.
// Large buffers ask for transparent huge pages (MADV_HUGEPAGE), which cuts the number of
// first-touch page faults 512-fold and spares readers TLB misses; a buffer then holds memory in
// 2 MiB steps (resident memory counts only what was touched).
// Thread-safety: none (like a std::vector).
//
// Large buffers that are allocated whole (a cache node's K/V, a batch's logits, activations) pay
// the same first-touch cost when they come from malloc: BigVector gives them huge pages too
// (tensor/big_alloc.h).
#pragma once

#include <cstddef>
#include <new>
#include <utility>
#include <vector>

#include "tensor/big_alloc.h"

namespace backprompt::detail {

// A std::allocator for big_alloc memory whose value-less construct leaves elements uninitialised:
// resize() does not zero-fill buffers that are written whole right after (pass a value to fill).
template <class T>
struct BigAllocator {
  using value_type = T;
  BigAllocator() = default;
  template <class U>
  BigAllocator(const BigAllocator<U>&) {}
  T* allocate(size_t n) {
    if (n > static_cast<size_t>(-1) / sizeof(T)) throw std::bad_alloc();
    void* p = big_alloc(n * sizeof(T));
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t n) { big_free(p, n * sizeof(T)); }
  template <class U>
  void construct(U* p) {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... A>
  void construct(U* p, A&&... a) {
    ::new (static_cast<void*>(p)) U(std::forward<A>(a)...);
  }
  template <class U>
  bool operator==(const BigAllocator<U>&) const {
    return true;
  }
};
template <class T>
using BigVector = std::vector<T, BigAllocator<T>>;

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
