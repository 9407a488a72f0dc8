// The representation store: block encoding (round trip per codec, truncation, flipped bytes,
// foreign context), the key chain, the dir: backend (LRU eviction, several writer processes,
// a writer killed mid-flight), the redis: backend against a real redis-server, and StoreWriter.
#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "backprompt/error.h"
#include "store/block.h"
#include "store/store.h"
#include "redis_server.h"
#include "test_util.h"

namespace bp = backprompt;
namespace fs = std::filesystem;

namespace {

// ---------------------------------------------------------------------------------------------
// Helpers

bp::BlockContext small_context(bp::KvCodec codec = {}) {
  bp::BlockContext ctx;
  ctx.model_fp = 0x1234567890abcdefull;
  ctx.tokenizer_fp = 0xfedcba0987654321ull;
  ctx.codec = codec;
  ctx.n_layer = 2;
  ctx.kv_dim = 16;
  ctx.n_vocab = 32;
  ctx.block_size = 8;
  return ctx;
}

// Deterministic block contents for `seed` (so that any process can check what it reads).
bp::BlockData make_data(const bp::BlockContext& ctx, int seed, int n, bool logprobs = true, bool logits = true) {
  bp::BlockData d;
  d.pos0 = seed * n;
  for (int i = 0; i < n; ++i) d.tokens.push_back((seed * 7919 + i * 31) % 1000);
  const size_t n_kv = size_t(ctx.n_layer) * n * ctx.kv_dim;
  for (size_t i = 0; i < n_kv; ++i) {
    d.k.push_back(std::sin(float(seed) + 0.37f * float(i)) * 3.0f);
    d.v.push_back(std::cos(float(seed) * 1.1f + 0.13f * float(i)));
  }
  if (logprobs) {
    for (int i = 0; i < n; ++i) d.logprobs.push_back(-0.5f * float(i + seed % 3));
    if (n > 0) d.logprobs[0] = std::numeric_limits<float>::quiet_NaN();
  }
  if (logits)
    for (int i = 0; i < ctx.n_vocab; ++i) d.last_logits.push_back(float(i - seed) * 0.25f);
  return d;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

bool same_data(const bp::BlockData& a, const bp::BlockData& b) {
  return a.pos0 == b.pos0 && a.tokens == b.tokens && same_bits(a.k, b.k) && same_bits(a.v, b.v) &&
         same_bits(a.logprobs, b.logprobs) && same_bits(a.last_logits, b.last_logits);
}

// The error code of decode_block, or nullopt if it succeeded.
std::optional<bp::ErrorCode> decode_error(const bp::BlockContext& ctx, std::span<const uint8_t> bytes) {
  try {
    bp::decode_block(ctx, bytes);
    return std::nullopt;
  } catch (const bp::Error& e) {
    return e.code();
  }
}

bp::StoreKey key_of(int i) {
  const bp::BlockContext ctx = small_context();
  const int32_t t = i;
  return bp::chain_next(bp::chain_root(ctx), std::span<const int32_t>(&t, 1));
}

std::string fresh_dir(const std::string& name) {
  const std::string dir = bp::testing::temp_dir() + "/store-" + name + "-" + std::to_string(::getpid());
  fs::remove_all(dir);
  return dir;
}

// Runs `fn` in a forked child; the child exits 0 if fn returns true, 1 otherwise (or on throw).
pid_t run_in_child(const std::function<bool()>& fn) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    int rc = 1;
    try {
      rc = fn() ? 0 : 1;
    } catch (...) {
    }
    ::_exit(rc);
  }
  return pid;
}

int wait_child(pid_t pid) {
  int status = 0;
  if (::waitpid(pid, &status, 0) != pid) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// Every file under a dir: store with a final name (32 hex digits) decodes under ctx.
void expect_all_final_files_decode(const std::string& dir, const bp::BlockContext& ctx, int& n_files) {
  n_files = 0;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    const std::string name = e.path().filename().string();
    if (name.size() != 32 || name.starts_with(".")) continue;
    std::vector<uint8_t> bytes(fs::file_size(e.path()));
    FILE* f = std::fopen(e.path().c_str(), "rb");
    ASSERT_TRUE(f);
    ASSERT_EQ(std::fread(bytes.data(), 1, bytes.size(), f), bytes.size());
    std::fclose(f);
    EXPECT_EQ(decode_error(ctx, bytes), std::nullopt) << e.path();
    ++n_files;
  }
}

