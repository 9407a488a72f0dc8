// redis://HOST:PORT/DB — blocks in a Redis server, through hiredis.
//
// Keys are "backprompt:" + the key's hex; values are the block bytes (binary-safe GET/SET).
// Eviction is Redis's own: run the server with a maxmemory and maxmemory-policy allkeys-lru.
//
// A hiredis context serves one thread at a time, so the store keeps a small pool of connections:
// a call takes an idle one (or connects a new one) and gives it back when done. Connecting and
// every command time out after about a second. After a failed connection or command the store
// is "down" for a few seconds: calls miss (get) or drop (put) at once without touching the
// network, then the next call tries to connect again. Failures are reported once per store.
#include <hiredis/hiredis.h>
#include <sys/time.h>

#include <chrono>
#include <mutex>
#include <vector>

#include "store/backends.h"

namespace backprompt::detail {

namespace {

constexpr timeval TIMEOUT = {1, 0};
constexpr auto RETRY_INTERVAL = std::chrono::seconds(3);
constexpr size_t MAX_IDLE = 8;
constexpr const char* KEY_PREFIX = "backprompt:";

using Clock = std::chrono::steady_clock;

class RedisStore final : public Store {
 public:
  RedisStore(std::string host, int port, int db) : host_(std::move(host)), port_(port), db_(db) {
    if (redisContext* c = acquire()) release(c);  // connect now, so that a bad address warns early
  }

  ~RedisStore() override {
    for (redisContext* c : idle_) redisFree(c);
  }

  std::optional<std::vector<uint8_t>> get(const StoreKey& key) override {
    redisContext* c = acquire();
    if (!c) return std::nullopt;
    const std::string k = KEY_PREFIX + key.hex();
    redisReply* r = static_cast<redisReply*>(redisCommand(c, "GET %b", k.data(), k.size()));
    if (!r) return failed(c, "GET");
    std::optional<std::vector<uint8_t>> result;
    if (r->type == REDIS_REPLY_STRING) {
      const uint8_t* p = reinterpret_cast<const uint8_t*>(r->str);
      result.emplace(p, p + r->len);
    } else if (r->type != REDIS_REPLY_NIL) {
      warn_.warn(describe(), "GET " + k + ": " + reply_text(r));
    }
    freeReplyObject(r);
    release(c);
    return result;
  }

  void put(const StoreKey& key, std::span<const uint8_t> value) override {
    redisContext* c = acquire();
    if (!c) return;
    const std::string k = KEY_PREFIX + key.hex();
    redisReply* r = static_cast<redisReply*>(
        redisCommand(c, "SET %b %b", k.data(), k.size(), value.data(), value.size()));
    if (!r) {
      failed(c, "SET");
      return;
    }
    if (r->type != REDIS_REPLY_STATUS) warn_.warn(describe(), "SET " + k + ": " + reply_text(r));
    freeReplyObject(r);
    release(c);
  }

  void remove(const StoreKey& key) override {
    redisContext* c = acquire();
    if (!c) return;
    const std::string k = KEY_PREFIX + key.hex();
    redisReply* r = static_cast<redisReply*>(redisCommand(c, "DEL %b", k.data(), k.size()));
    if (!r) {
      failed(c, "DEL");
      return;
    }
    freeReplyObject(r);
    release(c);
  }

  std::string describe() const override {
    return "redis://" + host_ + ":" + std::to_string(port_) + "/" + std::to_string(db_);
  }

 private:
  static std::string reply_text(const redisReply* r) {
    if (r->type == REDIS_REPLY_ERROR || r->type == REDIS_REPLY_STATUS) return std::string(r->str, r->len);
    return "unexpected reply type " + std::to_string(r->type);
  }

  // An idle connection, a new one, or nullptr while the server is considered down.
  redisContext* acquire() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!idle_.empty()) {
        redisContext* c = idle_.back();
        idle_.pop_back();
        return c;
      }
      if (Clock::now() < retry_at_) return nullptr;
    }
    redisContext* c = redisConnectWithTimeout(host_.c_str(), port_, TIMEOUT);
    std::string error;
    if (!c) {
      error = "cannot allocate a connection";
    } else if (c->err) {
      error = std::string("cannot connect: ") + c->errstr;
    } else if (redisSetTimeout(c, TIMEOUT) != REDIS_OK) {
      error = std::string("cannot set timeout: ") + c->errstr;
    } else if (db_ != 0) {
      redisReply* r = static_cast<redisReply*>(redisCommand(c, "SELECT %d", db_));
      if (!r) error = std::string("SELECT: ") + c->errstr;
      else if (r->type == REDIS_REPLY_ERROR) error = "SELECT " + std::to_string(db_) + ": " + reply_text(r);
      if (r) freeReplyObject(r);
    }
    if (error.empty()) return c;
    if (c) redisFree(c);
    mark_down(error);
    return nullptr;
  }

  void release(redisContext* c) {
    std::lock_guard<std::mutex> lock(mu_);
    if (idle_.size() < MAX_IDLE) idle_.push_back(c);
    else redisFree(c);
  }

  // A command failed at the connection level (I/O error, timeout): the connection is unusable.
  std::nullopt_t failed(redisContext* c, const char* command) {
    const std::string error = std::string(command) + ": " + (c->errstr[0] ? c->errstr : "connection lost");
    redisFree(c);
    mark_down(error);
    return std::nullopt;
  }

  // Warns (once), drops the idle connections (they are likely dead too) and waits a while.
  void mark_down(const std::string& error) {
    warn_.warn(describe(), error);
    std::vector<redisContext*> dead;
    {
      std::lock_guard<std::mutex> lock(mu_);
      retry_at_ = Clock::now() + RETRY_INTERVAL;
      dead.swap(idle_);
    }
    for (redisContext* c : dead) redisFree(c);
  }

  const std::string host_;
  const int port_, db_;
  WarnOnce warn_;
  std::mutex mu_;  // guards the fields below
  std::vector<redisContext*> idle_;
  Clock::time_point retry_at_{};
};

}  // namespace

std::unique_ptr<Store> open_redis_store(const std::string& host, int port, int db) {
  return std::make_unique<RedisStore>(host, port, db);
}

}  // namespace backprompt::detail
