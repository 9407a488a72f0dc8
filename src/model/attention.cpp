// Attention over a chain of K/V spans, read in place (no copying of prefixes).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <utility>
#include <vector>

#include "backprompt/error.h"
#include "model/batch.h"
#include "model/ops.h"
#include "tensor/kernels.h"

namespace backprompt::detail {

Batch::Batch(const ModelConfig& c, std::span<const ForwardSpan> s) : cfg(c), spans(s) {
  row0.resize(spans.size() + 1);
  for (size_t i = 0; i < spans.size(); ++i) {
    const ForwardSpan& sp = spans[i];
    int64_t n_past = 0;
    for (const KvSpanView& p : sp.past) n_past += p.n_tokens;
    if (n_past != sp.pos0)
      throw Error(ErrorCode::INVALID_ARGUMENT, "forward: span " + std::to_string(i) + " starts at position " +
                                                   std::to_string(sp.pos0) + " but its ancestors hold " +
                                                   std::to_string(n_past) + " tokens");
    if (sp.pos0 + static_cast<int64_t>(sp.tokens.size()) > cfg.n_ctx)
      throw Error(ErrorCode::INVALID_ARGUMENT, "forward: sequence of " + std::to_string(sp.pos0 + sp.tokens.size()) +
                                                   " tokens exceeds the model's context length " + std::to_string(cfg.n_ctx));
    row0[i + 1] = row0[i] + static_cast<int64_t>(sp.tokens.size());
    for (size_t t = 0; t < sp.tokens.size(); ++t) {
      const int32_t id = sp.tokens[t];
      if (id < 0 || id >= cfg.n_vocab)
        throw Error(ErrorCode::INVALID_ARGUMENT, "forward: token id " + std::to_string(id) + " is outside the vocabulary (" +
                                                     std::to_string(cfg.n_vocab) + ")");
      tokens.push_back(id);
      pos.push_back(sp.pos0 + static_cast<int32_t>(t));
    }
  }
  n_rows = row0.back();
}

static int64_t out_stride(const ForwardSpan& sp, int64_t kv_dim) {
  return sp.out_layer_stride ? sp.out_layer_stride : static_cast<int64_t>(sp.tokens.size()) * kv_dim;
}

namespace {

// store_kv's unit of work: rows [r0, r1) of span s, its K (which == 0) or its V. A span's rows
// are cut into pieces of at most STORE_PIECE_BYTES and at most an eighth of the span, so that a
// long span's copy (and the first-touch page faults of its fresh K/V pages, which dominate it)
// is shared by the threads. Measured on a 2-core VM, 512-token llama-110m prefill: 20 ms of its
// ~155 ms on one thread, 10 ms on two (means of 7 paired runs; single runs 4-33 ms).
struct StorePiece {
  int64_t s, r0, r1;
  int which;
};
constexpr int64_t STORE_PIECE_BYTES = int64_t{1} << 20;
// Below this many bytes in all, store_kv copies on the calling thread (a 256-token prefill of the
// tests' tiny models is above it, so the shared copy is tested against stepwise passes).
constexpr int64_t STORE_PARALLEL_MIN_BYTES = int64_t{64} << 10;

void store_piece(const Batch& b, int32_t layer, const float* k, const float* v, const StorePiece& p) {
  const int64_t kv_dim = b.cfg.kv_dim();
  const ForwardSpan& sp = b.spans[static_cast<size_t>(p.s)];
  const int64_t off = layer * out_stride(sp, kv_dim) + p.r0 * kv_dim;
  const float* src = (p.which == 0 ? k : v) + (b.row0[p.s] + p.r0) * kv_dim;
  std::memcpy((p.which == 0 ? sp.k_out : sp.v_out) + off, src, static_cast<size_t>((p.r1 - p.r0) * kv_dim) * sizeof(float));
}

}  // namespace

// In a team pass (ops::TeamPass: the whole forward pass in one parallel region), every thread
// of the team calls store_kv and attention: they share the work (orphaned worksharing loops) and
// return together (the team's barrier). Otherwise each opens its own parallel region when the
// work is large enough.
void store_kv(const Batch& b, int32_t layer, const KvRows& rows) {
  if (rows.in_place) return;
  const float* k = rows.k;
  const float* v = rows.v;
  const int64_t row_bytes = b.cfg.kv_dim() * static_cast<int64_t>(sizeof(float));
  const int64_t max_rows = std::max<int64_t>(1, STORE_PIECE_BYTES / row_bytes);
  // Kept between calls (decode calls this per layer and thread). Referred to through `pieces`
  // below, so that the threads of a parallel region opened here read the caller's list, not
  // their own thread_local one.
  thread_local std::vector<StorePiece> kept;
  std::vector<StorePiece>& pieces = kept;
  pieces.clear();
  for (int64_t s = 0; s < static_cast<int64_t>(b.spans.size()); ++s) {
    const int64_t n = b.row0[s + 1] - b.row0[s];
    const int64_t piece_rows = std::clamp<int64_t>((n + 7) / 8, 1, max_rows);
    for (int64_t r0 = 0; r0 < n; r0 += piece_rows) {
      for (int which = 0; which < 2; ++which) pieces.push_back({s, r0, std::min(n, r0 + piece_rows), which});
    }
  }
  const int64_t n_pieces = static_cast<int64_t>(pieces.size());
  if (ops::TeamPass::active()) {
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t i = 0; i < n_pieces; ++i) store_piece(b, layer, k, v, pieces[static_cast<size_t>(i)]);
    ops::TeamPass::barrier();
  } else {
#pragma omp parallel for schedule(dynamic, 1) if (2 * b.n_rows * row_bytes >= STORE_PARALLEL_MIN_BYTES && n_pieces > 1)
    for (int64_t i = 0; i < n_pieces; ++i) store_piece(b, layer, k, v, pieces[static_cast<size_t>(i)]);
  }
}