// ---------------------------------------------------------------------------------------------
// Blocks

const std::vector<bp::KvCodec> ALL_CODECS = {
    {bp::DType::F32, false}, {bp::DType::F32, true},  {bp::DType::F16, false}, {bp::DType::F16, true},
    {bp::DType::BF16, false}, {bp::DType::BF16, true}, {bp::DType::Q8_0, false}, {bp::DType::Q8_0, true}};

std::string codec_label(const bp::KvCodec& c) { return std::string(bp::dtype_name(c.type)) + (c.zstd ? "+zstd" : ""); }

TEST(StoreBlock, RoundTripEveryCodec) {
  for (const bp::KvCodec& codec : ALL_CODECS) {
    SCOPED_TRACE(codec_label(codec));
    const bp::BlockContext ctx = small_context(codec);
    for (int n : {0, 1, 5, 8, 33}) {
      for (int variant = 0; variant < 3; ++variant) {
        const bp::BlockData d = make_data(ctx, n + variant, n, variant != 1, variant != 2);
        const std::vector<uint8_t> bytes = bp::encode_block(ctx, d);
        const bp::BlockData got = bp::decode_block(ctx, bytes);
        EXPECT_EQ(got.pos0, d.pos0);
        EXPECT_EQ(got.tokens, d.tokens);
        EXPECT_TRUE(same_bits(got.logprobs, d.logprobs));  // outputs are stored exactly, NaN included
        EXPECT_TRUE(same_bits(got.last_logits, d.last_logits));
        ASSERT_EQ(got.k.size(), d.k.size());
        ASSERT_EQ(got.v.size(), d.v.size());
        if (codec.type == bp::DType::F32) {
          EXPECT_TRUE(same_bits(got.k, d.k));
          EXPECT_TRUE(same_bits(got.v, d.v));
        } else {
          // f16: 2^-11 relative; bf16: 2^-8 relative; q8_0: half a step of max|x|/127 (|x| <= 3).
          auto tol = [&](float x) {
            if (codec.type == bp::DType::F16) return 0.001f * std::abs(x) + 1e-7f;
            if (codec.type == bp::DType::BF16) return 0.008f * std::abs(x) + 1e-30f;
            return 3.0f / 127.0f;
          };
          for (size_t i = 0; i < d.k.size(); ++i) {
            ASSERT_NEAR(got.k[i], d.k[i], tol(d.k[i])) << i;
            ASSERT_NEAR(got.v[i], d.v[i], tol(d.v[i])) << i;
          }
        }
      }
    }
  }
}

TEST(StoreBlock, DecodeRejectsTruncationAndTrailingBytes) {
  for (const bp::KvCodec& codec : {bp::KvCodec{bp::DType::F32, false}, bp::KvCodec{bp::DType::Q8_0, true}}) {
    SCOPED_TRACE(codec_label(codec));
    const bp::BlockContext ctx = small_context(codec);
    const std::vector<uint8_t> bytes = bp::encode_block(ctx, make_data(ctx, 3, 5));
    for (size_t len = 0; len < bytes.size(); ++len)
      ASSERT_EQ(decode_error(ctx, std::span(bytes).first(len)), bp::ErrorCode::CORRUPT_FILE) << "length " << len;
    std::vector<uint8_t> longer = bytes;
    longer.push_back(0);
    EXPECT_EQ(decode_error(ctx, longer), bp::ErrorCode::CORRUPT_FILE);
  }
}

TEST(StoreBlock, DecodeRejectsFlippedBytesInEverySection) {
  for (const bp::KvCodec& codec : {bp::KvCodec{bp::DType::F32, false}, bp::KvCodec{bp::DType::F16, true}}) {
    SCOPED_TRACE(codec_label(codec));
    const bp::BlockContext ctx = small_context(codec);
    const std::vector<uint8_t> bytes = bp::encode_block(ctx, make_data(ctx, 4, 6));
    std::vector<uint8_t> bad = bytes;
    for (size_t at = 0; at < bytes.size(); ++at) {
      for (uint8_t mask : {uint8_t(0x01), uint8_t(0x80)}) {
        bad[at] ^= mask;
        try {
          bp::decode_block(ctx, bad);
          ADD_FAILURE() << "no error for a flip at offset " << at;
        } catch (const bp::Error& e) {
          ASSERT_EQ(e.code(), bp::ErrorCode::CORRUPT_FILE) << "offset " << at << ": " << e.what();
        }
        bad[at] ^= mask;
      }
    }
  }
}

