// attention_tile() on every instruction set against a double-precision softmax(q Kᵀ) V: chains of
// key/value sources of ragged sizes (read in place, with strides), grouped-query heads, head
// sizes that are not a multiple of the vector width, long contexts, and large scores. And the
// forward pass's thread teams: called from inside a caller's own parallel region, it gives the
// same logits as alone.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "model/runtime.h"
#include "tensor/kernels.h"
#include "tensor/kernels_simd.h"
#include "test_util.h"

namespace bp = backprompt;
using bp::testing::available_isas;
using bp::testing::IsaRestore;

namespace {

struct Case {
  int32_t head_dim, n_group, n_rows;
  int32_t n_kv_heads;         // key/value heads in the tile (of 4; the tile starts at head 1)
  std::vector<int64_t> past;  // rows of each ancestor source
  float q_scale;              // spread of the queries (large: peaked softmax)
};

// Runs one case on the current ISA; fails if any output is off by more than tol * max|v| (|v| of
// normal values: about 4). Returns the outputs ([n_rows][q_dim]). With `runs` (the first keys of
// runs after the first, ascending, each below n_keys0), the tile runs as one partial tile per run
// of keys, each over its piece of the chain, combined by attention_merge (decode's split).
std::vector<float> check_case(const Case& c, uint32_t seed, bool bf16 = false, double tol = 2e-5,
                              const std::vector<int64_t>& runs = {}) {
  const int32_t hd = c.head_dim, n_kv_head = 4, kv_head = 1;
  const int64_t kv_dim = int64_t{n_kv_head} * hd + 3;  // row stride with a gap after the heads
  const int64_t q_dim = int64_t{c.n_group} * n_kv_head * hd;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);

  std::vector<int64_t> sizes = c.past;
  sizes.push_back(c.n_rows);  // the tile's own rows come last
  std::vector<std::vector<float>> k(sizes.size()), v(sizes.size());  // [n][kv_dim] each
  std::vector<bp::KvRowsView> kv;
  int64_t n_past = 0;
  for (size_t s = 0; s < sizes.size(); ++s) {
    k[s].resize(static_cast<size_t>(std::max<int64_t>(1, sizes[s]) * kv_dim));
    v[s].resize(k[s].size());
    for (float& x : k[s]) x = normal(rng);
    for (float& x : v[s]) x = normal(rng);
    kv.push_back({k[s].data() + kv_head * hd, v[s].data() + kv_head * hd, sizes[s]});
    if (s + 1 < sizes.size()) n_past += sizes[s];
  }
  std::vector<float> q(static_cast<size_t>(c.n_rows * q_dim));  // [n_rows][q_dim]
  for (float& x : q) x = normal(rng) * c.q_scale;
  const int64_t head0 = int64_t{kv_head} * c.n_group * hd;  // first query head of the tile
  const int32_t n_heads = c.n_kv_heads * c.n_group;          // query heads in the tile

  bp::AttentionTile t;
  t.q = q.data() + head0;
  std::vector<float> out(q.size() + 1, std::nanf(""));  // [n_rows][q_dim] + sentinel
  out.back() = 12345.0f;
  t.out = out.data() + head0;
  t.ldq = t.ldo = q_dim;
  t.n_rows = c.n_rows;
  t.n_kv_heads = c.n_kv_heads;
  t.n_group = c.n_group;
  t.head_dim = hd;
  t.scale = 1.0f / std::sqrt(static_cast<float>(hd));
  t.kv = kv.data();
  t.n_kv = static_cast<int32_t>(kv.size());
  t.kv_stride = kv_dim;
  t.n_keys0 = n_past + 1;
  t.bf16 = bf16;
  if (runs.empty()) {
    bp::attention_tile(t);
  } else {
    std::vector<int64_t> begin = {0};
    begin.insert(begin.end(), runs.begin(), runs.end());
    const int64_t n_q = int64_t{c.n_rows} * n_heads;
    std::vector<std::vector<float>> parts(begin.size(), std::vector<float>(static_cast<size_t>(n_q * (hd + 2)), std::nanf("")));
    for (size_t r = 0; r < begin.size(); ++r) {
      const int64_t a = begin[r], z = r + 1 < begin.size() ? begin[r + 1] : INT64_MAX;
      std::vector<bp::KvRowsView> piece;  // the chain's rows [a, z)
      int64_t key0 = 0;
      for (const bp::KvRowsView& src : kv) {
        const int64_t from = std::max(a, key0), to = std::min(z, key0 + src.n);
        if (from < to) piece.push_back({src.k + (from - key0) * kv_dim, src.v + (from - key0) * kv_dim, to - from});
        key0 += src.n;
      }
      bp::AttentionTile run = t;
      run.kv = piece.data();
      run.n_kv = static_cast<int32_t>(piece.size());
      run.n_keys0 = std::min(t.n_keys0, z) - a;
      run.partial = parts[r].data();
      bp::attention_tile(run);
      for (float x : parts[r]) EXPECT_FALSE(std::isnan(x)) << "run " << r << " left a partial result unwritten";
    }
    std::vector<const float*> ptrs;
    for (const std::vector<float>& p : parts) ptrs.push_back(p.data());
    bp::attention_merge(t, ptrs.data(), static_cast<int>(ptrs.size()));
  }

