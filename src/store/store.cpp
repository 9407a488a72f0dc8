// Store::open (URI parsing), the warn-once helper and StoreWriter (writes behind the computation).
#include "store/store.h"

#include <charconv>
#include <cstdio>

#include "backprompt/error.h"
#include "store/backends.h"

namespace backprompt {

namespace {

constexpr uint64_t DEFAULT_DIR_MAX_BYTES = uint64_t(10) << 30;

[[noreturn]] void bad_uri(const std::string& uri, const std::string& why) {
  throw Error(ErrorCode::INVALID_ARGUMENT, "store URI '" + uri + "': " + why +
                                               " (expected dir:PATH[?max_bytes=N] or redis://HOST:PORT[/DB])");
}

// A whole decimal number in [lo, hi], or false.
bool parse_int(std::string_view s, int64_t lo, int64_t hi, int64_t& v) {
  if (s.empty()) return false;
  const auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  return ec == std::errc() && p == s.data() + s.size() && v >= lo && v <= hi;
}

// "123", "64k", "512M", "10g" (powers of 1024), > 0.
bool parse_bytes(std::string_view s, uint64_t& v) {
  uint64_t scale = 1;
  if (!s.empty()) {
    switch (s.back()) {
      case 'k': case 'K': scale = uint64_t(1) << 10; break;
      case 'm': case 'M': scale = uint64_t(1) << 20; break;
      case 'g': case 'G': scale = uint64_t(1) << 30; break;
      case 't': case 'T': scale = uint64_t(1) << 40; break;
      default: break;
    }
    if (scale != 1) s.remove_suffix(1);
  }
  int64_t n = 0;
  if (!parse_int(s, 1, int64_t(1) << 50, n)) return false;
  v = uint64_t(n) * scale;
  return v / scale == uint64_t(n);
}

std::unique_ptr<Store> open_dir(const std::string& uri, std::string rest) {
  uint64_t max_bytes = DEFAULT_DIR_MAX_BYTES;
  const size_t q = rest.find('?');
  if (q != std::string::npos) {
    std::string_view options = std::string_view(rest).substr(q + 1);
    while (!options.empty()) {
      const size_t amp = options.find('&');
      const std::string_view opt = options.substr(0, amp);
      options = amp == std::string_view::npos ? std::string_view() : options.substr(amp + 1);
      if (opt.starts_with("max_bytes=")) {
        if (!parse_bytes(opt.substr(10), max_bytes)) bad_uri(uri, "bad max_bytes '" + std::string(opt.substr(10)) + "'");
      } else {
        bad_uri(uri, "unknown option '" + std::string(opt) + "'");
      }
    }
    rest.resize(q);
  }
  if (rest.empty()) bad_uri(uri, "empty directory path");
  return detail::open_dir_store(rest, max_bytes);
}

std::unique_ptr<Store> open_redis(const std::string& uri, std::string_view rest) {
  int64_t db = 0;
  const size_t slash = rest.find('/');
  if (slash != std::string_view::npos) {
    if (!parse_int(rest.substr(slash + 1), 0, 1 << 20, db)) bad_uri(uri, "bad database number");
    rest = rest.substr(0, slash);
  }
  std::string host;
  std::string_view port_part;
  if (rest.starts_with('[')) {  // [IPv6]:PORT
    const size_t close = rest.find(']');
    if (close == std::string_view::npos) bad_uri(uri, "unterminated '['");
    host = std::string(rest.substr(1, close - 1));
    rest = rest.substr(close + 1);
    if (!rest.empty() && !rest.starts_with(':')) bad_uri(uri, "junk after ']'");
    port_part = rest.empty() ? std::string_view() : rest.substr(1);
  } else {
    const size_t colon = rest.rfind(':');
    host = std::string(rest.substr(0, colon));
    if (colon != std::string_view::npos) port_part = rest.substr(colon + 1);
  }
  if (host.empty()) bad_uri(uri, "empty host");
  int64_t port = 6379;
  if (!port_part.empty() || rest.ends_with(':'))
    if (!parse_int(port_part, 1, 65535, port)) bad_uri(uri, "bad port '" + std::string(port_part) + "'");
  return detail::open_redis_store(host, static_cast<int>(port), static_cast<int>(db));
}

}  // namespace

namespace detail {

void WarnOnce::warn(const std::string& store, const std::string& message) {
  if (warned_.exchange(true)) return;
  std::fprintf(stderr, "backprompt: warning: store %s: %s (further store failures are not reported)\n",
               store.c_str(), message.c_str());
}

}  // namespace detail

std::unique_ptr<Store> Store::open(const std::string& uri) {
  if (uri.starts_with("dir:")) return open_dir(uri, uri.substr(4));
  if (uri.starts_with("redis://")) return open_redis(uri, std::string_view(uri).substr(8));
  bad_uri(uri, "unknown scheme");
}

Store::~Store() = default;

// ---- StoreWriter ----

StoreWriter::StoreWriter(Store& store, size_t max_queue_bytes)
    : store_(store), max_queue_bytes_(max_queue_bytes), thread_([this] { drain(); }) {}

StoreWriter::~StoreWriter() {
  flush();
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_work_.notify_all();
  thread_.join();
}

void StoreWriter::put(const StoreKey& key, std::vector<uint8_t> value) {
  std::unique_lock<std::mutex> lock(mu_);
  // Block only while the queue is non-empty and this value would overflow it.
  cv_space_.wait(lock, [&] { return queue_.empty() || queued_bytes_ + value.size() <= max_queue_bytes_; });
  queued_bytes_ += value.size();
  queue_.emplace_back(key, std::move(value));
  lock.unlock();
  cv_work_.notify_one();
}

void StoreWriter::flush() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_space_.wait(lock, [&] { return queue_.empty() && !busy_; });
}

void StoreWriter::drain() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_work_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stop_ and nothing left
    auto item = std::move(queue_.front());
    queue_.pop_front();
    busy_ = true;
    lock.unlock();
    try {
      store_.put(item.first, item.second);
    } catch (...) {
      // Store::put never throws by contract; a writer thread must not die of a broken backend.
    }
    const size_t n_bytes = item.second.size();
    item.second = {};
    lock.lock();
    queued_bytes_ -= n_bytes;
    busy_ = false;
    cv_space_.notify_all();
  }
}

}  // namespace backprompt