TEST(StoreBlock, DecodeErrorsNameTheSection) {
  const bp::BlockContext ctx = small_context();
  std::vector<uint8_t> bytes = bp::encode_block(ctx, make_data(ctx, 1, 4));
  bytes[bytes.size() - 1] ^= 1;  // inside the last section: the logits
  try {
    bp::decode_block(ctx, bytes);
    FAIL();
  } catch (const bp::Error& e) {
    EXPECT_NE(std::string(e.what()).find("logits"), std::string::npos) << e.what();
  }
}

TEST(StoreBlock, WrongContextIsModelMismatch) {
  const bp::BlockContext ctx = small_context();
  const std::vector<uint8_t> bytes = bp::encode_block(ctx, make_data(ctx, 2, 8));
  std::vector<std::pair<std::string, bp::BlockContext>> others;
  for (int i = 0; i < 8; ++i) others.emplace_back("", ctx);
  others[0].first = "model";        others[0].second.model_fp ^= 1;
  others[1].first = "tokenizer";    others[1].second.tokenizer_fp ^= 1;
  others[2].first = "storage type"; others[2].second.codec.type = bp::DType::F16;
  others[3].first = "storage type"; others[3].second.codec.zstd = true;
  others[4].first = "n_layer";      others[4].second.n_layer = 3;
  others[5].first = "kv_dim";       others[5].second.kv_dim = 32;
  others[6].first = "n_vocab";      others[6].second.n_vocab = 33;
  others[7].first = "block size";   others[7].second.block_size = 16;
  for (const auto& [field, other] : others) {
    try {
      bp::decode_block(other, bytes);
      ADD_FAILURE() << "no error for another " << field;
    } catch (const bp::Error& e) {
      EXPECT_EQ(e.code(), bp::ErrorCode::MODEL_MISMATCH) << e.what();
      EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
    }
  }
}

TEST(StoreBlock, DescribeNeverThrows) {
  const bp::BlockContext ctx = small_context({bp::DType::Q8_0, true});
  const std::vector<uint8_t> bytes = bp::encode_block(ctx, make_data(ctx, 9, 8));
  EXPECT_TRUE(bp::is_block(bytes));
  const std::string s = bp::describe_block(bytes);
  EXPECT_NE(s.find("q8_0+zstd"), std::string::npos) << s;
  EXPECT_NE(s.find("1234567890abcdef"), std::string::npos) << s;
  EXPECT_EQ(s.find("MISMATCH"), std::string::npos) << s;
  for (size_t len = 0; len < bytes.size(); len += 7) EXPECT_FALSE(bp::describe_block(std::span(bytes).first(len)).empty());
  std::vector<uint8_t> bad = bytes;
  bad[200] ^= 0xff;
  EXPECT_NE(bp::describe_block(bad).find("MISMATCH"), std::string::npos);
  std::mt19937 rng(5);
  std::vector<uint8_t> junk(300);
  for (auto& b : junk) b = uint8_t(rng());
  std::memcpy(junk.data(), "BPKV", 4);
  EXPECT_FALSE(bp::describe_block(junk).empty());
  EXPECT_FALSE(bp::is_block(std::span(bytes).first(3)));
}

// ---------------------------------------------------------------------------------------------
// Keys