  const std::string what = std::string("isa=") + bp::kernels_isa() + (bf16 ? " bf16" : "") + " head_dim=" + std::to_string(hd) +
                           " kv_heads=" + std::to_string(c.n_kv_heads) + " group=" + std::to_string(c.n_group) + " rows=" + std::to_string(c.n_rows) +
                           " past=" + std::to_string(n_past) + " runs=" + std::to_string(runs.size() + 1);
  for (int32_t r = 0; r < c.n_rows; ++r) {
    for (int32_t h = 0; h < n_heads; ++h) {
      const float* qv = q.data() + r * q_dim + head0 + int64_t{h} * hd;
      const int64_t col = int64_t{h / c.n_group} * hd;  // its key/value head, from the tile's first
      std::vector<double> score, o(static_cast<size_t>(hd), 0.0);
      std::vector<const float*> vrow;
      const int64_t n_seen = n_past + r + 1;
      for (size_t s = 0; s < kv.size() && static_cast<int64_t>(score.size()) < n_seen; ++s) {
        for (int64_t j = 0; j < kv[s].n && static_cast<int64_t>(score.size()) < n_seen; ++j) {
          double d = 0;
          for (int32_t x = 0; x < hd; ++x) d += static_cast<double>(qv[x]) * kv[s].k[j * kv_dim + col + x];
          score.push_back(d * t.scale);
          vrow.push_back(kv[s].v + j * kv_dim + col);
        }
      }
      double m = -INFINITY, sum = 0;
      for (double x : score) m = std::max(m, x);
      for (size_t j = 0; j < score.size(); ++j) {
        const double p = std::exp(score[j] - m);
        sum += p;
        for (int32_t x = 0; x < hd; ++x) o[static_cast<size_t>(x)] += p * vrow[j][x];
      }
      const float* got = out.data() + r * q_dim + head0 + int64_t{h} * hd;
      for (int32_t x = 0; x < hd; ++x) {
        EXPECT_NEAR(got[x], o[static_cast<size_t>(x)] / sum, tol * 4.0)  // |v| <~ 4 (normal)
            << what << " row " << r << " head " << h << " dim " << x;
        if (::testing::Test::HasFailure()) return out;
      }
    }
  }
  // Only the group's heads are written.
  for (int32_t r = 0; r < c.n_rows; ++r) {
    for (int64_t x = 0; x < q_dim; ++x) {
      if (x >= head0 && x < head0 + int64_t{n_heads} * hd) continue;
      EXPECT_TRUE(std::isnan(out[static_cast<size_t>(r * q_dim + x)])) << what << ": wrote outside the tile";
      if (::testing::Test::HasFailure()) return out;
    }
  }
  EXPECT_EQ(out.back(), 12345.0f) << what;
  return out;
}