KvRows kv_rows(const Batch& b, int32_t layer, float* k_scratch, float* v_scratch) {
  if (b.spans.size() != 1 || b.n_rows == 0) return {k_scratch, v_scratch, false};
  const ForwardSpan& sp = b.spans[0];
  const int64_t off = layer * out_stride(sp, b.cfg.kv_dim());
  return {sp.k_out + off, sp.v_out + off, true};
}

namespace {

// Query rows per tile: about TILE_QUERIES query vectors (rows x heads of one key/value group), the
// width of attention_tile's widest fast shape.
constexpr int64_t TILE_QUERIES = 64;
// Spans with at most this many query vectors per key/value head (decode, short spans) get tiles
// over several key/value heads, up to this many query vectors: each key row's heads are then read
// together, contiguously (per-head reads of rows kv_dim apart are much slower, in TLB misses).
constexpr int64_t SMALL_TILE_QUERIES = 16;
// Below this many multiply-adds (scores and values) attention runs on the calling thread.
constexpr int64_t PARALLEL_MIN_MACS = 1 << 15;
// Small spans (decode) whose rows all see at least 2 x this many keys split them into runs of at
// least this many, one tile per run (TileItem::key_begin), up to one per thread, combined
// afterwards (attention_merge). A tile then reads whole K/V rows front to back, where splitting
// the heads over the threads had each read part of every row. Measured on a 2-core VM, llama-110m
// q8_0 decode (128 tokens after a 512-token prompt): attention and the K/V store took 1.1 ms of a
// token's 3.3 ms before, 0.9 ms of 2.8 ms after; alternating runs, 4 each: llama-110m q8_0 and
// f16 +4%, gpt2-124m f32 +2% after 512 tokens, llama-110m q8_0 +10% after 950.
constexpr int64_t SPLIT_MIN_KEYS = 64;

// One tile of work: rows [row0, row0 + n_rows) of a span (batch rows), key/value heads
// [kv_head, kv_head + n_kv_heads), over the span's keys [key_begin, key_end) (key_end: -1 for
// all the rest).
struct TileItem {
  int32_t span;
  int32_t kv_head;
  int32_t n_kv_heads;
  int64_t row0;      // first batch row
  int32_t n_rows;
  int64_t n_keys0;   // keys its first row sees
  int64_t cost;      // multiply-adds, for scheduling
  int64_t key_begin = 0, key_end = -1;
  int64_t partial = -1;  // where its partial results go in the call's buffer (floats), or -1: out
};

// The tile that n_runs tiles over runs of its keys combine into; their partial results lie one
// after another from `partial` (floats into the call's buffer), each as big as the whole's.
struct MergeItem {
  TileItem whole;
  int64_t partial;
  int32_t n_runs;
};

struct TileShape {
  int64_t q_dim, kv_dim;
  int32_t head_dim, group;
  float scale;
  bool bf16;          // AttentionTile::bf16
  uint64_t kv_epoch;  // AttentionTile::kv_epoch
};

// The AttentionTile of an item, without its sources.
AttentionTile tile_of(const TileItem& item, const TileShape& sh, const float* q, float* out, float* partials) {
  AttentionTile t;
  const int64_t col0 = static_cast<int64_t>(item.kv_head) * sh.group * sh.head_dim;  // its first query head
  if (q != nullptr) t.q = q + item.row0 * sh.q_dim + col0;  // a merge reads no queries
  t.out = out + item.row0 * sh.q_dim + col0;
  t.ldq = t.ldo = sh.q_dim;
  t.n_rows = item.n_rows;
  t.n_kv_heads = item.n_kv_heads;
  t.n_group = sh.group;
  t.head_dim = sh.head_dim;
  t.scale = sh.scale;
  t.kv_stride = sh.kv_dim;
  t.n_keys0 = item.n_keys0;
  t.bf16 = sh.bf16;
  t.kv_epoch = sh.kv_epoch;
  if (item.partial >= 0) t.partial = partials + item.partial;
  return t;
}

// The threads of the calling parallel region meet: at the team's barrier in a team pass.
void meet() {
  if (ops::TeamPass::active()) {
    ops::TeamPass::barrier();
  } else {
#pragma omp barrier
  }
}

// The calling team's share of the tiles (orphaned worksharing loop, dynamic: the causal triangle
// and ragged spans make tiles unequal; biggest first), then the threads meet.
void run_tiles(const std::vector<TileItem>& items, const std::vector<std::vector<KvRowsView>>& sources, const TileShape& sh,
               const float* q, float* out, float* partials) {
  const int64_t n_items = static_cast<int64_t>(items.size());
  std::vector<KvRowsView> kv;  // the tile's sources (its run of them), moved to its first key/value head
#pragma omp for schedule(dynamic, 1) nowait
  for (int64_t it = 0; it < n_items; ++it) {
    const TileItem& item = items[static_cast<size_t>(it)];
    const int64_t col = static_cast<int64_t>(item.kv_head) * sh.head_dim;
    const int64_t end = item.key_end < 0 ? INT64_MAX : item.key_end;
    kv.clear();
    int64_t key0 = 0;  // the source's first key among the span's keys
    for (const KvRowsView& src : sources[static_cast<size_t>(item.span)]) {
      const int64_t a = std::max(key0, item.key_begin), z = std::min(key0 + src.n, end);
      if (a < z) kv.push_back({src.k + (a - key0) * sh.kv_dim + col, src.v + (a - key0) * sh.kv_dim + col, z - a});
      key0 += src.n;
    }
    AttentionTile t = tile_of(item, sh, q, out, partials);
    t.kv = kv.data();
    t.n_kv = static_cast<int32_t>(kv.size());
    // Keys its first row sees from key_begin on: all of a run that ends before them.
    t.n_keys0 = std::min(item.n_keys0, end) - item.key_begin;
    attention_tile(t);
  }
  meet();
}

// The team's share of the merges (after every tile is done), then the threads meet.
void run_merges(const std::vector<MergeItem>& merges, const TileShape& sh, float* out, const float* partials) {
  const int64_t n_merges = static_cast<int64_t>(merges.size());
  std::vector<const float*> parts;
#pragma omp for schedule(dynamic, 1) nowait
  for (int64_t i = 0; i < n_merges; ++i) {
    const MergeItem& mi = merges[static_cast<size_t>(i)];
    const int64_t size = int64_t{mi.whole.n_rows} * mi.whole.n_kv_heads * sh.group * (sh.head_dim + 2);  // one run's
    parts.clear();
    for (int32_t r = 0; r < mi.n_runs; ++r) parts.push_back(partials + mi.partial + r * size);
    attention_merge(tile_of(mi.whole, sh, nullptr, out, nullptr), parts.data(), mi.n_runs);
  }
  meet();
}

// A buffer of at least n floats for a call's partial results, kept between calls (decode calls
// attention per layer).
float* partial_scratch(size_t n) {
  thread_local std::vector<float> kept;
  if (kept.size() < n) kept.resize(n);
  return kept.data();
}

// The order the team takes tiles in: the tiles of one (span, key/value head) together, biggest
// first, so that a thread's next tile mostly reads the keys and values its last one left in its
// cache; those groups biggest first, so that what is left for the end is small (load balance).
// Measured on a 2-core machine, 512-token llama-110m prefill: attention 3-4% faster than with all
// tiles biggest first (3 paired runs each, f32 and bf16 tiles).
void order_tiles(std::vector<TileItem>& items) {
  std::map<std::pair<int32_t, int32_t>, int64_t> group_cost;
  for (const TileItem& it : items) group_cost[{it.span, it.kv_head}] += it.cost;
  std::stable_sort(items.begin(), items.end(), [&](const TileItem& x, const TileItem& y) {
    const int64_t cx = group_cost[{x.span, x.kv_head}], cy = group_cost[{y.span, y.kv_head}];
    if (cx != cy) return cx > cy;
    if (x.span != y.span || x.kv_head != y.kv_head) return std::pair(x.span, x.kv_head) < std::pair(y.span, y.kv_head);
    return x.cost > y.cost;
  });
}

}  // namespace