TEST(StoreKeys, EqualPrefixesShareKeysAndAnyChangeChangesThem) {
  const bp::BlockContext ctx = small_context();
  std::vector<int32_t> a(24), b(24);
  for (int i = 0; i < 24; ++i) a[i] = b[i] = i * 3 + 1;
  b[20] = 999;  // differs in the third block only
  auto chain = [](const bp::BlockContext& c, const std::vector<int32_t>& t) {
    std::vector<bp::StoreKey> keys{bp::chain_root(c)};
    for (size_t i = 0; i + c.block_size <= t.size(); i += c.block_size)
      keys.push_back(bp::chain_next(keys.back(), std::span(t).subspan(i, c.block_size)));
    return keys;
  };
  const auto ka = chain(ctx, a), kb = chain(ctx, b);
  ASSERT_EQ(ka.size(), 4u);
  EXPECT_EQ(ka[0], kb[0]);
  EXPECT_EQ(ka[1], kb[1]);
  EXPECT_EQ(ka[2], kb[2]);
  EXPECT_NE(ka[3], kb[3]);
  EXPECT_EQ(ka, chain(ctx, a));  // deterministic
  EXPECT_EQ(ka[1].hex().size(), 32u);
  EXPECT_NE(ka[1].hex(), ka[2].hex());

  // Every field of the context changes the root and so every key.
  std::vector<bp::BlockContext> others(7, ctx);
  others[0].model_fp ^= 1;
  others[1].tokenizer_fp ^= 1;
  others[2].codec.type = bp::DType::BF16;
  others[3].codec.zstd = true;
  others[4].block_size = 12;
  others[5].n_layer = 4;
  others[6].kv_dim = 8;
  for (const auto& o : others) {
    const auto ko = chain(o, a);
    EXPECT_NE(ko[0], ka[0]);
    EXPECT_NE(ko[1], ka[1]);
  }

  // Path keys: the tail matters, and no path key equals a block key.
  const std::vector<int32_t> tail = {5, 6, 7};
  const bp::StoreKey p = bp::path_key(ka[2], tail);
  EXPECT_NE(p, bp::chain_next(ka[2], tail));
  EXPECT_NE(p, bp::path_key(ka[2], std::span(tail).first(2)));
  EXPECT_NE(p, bp::path_key(kb[3], tail));
  EXPECT_NE(bp::path_key(ka[2], {}), bp::path_key(ka[1], {}));
  EXPECT_EQ(p, bp::path_key(kb[2], tail));
  // A token change anywhere, even a swap inside a block, changes the block's key.
  std::vector<int32_t> c = a;
  std::swap(c[1], c[2]);
  EXPECT_NE(chain(ctx, c)[1], ka[1]);
}

// ---------------------------------------------------------------------------------------------
// URIs