TEST(Attention, TileMatchesDoubleReference) {
  IsaRestore restore;
  const std::vector<Case> cases = {
      {64, 1, 1, 1, {}, 1.0f},            // first token
      {64, 1, 1, 1, {5, 130, 7}, 1.0f},   // decode over a chain
      {64, 1, 64, 1, {}, 1.0f},           // prefill tile, no past
      {64, 1, 37, 1, {70}, 1.0f},         // ragged prefill tile after a past
      {64, 1, 16, 1, {1, 2, 3}, 1.0f},
      {64, 8, 1, 1, {300}, 1.0f},         // grouped-query decode
      {64, 8, 8, 1, {9, 65}, 1.0f},       // grouped-query prefill tile (64 query vectors)
      {64, 4, 3, 1, {33}, 1.0f},          // 12 query vectors
      {16, 2, 20, 1, {4}, 1.0f},          // small heads
      {8, 1, 5, 1, {}, 1.0f},
      {80, 1, 24, 1, {40}, 1.0f},         // head_dim not a multiple of 16
      {80, 2, 3, 1, {17}, 1.0f},
      {128, 1, 48, 1, {100}, 1.0f},
      {128, 1, 2, 1, {63, 1}, 1.0f},
      {160, 1, 20, 1, {10}, 1.0f},        // wider than the AVX-512 path: portable
      {64, 1, 1, 3, {200}, 1.0f},         // decode over three key/value heads at once
      {64, 2, 1, 3, {5, 70}, 1.0f},
      {64, 8, 1, 2, {100}, 1.0f},         // grouped-query decode, two key/value heads: 16 queries
      {64, 1, 3, 2, {40}, 1.0f},          // a short span over two heads
      {80, 1, 2, 3, {33}, 1.0f},
      {64, 4, 5, 3, {10}, 1.0f},          // 60 query vectors over three heads (portable)
      {64, 1, 32, 1, {50}, 8.0f},         // peaked softmax (scores in the tens)
      {64, 1, 1, 1, {50}, 8.0f},
  };
  uint32_t seed = 1;
  for (const std::string& isa : {std::string("scalar"), available_isas().back()}) {
    ASSERT_TRUE(bp::kernels_force_isa(isa));
    for (const Case& c : cases) {
      check_case(c, seed++);
      if (::testing::Test::HasFatalFailure()) return;
    }
  }
}

// Decode's split of a long context: partial tiles over runs of the keys (run boundaries inside
// and between sources), combined, equal the whole tile's softmax.
TEST(Attention, PartialRunsMergeToDoubleReference) {
  IsaRestore restore;
  struct SplitCase {
    Case c;
    std::vector<int64_t> runs;
  };
  const std::vector<SplitCase> cases = {
      {{64, 1, 1, 1, {300}, 1.0f}, {150}},               // decode, two runs of one source
      {{64, 1, 1, 1, {5, 130, 7}, 1.0f}, {60, 135}},     // three runs across source boundaries
      {{64, 1, 1, 3, {200}, 1.0f}, {67, 134}},           // three key/value heads at once
      {{64, 8, 1, 2, {100}, 1.0f}, {50}},                // grouped-query, 16 query vectors
      {{64, 2, 3, 2, {90}, 1.0f}, {30, 60}},             // a short span: its own keys in the last run
      {{80, 1, 2, 3, {33}, 1.0f}, {11}},                 // head_dim not a multiple of 16
      {{16, 4, 4, 1, {40}, 1.0f}, {20}},                 // 16 query vectors of one head
      {{64, 4, 5, 3, {70}, 1.0f}, {35}},                 // 60 query vectors (portable)
      {{64, 1, 1, 1, {400}, 8.0f}, {100, 200, 300}},     // peaked softmax: the maximum in one run
  };
  uint32_t seed = 700;
  for (const std::string& isa : {std::string("scalar"), available_isas().back()}) {
    ASSERT_TRUE(bp::kernels_force_isa(isa));
    for (const SplitCase& sc : cases) {
      check_case(sc.c, seed++, false, 2e-5, sc.runs);
      if (::testing::Test::HasFailure()) return;
    }
  }
}

