// The store backends behind Store::open, and the warn-once helper they share.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "store/store.h"

namespace backprompt::detail {

// Prints "backprompt: warning: <store>: <message>" on stderr the first time only.
// Thread-safe.
class WarnOnce {
 public:
  void warn(const std::string& store, const std::string& message);
  bool warned() const { return warned_.load(); }

 private:
  std::atomic<bool> warned_{false};
};

// dir:PATH — one file per key under `path`, at most `max_bytes` in all (LRU eviction by mtime).
std::unique_ptr<Store> open_dir_store(const std::string& path, uint64_t max_bytes);
// redis://HOST:PORT/DB — connects now; an unreachable server is a warning, not an error.
std::unique_ptr<Store> open_redis_store(const std::string& host, int port, int db);

}  // namespace backprompt::detail