TEST(StoreUri, MalformedIsInvalidArgument) {
  for (const std::string uri : {"", "dir:", "file:/tmp/x", "dir:/tmp/x?max_bytes=abc", "dir:/tmp/x?max_bytes=0",
                                "dir:/tmp/x?colour=red", "redis://", "redis://:6379", "redis://host:0",
                                "redis://host:99999", "redis://host:12x", "redis://host:6379/x", "redis://[::1"}) {
    try {
      bp::Store::open(uri);
      ADD_FAILURE() << "accepted '" << uri << "'";
    } catch (const bp::Error& e) {
      EXPECT_EQ(e.code(), bp::ErrorCode::INVALID_ARGUMENT) << uri;
    }
  }
  const std::string dir = fresh_dir("uri");
  EXPECT_NE(bp::Store::open("dir:" + dir + "?max_bytes=64m")->describe().find("64.0 MiB"), std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// dir:

TEST(StoreDir, PutGetMissRemove) {
  const std::string dir = fresh_dir("basic");
  auto store = bp::Store::open("dir:" + dir);
  const bp::BlockContext ctx = small_context();
  EXPECT_FALSE(store->get(key_of(1)).has_value());
  const bp::BlockData d = make_data(ctx, 1, 8);
  store->put(key_of(1), bp::encode_block(ctx, d));
  store->put(key_of(1), bp::encode_block(ctx, d));  // a second put of the same key is harmless
  auto got = store->get(key_of(1));
  ASSERT_TRUE(got.has_value());
  EXPECT_TRUE(same_data(bp::decode_block(ctx, *got), d));
  EXPECT_FALSE(store->get(key_of(2)).has_value());
  // Another store object on the same directory sees it.
  EXPECT_TRUE(bp::Store::open("dir:" + dir)->get(key_of(1)).has_value());
  // A file that fails to decode: the caller removes it, then it is a miss.
  const std::string hex = key_of(3).hex();
  fs::create_directories(dir + "/" + hex.substr(0, 2));
  FILE* f = std::fopen((dir + "/" + hex.substr(0, 2) + "/" + hex).c_str(), "wb");
  std::fputs("BPKV garbage", f);
  std::fclose(f);
  auto bad = store->get(key_of(3));
  ASSERT_TRUE(bad.has_value());
  EXPECT_EQ(decode_error(ctx, *bad), bp::ErrorCode::CORRUPT_FILE);
  store->remove(key_of(3));
  EXPECT_FALSE(store->get(key_of(3)).has_value());
  store->remove(key_of(4));  // absent: nothing happens
}

TEST(StoreDir, LruEvictionKeepsRecentlyReadFiles) {
  const std::string dir = fresh_dir("lru");
  auto store = bp::Store::open("dir:" + dir + "?max_bytes=10000");
  const std::vector<uint8_t> value(1000, 0x5a);
  const auto tick = [] { std::this_thread::sleep_for(std::chrono::milliseconds(30)); };  // mtime granularity
  for (int i = 0; i < 10; ++i) store->put(key_of(i), value);  // exactly at the limit
  tick();
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(store->get(key_of(i)).has_value());
  tick();
  // Each time the total passes 10000 the oldest files go until it is at most 9000: two of 3..9
  // at blocks 10, 12 and 14 each (which ones among equal mtimes is unspecified).
  for (int i = 10; i < 16; ++i) store->put(key_of(i), value);
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(store->get(key_of(i)).has_value()) << "recently read block " << i << " evicted";
  int n_old_kept = 0;
  for (int i = 3; i < 10; ++i) n_old_kept += fs::exists(dir + "/" + key_of(i).hex().substr(0, 2) + "/" + key_of(i).hex());
  EXPECT_EQ(n_old_kept, 1);
  for (int i = 10; i < 16; ++i) EXPECT_TRUE(store->get(key_of(i)).has_value()) << "new block " << i << " evicted";
  uintmax_t total = 0;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file()) total += e.file_size();
  EXPECT_LE(total, 10000u);
}

TEST(StoreDir, ConcurrentWriterProcesses) {
  const std::string dir = fresh_dir("procs");
  const bp::BlockContext ctx = small_context();
  constexpr int N_KEYS = 40, N_PROCS = 4;
  std::vector<pid_t> pids;
  for (int p = 0; p < N_PROCS; ++p) {
    pids.push_back(run_in_child([&, p] {
      auto store = bp::Store::open("dir:" + dir);
      bool ok = true;
      for (int r = 0; r < N_KEYS; ++r) {
        const int i = (r * 7 + p * 11) % N_KEYS;  // each process in its own order, all the same keys
        store->put(key_of(i), bp::encode_block(ctx, make_data(ctx, i, 8)));
        const int j = (r * 13 + p) % N_KEYS;
        if (auto got = store->get(key_of(j))) ok = ok && same_data(bp::decode_block(ctx, *got), make_data(ctx, j, 8));
      }
      return ok;
    }));
  }
  for (pid_t pid : pids) EXPECT_EQ(wait_child(pid), 0);
  auto store = bp::Store::open("dir:" + dir);
  for (int i = 0; i < N_KEYS; ++i) {
    auto got = store->get(key_of(i));
    ASSERT_TRUE(got.has_value()) << i;
    EXPECT_TRUE(same_data(bp::decode_block(ctx, *got), make_data(ctx, i, 8))) << i;
  }
  int n_files = 0;
  expect_all_final_files_decode(dir, ctx, n_files);
  EXPECT_EQ(n_files, N_KEYS);
}

TEST(StoreDir, WriterKilledMidFlightLeavesAReadableStore) {
  const std::string dir = fresh_dir("kill");
  bp::BlockContext ctx = small_context();
  ctx.n_layer = 4;
  ctx.kv_dim = 256;  // ~0.5 MB blocks: the kill is likely to land inside a write
  std::mt19937 rng(std::random_device{}());
  int n_written_total = 0;
  for (int round = 0; round < 3; ++round) {
    int ready[2];
    ASSERT_EQ(::pipe(ready), 0);
    const pid_t pid = run_in_child([&] {
      ::close(ready[0]);
      auto store = bp::Store::open("dir:" + dir);
      for (int i = 0; i < 100000; ++i) {
        store->put(key_of(round * 100000 + i), bp::encode_block(ctx, make_data(ctx, i, 64)));
        if (i == 0) {
          const char c = 1;
          if (::write(ready[1], &c, 1) != 1) return false;
        }
      }
      return true;
    });
    ::close(ready[1]);
    char c;
    ASSERT_EQ(::read(ready[0], &c, 1), 1);
    ::close(ready[0]);
    std::this_thread::sleep_for(std::chrono::milliseconds(std::uniform_int_distribution<int>(5, 60)(rng)));
    ::kill(pid, SIGKILL);
    EXPECT_EQ(wait_child(pid), 128 + SIGKILL);

    int n_files = 0;
    expect_all_final_files_decode(dir, ctx, n_files);
    EXPECT_GT(n_files, n_written_total);
    n_written_total = n_files;
  }
  // Through the store: every key a writer reached decodes; the first absent key ends its run.
  auto store = bp::Store::open("dir:" + dir);
  for (int round = 0; round < 3; ++round) {
    int i = 0;
    while (auto got = store->get(key_of(round * 100000 + i))) {
      EXPECT_TRUE(same_data(bp::decode_block(ctx, *got), make_data(ctx, i, 64)));
      ++i;
    }
    EXPECT_GT(i, 0);
  }
}

// ---------------------------------------------------------------------------------------------
// redis://

using bp::testing::find_redis_server;
using bp::testing::free_port;

// One redis-server for all the Redis tests.
class StoreRedis : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { server_ = std::make_unique<bp::testing::RedisServer>(fresh_dir("redis")); }
  static void TearDownTestSuite() { server_.reset(); }

  void SetUp() override {
    if (find_redis_server().empty()) GTEST_SKIP() << "redis-server is not installed (apt install redis-server)";
    ASSERT_TRUE(server_ && server_->running()) << "could not start redis-server";
  }

  std::string uri(int db = 0) const { return server_->uri(db); }

  static inline std::unique_ptr<bp::testing::RedisServer> server_;
};