// AttentionTile::bf16 (prefill tiles, AVX512_BF16): bf16 products, so only near the reference,
// but not equal to the f32 tile (else the bf16 path did not run).
TEST(Attention, Bf16TilesNearDoubleReference) {
  if (bp::testing::available_isas().back() != "avx512" || !__builtin_cpu_supports("avx512bf16")) {
    GTEST_SKIP() << "needs AVX512_BF16";
  }
  IsaRestore restore;
  ASSERT_TRUE(bp::kernels_force_isa("avx512"));
  const std::vector<Case> cases = {
      {64, 1, 64, 1, {}, 1.0f},          // a prefill tile, no past
      {64, 1, 37, 1, {70}, 1.0f},        // ragged, an odd block of keys
      {64, 1, 16, 1, {1, 2, 3}, 1.0f},   // sources of odd sizes
      {64, 8, 8, 1, {9, 65}, 1.0f},      // grouped-query heads
      {16, 2, 20, 1, {4}, 1.0f},         // small heads
      {80, 1, 24, 1, {40}, 1.0f},        // head_dim not a multiple of 16
      {128, 1, 48, 1, {100}, 1.0f},
      {64, 1, 64, 1, {1500, 400}, 1.0f}, // long context
      {64, 1, 32, 1, {50}, 8.0f},        // peaked softmax (scores in the tens)
  };
  uint32_t seed = 500;
  for (const Case& c : cases) {
    const std::vector<float> exact = check_case(c, seed);
    const std::vector<float> rounded = check_case(c, seed, true, c.q_scale > 1.0f ? 2e-2 : 3e-3);
    if (::testing::Test::HasFailure()) return;
    double max_diff = 0;
    for (size_t i = 0; i + 1 < exact.size(); ++i) {
      if (!std::isnan(exact[i])) max_diff = std::max(max_diff, static_cast<double>(std::abs(exact[i] - rounded[i])));
    }
    EXPECT_GT(max_diff, 1e-5) << "head_dim " << c.head_dim << ": the bf16 tile gave the f32 tile's outputs";
    ++seed;
  }
  // An odd head size has no pairs of dimensions: the f32 tile runs instead, with the same outputs.
  const Case odd{9, 1, 20, 1, {5}, 1.0f};
  const std::vector<float> exact = check_case(odd, 900);
  const std::vector<float> flagged = check_case(odd, 900, true);
  for (size_t i = 0; i < exact.size(); ++i) {
    if (!std::isnan(exact[i])) {
      ASSERT_EQ(exact[i], flagged[i]) << "odd head size, output " << i;
    }
  }
}

