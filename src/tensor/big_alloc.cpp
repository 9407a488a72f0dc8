#include "tensor/big_alloc.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>

namespace backprompt::detail {

namespace {
constexpr size_t SMALL_PAGE = size_t{4} << 10;
}  // namespace

void* map_huge_aligned(size_t bytes, int extra_flags) {
  const size_t raw_bytes = bytes + HUGE_PAGE_BYTES;
  void* raw = mmap(nullptr, raw_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | extra_flags, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const auto raw_begin = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t begin = (raw_begin + HUGE_PAGE_BYTES - 1) / HUGE_PAGE_BYTES * HUGE_PAGE_BYTES;
  if (begin > raw_begin) munmap(raw, begin - raw_begin);
  const uintptr_t end = begin + bytes, raw_end = raw_begin + raw_bytes;
  if (raw_end > end) munmap(reinterpret_cast<void*>(end), raw_end - end);
  return reinterpret_cast<void*>(begin);
}

void* big_alloc(size_t bytes) {
  if (bytes < HUGE_PAGE_BYTES) return std::malloc(bytes == 0 ? 1 : bytes);
  if (bytes > static_cast<size_t>(-1) - 2 * HUGE_PAGE_BYTES) return nullptr;
  const size_t mapped = (bytes + SMALL_PAGE - 1) / SMALL_PAGE * SMALL_PAGE;
  void* p = map_huge_aligned(mapped, 0);
  // Over the whole mapping, so that it stays one VMA: its last part, short of a huge page, keeps
  // small pages anyway. A failure (THP off) leaves small pages.
  if (p != nullptr) madvise(p, mapped, MADV_HUGEPAGE);
  return p;
}

void big_free(void* p, size_t bytes) {
  if (p == nullptr) return;
  if (bytes < HUGE_PAGE_BYTES) {
    std::free(p);
    return;
  }
  munmap(p, (bytes + SMALL_PAGE - 1) / SMALL_PAGE * SMALL_PAGE);
}

}  // namespace backprompt::detail