TEST_F(StoreRedis, PutGetMissRemove) {
  auto store = bp::Store::open(uri());
  const bp::BlockContext ctx = small_context({bp::DType::Q8_0, true});
  EXPECT_FALSE(store->get(key_of(100)).has_value());
  const bp::BlockData d = make_data(ctx, 100, 8);
  const std::vector<uint8_t> bytes = bp::encode_block(ctx, d);
  store->put(key_of(100), bytes);
  auto got = store->get(key_of(100));
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(*got, bytes);  // binary-safe
  EXPECT_FALSE(store->get(key_of(101)).has_value());
  // Databases are separate.
  EXPECT_FALSE(bp::Store::open(uri(1))->get(key_of(100)).has_value());
  store->remove(key_of(100));
  EXPECT_FALSE(store->get(key_of(100)).has_value());
  // Concurrent use from several threads (a pool of connections).
  std::vector<std::thread> threads;
  std::atomic<int> n_bad{0};
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < 20; ++i) {
        const int id = 200 + t * 20 + i;
        const std::vector<uint8_t> v = bp::encode_block(ctx, make_data(ctx, id, 4));
        store->put(key_of(id), v);
        if (store->get(key_of(id)) != v) ++n_bad;
      }
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(n_bad.load(), 0);
}

TEST_F(StoreRedis, TwoProcessesShareBlocks) {
  const bp::BlockContext ctx = small_context();
  const std::string u = uri(2);
  const pid_t writer = run_in_child([&] {
    auto store = bp::Store::open(u);
    for (int i = 0; i < 20; ++i) store->put(key_of(1000 + i), bp::encode_block(ctx, make_data(ctx, i, 8)));
    return true;
  });
  ASSERT_EQ(wait_child(writer), 0);
  auto store = bp::Store::open(u);
  for (int i = 0; i < 20; ++i) {
    auto got = store->get(key_of(1000 + i));
    ASSERT_TRUE(got.has_value()) << i;
    EXPECT_TRUE(same_data(bp::decode_block(ctx, *got), make_data(ctx, i, 8)));
  }
  for (int i = 20; i < 40; ++i) store->put(key_of(1000 + i), bp::encode_block(ctx, make_data(ctx, i, 8)));
  const pid_t reader = run_in_child([&] {
    auto s = bp::Store::open(u);
    for (int i = 0; i < 40; ++i) {
      auto got = s->get(key_of(1000 + i));
      if (!got || !same_data(bp::decode_block(ctx, *got), make_data(ctx, i, 8))) return false;
    }
    return true;
  });
  EXPECT_EQ(wait_child(reader), 0);
}