TEST(Attention, LongContext) {
  IsaRestore restore;
  for (const std::string& isa : {std::string("scalar"), available_isas().back()}) {
    ASSERT_TRUE(bp::kernels_force_isa(isa));
    check_case({64, 1, 64, 1, {1500, 400}, 1.0f}, 100);
    check_case({64, 1, 1, 1, {2047}, 1.0f}, 101);
    check_case({64, 1, 1, 3, {2047}, 1.0f}, 103);
    check_case({64, 8, 1, 1, {1200, 847}, 1.0f}, 102);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

// The decode schedule (one parallel region per pass) and the prefill one (a region per step),
// run by each thread of the caller's own team: same logits as from one thread alone.
TEST(Attention, ForwardInsideCallersParallelRegion) {
  for (bp::Arch arch : {bp::Arch::LLAMA, bp::Arch::GPT2}) {
    const auto model = bp::Model::load(bp::testing::generated_model(arch, bp::DType::F32));
    const int32_t V = model->config().n_vocab;
    std::vector<int32_t> tokens(48);
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((i * 37 + 5) % static_cast<size_t>(V));
    auto run = [&] {  // a 40-row prefill, then 8 one-row steps: [8][V] logits of the steps
      bp::Sequence seq(*model);
      seq.append(std::span<const int32_t>(tokens.data(), 40), bp::LogitsMode::LAST);
      std::vector<float> out;
      for (size_t i = 40; i < tokens.size(); ++i) {
        const std::vector<float> l = seq.append(std::span<const int32_t>(&tokens[i], 1));
        out.insert(out.end(), l.begin(), l.end());
      }
      return out;
    };
    const std::vector<float> alone = run();
    std::vector<std::vector<float>> got(2);
#pragma omp parallel num_threads(2)
    got[static_cast<size_t>(omp_get_thread_num())] = run();
    for (const std::vector<float>& g : got) {
      ASSERT_EQ(g.size(), alone.size());
      for (size_t i = 0; i < g.size(); ++i) ASSERT_NEAR(g[i], alone[i], 1e-4 * std::max(1.0f, std::abs(alone[i]))) << bp::arch_name(arch) << " at " << i;
    }
  }
}

}  // namespace

// AttentionTile::kv_epoch: bf16 tiles of one epoch over the same sources reuse the keys and values
// an earlier tile of the thread rounded. Tiles in every order (big after small, small after big,
// heads alternating, a last block with an odd number of keys after a tile that rounded all of
// it) give the bits of tiles that round their own; a new epoch after K/V changed sees the change.
TEST(Attention, Bf16TilesOfOneEpochReuseTheRoundedKeysAndValuesExactly) {
  if (bp::testing::available_isas().back() != "avx512" || !__builtin_cpu_supports("avx512bf16")) {
    GTEST_SKIP() << "needs AVX512_BF16";
  }
  IsaRestore restore;
  ASSERT_TRUE(bp::kernels_force_isa("avx512"));
  const int32_t hd = 64, n_heads = 2;
  const int64_t past = 100, own = 150, kv_dim = int64_t{n_heads} * hd, q_dim = kv_dim;
  std::mt19937 rng(77);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> k0(past * kv_dim), v0(past * kv_dim), k1(own * kv_dim), v1(own * kv_dim), q(own * q_dim);
  for (std::vector<float>* a : {&k0, &v0, &k1, &v1, &q}) {
    for (float& x : *a) x = normal(rng);
  }
  struct Piece {
    int32_t head, row0, n_rows;
  };
  // Own rows [row0, row0 + n_rows) of a head: each sees the past and its own rows up to itself.
  auto run = [&](const Piece& p, uint64_t epoch, std::vector<float>& out) {
    const bp::KvRowsView kv[2] = {{k0.data() + p.head * hd, v0.data() + p.head * hd, past},
                                  {k1.data() + p.head * hd, v1.data() + p.head * hd, own}};
    bp::AttentionTile t;
    t.q = q.data() + p.row0 * q_dim + p.head * hd;
    t.out = out.data() + p.row0 * q_dim + p.head * hd;
    t.ldq = t.ldo = q_dim;
    t.n_rows = p.n_rows;
    t.head_dim = hd;
    t.scale = 0.125f;
    t.kv = kv;
    t.n_kv = 2;
    t.kv_stride = kv_dim;
    t.n_keys0 = past + p.row0 + 1;
    t.bf16 = true;
    t.kv_epoch = epoch;
    bp::attention_tile(t);
  };
  const std::vector<std::vector<Piece>> orders = {
      {{0, 86, 64}, {0, 22, 64}, {0, 0, 21}, {0, 0, 32}},   // biggest first, then an odd last block
      {{0, 0, 21}, {0, 0, 32}, {0, 22, 64}, {0, 86, 64}},   // smallest first: blocks grow
      {{0, 86, 64}, {1, 86, 64}, {0, 22, 64}, {1, 0, 33}},  // heads alternating
  };
  for (size_t o = 0; o < orders.size(); ++o) {
    std::vector<float> fresh(own * q_dim, 0.0f), reused(own * q_dim, 0.0f);
    const uint64_t epoch = bp::next_kv_epoch();
    for (const Piece& p : orders[o]) {
      std::fill(fresh.begin(), fresh.end(), 0.0f);
      std::fill(reused.begin(), reused.end(), 0.0f);
      run(p, 0, fresh);
      run(p, epoch, reused);
      for (size_t i = 0; i < fresh.size(); ++i) {
        ASSERT_EQ(fresh[i], reused[i]) << "order " << o << ", tile at row " << p.row0 << " of head " << p.head << ", output " << i;
      }
    }
  }
  // K and V change between epochs (the next layer, the next pass): a new epoch rounds them anew.
  const Piece p{0, 86, 64};
  std::vector<float> before(own * q_dim), after(own * q_dim), fresh(own * q_dim);
  run(p, bp::next_kv_epoch(), before);
  for (float& x : k1) x = -x;
  for (float& x : v0) x = 2.0f * x;
  run(p, bp::next_kv_epoch(), after);
  run(p, 0, fresh);
  EXPECT_NE(before, after);
  EXPECT_EQ(fresh, after);
}
