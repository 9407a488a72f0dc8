// The representation store: persistent, content-addressed K/V blocks shared across processes
// and machines (see DESIGN.md, "Store").
//
// A key is a 128-bit content hash (block.h builds them as a hash chain over token blocks); a
// value is an encoded block (block.h). The store never interprets values. Failure is never
// fatal: a missing, unreachable or broken backend is a cache miss plus one warning on stderr
// per store, and the caller computes what it needed.
//
// Backends, chosen by URI:
//   dir:PATH[?max_bytes=N]   one file per key under PATH (dir_store.cpp). N may end in k, m, g
//                            (powers of 1024); default 10 GiB. LRU eviction on disk by mtime.
//   redis://HOST:PORT[/DB]   a Redis server through hiredis (redis_store.cpp); keys are
//                            "backprompt:" + hex. Eviction is Redis's own (maxmemory-policy).
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace backprompt {

// A 128-bit content key (XXH3-128 of what it names).
struct StoreKey {
  uint64_t hi = 0, lo = 0;

  std::string hex() const;  // 32 lowercase hex digits, hi first
  bool operator==(const StoreKey& o) const { return hi == o.hi && lo == o.lo; }
  bool operator!=(const StoreKey& o) const { return !(*this == o); }
};

// Thread-safe: all methods may be called concurrently.
class Store {
 public:
  // Opens the store named by `uri` (formats above). Error(INVALID_ARGUMENT) for a malformed URI.
  // An unreachable server or unusable directory is NOT an error: a warning on stderr (once per
  // store), every get misses, puts are dropped; a Redis store retries connecting at most every
  // few seconds.
  static std::unique_ptr<Store> open(const std::string& uri);
  virtual ~Store();

  // The value stored under `key`, or nullopt for a miss. Any failure = warning (once) + nullopt.
  // The bytes are whatever was put; the caller validates them (decode_block) and may remove()
  // the key when they are bad.
  virtual std::optional<std::vector<uint8_t>> get(const StoreKey& key) = 0;
  // Stores `value` under `key` (replacing or keeping an existing value: keys are content
  // addresses, so both are the same). Failures = warning (once), never thrown.
  virtual void put(const StoreKey& key, std::span<const uint8_t> value) = 0;
  // Best-effort deletion (used for values that fail to decode). Never throws.
  virtual void remove(const StoreKey& key) = 0;
  // "dir:/path (max 10.0 GiB)", "redis://host:port/db" — for messages and stats.
  virtual std::string describe() const = 0;
};

// Writes behind the computation: put() queues the value and returns at once, blocking only
// while the queue holds max_queue_bytes (a single value larger than that is still accepted
// when the queue is empty). One background thread drains the queue into the store.
// flush() waits until everything queued before it is written; the destructor flushes.
// Thread-safe: put and flush may be called concurrently. `store` must outlive the writer.
class StoreWriter {
 public:
  explicit StoreWriter(Store& store, size_t max_queue_bytes = size_t(256) << 20);
  ~StoreWriter();
  StoreWriter(const StoreWriter&) = delete;
  StoreWriter& operator=(const StoreWriter&) = delete;

  void put(const StoreKey& key, std::vector<uint8_t> value);
  void flush();

 private:
  void drain();

  Store& store_;
  size_t max_queue_bytes_;
  std::mutex mu_;
  std::condition_variable cv_work_;   // signalled when work arrives or on stop
  std::condition_variable cv_space_;  // signalled when the queue shrinks or goes idle
  std::deque<std::pair<StoreKey, std::vector<uint8_t>>> queue_;
  size_t queued_bytes_ = 0;
  bool busy_ = false;  // the thread is writing an item it has taken off the queue
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace backprompt