TEST(StoreRedisDown, MissesAndDropsWithOneWarning) {
  const int port = free_port();  // nothing listens there
  ::testing::internal::CaptureStderr();
  std::string err;
  {
    std::unique_ptr<bp::Store> store;
    EXPECT_NO_THROW(store = bp::Store::open("redis://127.0.0.1:" + std::to_string(port)));
    EXPECT_NO_THROW({
      EXPECT_FALSE(store->get(key_of(1)).has_value());
      store->put(key_of(1), std::vector<uint8_t>(100, 1));
      EXPECT_FALSE(store->get(key_of(1)).has_value());
      store->remove(key_of(1));
      bp::StoreWriter writer(*store);
      for (int i = 0; i < 10; ++i) writer.put(key_of(i), std::vector<uint8_t>(10, 2));
    });
  }
  err = ::testing::internal::GetCapturedStderr();
  size_t n_warnings = 0;
  for (size_t at = err.find("warning"); at != std::string::npos; at = err.find("warning", at + 1)) ++n_warnings;
  EXPECT_EQ(n_warnings, 1u) << err;
  EXPECT_NE(err.find(std::to_string(port)), std::string::npos) << err;
}

// ---------------------------------------------------------------------------------------------
// StoreWriter

// A store that is slow to write, to fill the writer's queue.
class SlowStore final : public bp::Store {
 public:
  std::optional<std::vector<uint8_t>> get(const bp::StoreKey& key) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = values_.find(key.hex());
    if (it == values_.end()) return std::nullopt;
    return it->second;
  }
  void put(const bp::StoreKey& key, std::span<const uint8_t> value) override {
    std::this_thread::sleep_for(std::chrono::microseconds(200));
    std::lock_guard<std::mutex> lock(mu_);
    values_[key.hex()] = std::vector<uint8_t>(value.begin(), value.end());
  }
  void remove(const bp::StoreKey& key) override {
    std::lock_guard<std::mutex> lock(mu_);
    values_.erase(key.hex());
  }
  std::string describe() const override { return "slow"; }

 private:
  std::mutex mu_;
  std::map<std::string, std::vector<uint8_t>> values_;
};

TEST(StoreWriter, FlushMakesEveryPutReadable) {
  SlowStore store;
  bp::StoreWriter writer(store, 4096);  // room for a few values only: put must wait
  std::vector<std::thread> threads;
  for (int t = 0; t < 3; ++t)
    threads.emplace_back([&, t] {
      for (int i = 0; i < 100; ++i) writer.put(key_of(t * 100 + i), std::vector<uint8_t>(1000, uint8_t(t * 100 + i)));
    });
  for (auto& th : threads) th.join();
  writer.put(key_of(999), std::vector<uint8_t>(10000, 7));  // larger than the queue: still accepted
  writer.flush();
  for (int i = 0; i < 300; ++i) {
    auto got = store.get(key_of(i));
    ASSERT_TRUE(got.has_value()) << i;
    EXPECT_EQ(*got, std::vector<uint8_t>(1000, uint8_t(i)));
  }
  EXPECT_EQ(store.get(key_of(999))->size(), 10000u);
}

TEST(StoreWriter, DestructorFlushesIntoADirStore) {
  const std::string dir = fresh_dir("writer");
  auto store = bp::Store::open("dir:" + dir);
  const bp::BlockContext ctx = small_context();
  {
    bp::StoreWriter writer(*store);
    for (int i = 0; i < 50; ++i) writer.put(key_of(i), bp::encode_block(ctx, make_data(ctx, i, 8)));
  }
  for (int i = 0; i < 50; ++i) {
    auto got = store->get(key_of(i));
    ASSERT_TRUE(got.has_value()) << i;
    EXPECT_TRUE(same_data(bp::decode_block(ctx, *got), make_data(ctx, i, 8)));
  }
}

}  // namespace