// Tiles of (span, key/value head, block of rows), biggest first, spread over the threads
// (dynamically: the causal triangle and ragged spans make tiles unequal). Each tile reads its
// span's ancestor chain in place.
void attention(const Batch& b, int32_t layer, const float* q, float* out) {
  const ModelConfig& c = b.cfg;
  const int32_t hd = c.head_dim, n_head = c.n_head, n_kv_head = c.n_kv_head, group = c.n_head / c.n_kv_head;
  const int64_t kv_dim = c.kv_dim(), q_dim = static_cast<int64_t>(n_head) * hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

  // Per span: where this layer's K/V lie, ancestors first, then the span itself (rows of the
  // first key/value head; head g is g * head_dim further).
  std::vector<std::vector<KvRowsView>> sources(b.spans.size());
  std::vector<TileItem> items;
  std::vector<MergeItem> merges;
  int64_t n_partial = 0;  // floats of partial results
  int64_t total_cost = 0;
  const int64_t rows_per_tile = std::max<int64_t>(1, TILE_QUERIES / group);
  const int64_t n_threads = ops::TeamPass::active() ? omp_get_num_threads() : omp_get_max_threads();
  for (size_t s = 0; s < b.spans.size(); ++s) {
    const ForwardSpan& sp = b.spans[s];
    for (const KvSpanView& p : sp.past) {
      if (p.n_tokens == 0) continue;
      const int64_t stride = p.layer_stride ? p.layer_stride : static_cast<int64_t>(p.n_tokens) * kv_dim;
      sources[s].push_back({p.k + layer * stride, p.v + layer * stride, p.n_tokens});
    }
    const int64_t n = b.row0[s + 1] - b.row0[s];
    if (n == 0) continue;
    const int64_t off = layer * out_stride(sp, kv_dim);
    sources[s].push_back({sp.k_out + off, sp.v_out + off, n});
    if (n * group <= SMALL_TILE_QUERIES) {
      // All rows, several key/value heads per tile. Enough tiles for every thread: the keys cut
      // into runs when there are enough of them, otherwise the heads spread over more tiles.
      const int64_t n_keys0 = sp.pos0 + 1;
      const int64_t n_runs = std::clamp<int64_t>(n_keys0 / SPLIT_MIN_KEYS, 1, n_threads);
      const int64_t most = SMALL_TILE_QUERIES / (n * group);
      const int32_t per_tile = static_cast<int32_t>(std::clamp<int64_t>(
          n_runs > 1 ? most : std::min<int64_t>(most, (n_kv_head + n_threads - 1) / n_threads), 1, n_kv_head));
      for (int32_t g = 0; g < n_kv_head; g += per_tile) {
        const int32_t n_kv = std::min(per_tile, n_kv_head - g);
        const int64_t cost = 2 * int64_t{group} * n_kv * n * (n_keys0 + n / 2) * hd;
        const TileItem whole{static_cast<int32_t>(s), g, n_kv, b.row0[s], static_cast<int32_t>(n), n_keys0, cost};
        total_cost += cost;
        if (n_runs == 1) {
          items.push_back(whole);
          continue;
        }
        merges.push_back({whole, n_partial, static_cast<int32_t>(n_runs)});
        for (int64_t r = 0; r < n_runs; ++r) {  // runs of the keys every row sees; the last one takes the rest
          TileItem run = whole;
          run.key_begin = n_keys0 * r / n_runs;
          run.key_end = r + 1 < n_runs ? n_keys0 * (r + 1) / n_runs : -1;
          run.cost = cost / n_runs;
          run.partial = n_partial;
          n_partial += int64_t{n} * n_kv * group * (hd + 2);
          items.push_back(run);
        }
      }
      continue;
    }
    for (int64_t r = 0; r < n; r += rows_per_tile) {
      const int32_t n_rows = static_cast<int32_t>(std::min(rows_per_tile, n - r));
      const int64_t n_keys0 = sp.pos0 + r + 1;
      const int64_t cost = 2 * int64_t{group} * n_rows * (n_keys0 + n_rows / 2) * hd;
      for (int32_t g = 0; g < n_kv_head; ++g) items.push_back({static_cast<int32_t>(s), g, 1, b.row0[s] + r, n_rows, n_keys0, cost});
      total_cost += cost * n_kv_head;
    }
  }
  order_tiles(items);

  // bf16 products where matmul uses them: prefill-sized batches under MatmulPrecision::BF16.
  const bool bf16 = kernels_matmul_precision() == MatmulPrecision::BF16 && b.n_rows > MATMUL_FUSED_MAX_N;
  // bf16 tiles of this call over the same key/value head share their rounding of its K/V (per
  // thread), which nothing changes while they run.
  const TileShape shape{q_dim, kv_dim, hd, group, scale, bf16, bf16 ? next_kv_epoch() : 0};
  if (ops::TeamPass::active()) {
    // Every thread of the team computed the same items; one buffer for all of them.
    float* partials = nullptr;
    if (n_partial > 0) {
#pragma omp single copyprivate(partials)
      partials = partial_scratch(static_cast<size_t>(n_partial));
    }
    run_tiles(items, sources, shape, q, out, partials);
    if (!merges.empty()) run_merges(merges, shape, out, partials);
  } else {
    float* partials = n_partial > 0 ? partial_scratch(static_cast<size_t>(n_partial)) : nullptr;
#pragma omp parallel if (total_cost >= PARALLEL_MIN_MACS && items.size() > 1)
    {
      run_tiles(items, sources, shape, q, out, partials);
      if (!merges.empty()) run_merges(merges, shape, out, partials);
    }
  }
}

}  // namespace backprompt::detail
