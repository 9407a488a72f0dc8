// Memory for large buffers on transparent huge pages.
//
// malloc maps every large allocation anew with 4 KiB pages; first touch then costs one page fault
// per 4 KiB (measured on a 2-core EPYC VM: 64 MiB took 175-195 ms with 4 KiB pages, 4 ms with
// 2 MiB pages), and a buffer read over and over (weights, K/V) costs TLB misses on every page.
// These functions give such buffers a mapping of their own that starts on a 2 MiB boundary and
// asks for huge pages (MADV_HUGEPAGE); where the system has none, small pages are used.
// Thread-safety: all functions may be called from any thread.
#pragma once

#include <cstddef>

namespace backprompt::detail {

constexpr size_t HUGE_PAGE_BYTES = size_t{2} << 20;  // x86-64 transparent huge page

// A private anonymous read-write mapping of `bytes` (a multiple of 4 KiB) that starts on a
// huge-page boundary (one huge page more is reserved, then trimmed), with mmap's `extra_flags`
// (e.g. MAP_NORESERVE). No madvise. nullptr and errno on failure.
void* map_huge_aligned(size_t bytes, int extra_flags);

// Raw memory for a buffer of `bytes`: at least 2 MiB get a huge-page-aligned mapping with
// MADV_HUGEPAGE (its last part, short of a huge page, keeps small pages, so nothing past the
// request is committed); less comes from malloc. Not zero-filled. nullptr if it cannot.
void* big_alloc(size_t bytes);
void big_free(void* p, size_t bytes);  // bytes: as given to big_alloc

}  // namespace backprompt::detail
