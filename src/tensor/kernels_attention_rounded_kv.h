// The bf16 attention tiles' per-thread store of rounded keys and values (internal to src/tensor;
// used by kernels_attention_avx512.cpp).
//
// The bf16 keys and value pairs one thread's last bf16 tiles rounded, by block (the blocks in the
// order a tile walks its sources: the same for every tile over the same sources), for the next
// tile over the same sources in the same epoch (AttentionTile::kv_epoch). The tiles of one
// key/value head follow each other on a thread (biggest first), so the head's keys are rounded
// once per thread instead of once per tile. At most ROUNDED_KV_BYTES per thread (half of a 1 MiB
// L2); blocks past that are rounded by each tile as before. Attention alone (bench_attention,
// llama-110m's shape, 3 alternating runs): 13-15% less time per layer; in 512-token llama-110m
// prefills the attention step took 5-10% less (3 alternating runs of 20 passes).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "tensor/kernels.h"

namespace backprompt::detail {

constexpr size_t ROUNDED_KV_BYTES = size_t{512} << 10;

struct RoundedKv {
  uint64_t epoch = 0;
  std::vector<KvRowsView> sources;
  int64_t kv_stride = 0;
  int32_t head_dim = 0;
  int32_t block_keys = 0;         // keys per block
  int32_t n_blocks = 0;           // blocks that fit
  std::vector<int32_t> n_done;    // [block] keys rounded into it (0: none)
  // [block][block_keys * head_dim bf16 keys, then block_keys / 2 * head_dim value pairs], from
  // base, storage's first 64-byte boundary
  std::vector<uint32_t> storage;
  uint32_t* base = nullptr;

  bool serves(const AttentionTile& t, int32_t keys_per_block) const {
    if (epoch != t.kv_epoch || kv_stride != t.kv_stride || head_dim != t.head_dim || block_keys != keys_per_block ||
        sources.size() != static_cast<size_t>(t.n_kv)) {
      return false;
    }
    for (int32_t i = 0; i < t.n_kv; ++i) {
      const KvRowsView& a = sources[static_cast<size_t>(i)];
      if (a.k != t.kv[i].k || a.v != t.kv[i].v || a.n != t.kv[i].n) return false;
    }
    return true;
  }
  void reset(const AttentionTile& t, int32_t keys_per_block) {
    epoch = t.kv_epoch;
    sources.assign(t.kv, t.kv + t.n_kv);
    kv_stride = t.kv_stride;
    head_dim = t.head_dim;
    block_keys = keys_per_block;
    const size_t block_words = static_cast<size_t>(block_keys) * static_cast<size_t>(head_dim);  // keys or pairs
    n_blocks = static_cast<int32_t>(ROUNDED_KV_BYTES / (block_words * 2 * sizeof(uint32_t)));
    n_done.assign(static_cast<size_t>(n_blocks), 0);
    const size_t words = static_cast<size_t>(n_blocks) * block_words * 2 + 16;  // 16 more to align
    if (storage.size() < words) storage.resize(words);
    base = reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t{63});
  }
  uint16_t* keys(int32_t block) {
    return reinterpret_cast<uint16_t*>(base + static_cast<size_t>(block) * block_keys * head_dim * 2);
  }
  uint32_t* pairs(int32_t block) { return base + (static_cast<size_t>(block) * 2 + 1) * block_keys * head_dim; }
};

// This thread's RoundedKv for tile t (bf16, kv_epoch set) in blocks of keys_per_block keys, reset
// if it held other keys; nullptr where the tile does not reuse (no epoch).
inline RoundedKv* rounded_kv(const AttentionTile& t, int32_t keys_per_block) {
  if (t.kv_epoch == 0 || t.n_kv == 0) return nullptr;
  thread_local RoundedKv kept;
  if (!kept.serves(t, keys_per_block)) kept.reset(t, keys_per_block);
  return &kept;
}

}  // namespace backprompt::detail
