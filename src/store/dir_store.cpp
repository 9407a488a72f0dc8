// dir:PATH — the embedded store: one file per key, PATH/<first 2 hex digits>/<32 hex digits>.
//
// Crash safety: a value is written to a temporary file in the same directory (".tmp-..."),
// fsynced, then renamed over its final name, so a final name only ever names a whole file, even
// if the writer is killed. (The directory itself is not fsynced: after a power loss a recent
// block may be missing, never partial — a miss the caller recomputes.) Leftover temporary files
// of killed writers are deleted by a later eviction scan once they are an hour old.
//
// Several processes may read and write one directory at once: files are immutable once
// published, a rename over an existing name replaces it atomically, and a reader holding an open
// file keeps reading it even if an evictor unlinks it.
//
// Size limit: LRU on disk by mtime. get() touches the file's mtime; each process keeps a running
// estimate of the directory's size (a full scan on its first put, then its own puts added) and
// rescans when the estimate passes max_bytes or a minute has gone by since its last scan (other
// processes write too). A scan deletes the oldest files until the total is at most 90% of
// max_bytes, so scans stay rare.
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <mutex>

#include "store/backends.h"

namespace backprompt::detail {

namespace {

constexpr double LOW_WATERMARK = 0.9;           // a scan evicts down to this fraction of max_bytes
constexpr auto RESCAN_INTERVAL = std::chrono::seconds(60);
constexpr int64_t STALE_TEMP_SECONDS = 3600;    // temporary files older than this are debris
constexpr const char* TEMP_PREFIX = ".tmp-";

bool is_hex_name(const char* s, size_t n) {
  if (std::strlen(s) != n) return false;
  for (size_t i = 0; i < n; ++i)
    if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return false;
  return true;
}

int64_t mtime_ns(const struct stat& st) { return int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec; }

std::string errno_text(const std::string& what, const std::string& path) {
  return what + " " + path + ": " + std::strerror(errno);
}

std::string human_bytes(uint64_t n) {
  char buf[32];
  if (n >= (uint64_t(1) << 30)) std::snprintf(buf, sizeof(buf), "%.1f GiB", double(n) / double(1 << 30));
  else if (n >= (uint64_t(1) << 20)) std::snprintf(buf, sizeof(buf), "%.1f MiB", double(n) / double(1 << 20));
  else std::snprintf(buf, sizeof(buf), "%llu bytes", static_cast<unsigned long long>(n));
  return buf;
}

class DirStore final : public Store {
 public:
  DirStore(std::string path, uint64_t max_bytes) : root_(std::move(path)), max_bytes_(max_bytes) {
    std::error_code ec;
    std::filesystem::create_directories(root_, ec);
    if (ec) warn_.warn(describe(), "cannot create directory: " + ec.message());
  }

  std::optional<std::vector<uint8_t>> get(const StoreKey& key) override {
    const std::string path = file_path(key);
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      if (errno != ENOENT && errno != ENOTDIR) warn_.warn(describe(), errno_text("cannot open", path));
      return std::nullopt;
    }
    std::optional<std::vector<uint8_t>> result;
    struct stat st;
    if (::fstat(fd, &st) == 0) {
      std::vector<uint8_t> bytes(static_cast<size_t>(st.st_size));
      size_t got = 0;
      while (got < bytes.size()) {
        const ssize_t r = ::read(fd, bytes.data() + got, bytes.size() - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += static_cast<size_t>(r);
      }
      if (got == bytes.size()) result = std::move(bytes);
      else warn_.warn(describe(), errno_text("short read of", path));
      ::futimens(fd, nullptr);  // recently used (best effort: a read-only store stays readable)
    } else {
      warn_.warn(describe(), errno_text("cannot stat", path));
    }
    ::close(fd);
    return result;
  }

  void put(const StoreKey& key, std::span<const uint8_t> value) override {
    const std::string hex = key.hex();
    const std::string dir = root_ + "/" + hex.substr(0, 2);
    const std::string path = dir + "/" + hex;
    if (::utimensat(AT_FDCWD, path.c_str(), nullptr, 0) == 0) return;  // already there: just mark it used
    if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
      ::mkdir(root_.c_str(), 0755);  // the root may have been removed under us
      if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
        warn_.warn(describe(), errno_text("cannot create directory", dir));
        return;
      }
    }
    const std::string temp = dir + "/" + TEMP_PREFIX + hex + "-" + std::to_string(::getpid()) + "-" +
                             std::to_string(temp_counter_.fetch_add(1));
    if (!write_file(temp, value)) {
      ::unlink(temp.c_str());
      return;
    }
    if (::rename(temp.c_str(), path.c_str()) != 0) {
      warn_.warn(describe(), errno_text("cannot rename into", path));
      ::unlink(temp.c_str());
      return;
    }
    account(int64_t(value.size()));
  }

  void remove(const StoreKey& key) override {
    const std::string path = file_path(key);
    struct stat st;
    if (::stat(path.c_str(), &st) == 0 && ::unlink(path.c_str()) == 0) account(-int64_t(st.st_size));
  }

  std::string describe() const override { return "dir:" + root_ + " (max " + human_bytes(max_bytes_) + ")"; }

 private:
  std::string file_path(const StoreKey& key) const {
    const std::string hex = key.hex();
    return root_ + "/" + hex.substr(0, 2) + "/" + hex;
  }

  bool write_file(const std::string& temp, std::span<const uint8_t> value) {
    const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
      warn_.warn(describe(), errno_text("cannot create", temp));
      return false;
    }
    size_t done = 0;
    while (done < value.size()) {
      const ssize_t w = ::write(fd, value.data() + done, value.size() - done);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) {
        warn_.warn(describe(), errno_text("cannot write", temp));
        ::close(fd);
        return false;
      }
      done += static_cast<size_t>(w);
    }
    if (::fsync(fd) != 0) {
      warn_.warn(describe(), errno_text("cannot fsync", temp));
      ::close(fd);
      return false;
    }
    if (::close(fd) != 0) {
      warn_.warn(describe(), errno_text("cannot close", temp));
      return false;
    }
    return true;
  }

  // Adds `delta` bytes to the size estimate; scans (and evicts) when it is due.
  void account(int64_t delta) {
    {
      std::lock_guard<std::mutex> lock(size_mu_);
      estimate_ = std::max<int64_t>(0, estimate_ + delta);
      const bool due = !scanned_ || uint64_t(estimate_) > max_bytes_ ||
                       std::chrono::steady_clock::now() - last_scan_ > RESCAN_INTERVAL;
      if (!due || delta < 0) return;
    }
    std::unique_lock<std::mutex> scan_lock(scan_mu_, std::try_to_lock);
    if (!scan_lock.owns_lock()) return;  // another thread is scanning
    const int64_t total = scan_and_evict();
    std::lock_guard<std::mutex> lock(size_mu_);
    estimate_ = total;
    scanned_ = true;
    last_scan_ = std::chrono::steady_clock::now();
  }

  struct Entry {
    int64_t mtime;
    int64_t size;
    std::string path;
  };

  // Lists every block file; deletes stale temporary files, then the least recently used blocks
  // while the total is over max_bytes. Returns the bytes left.
  int64_t scan_and_evict() {
    std::vector<Entry> entries;
    int64_t total = 0;
    const int64_t now_s = std::chrono::duration_cast<std::chrono::seconds>(
                              std::chrono::system_clock::now().time_since_epoch()).count();
    DIR* top = ::opendir(root_.c_str());
    if (!top) return 0;
    while (const dirent* d = ::readdir(top)) {
      if (!is_hex_name(d->d_name, 2)) continue;
      const std::string dir = root_ + "/" + d->d_name;
      DIR* sub = ::opendir(dir.c_str());
      if (!sub) continue;
      while (const dirent* f = ::readdir(sub)) {
        const bool temp = std::strncmp(f->d_name, TEMP_PREFIX, std::strlen(TEMP_PREFIX)) == 0;
        if (!temp && !is_hex_name(f->d_name, 32)) continue;
        std::string path = dir + "/" + f->d_name;
        struct stat st;
        if (::lstat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
        if (temp) {
          if (now_s - int64_t(st.st_mtim.tv_sec) > STALE_TEMP_SECONDS) ::unlink(path.c_str());
          else total += st.st_size;  // being written by someone: counts, but is not ours to evict
          continue;
        }
        total += st.st_size;
        entries.push_back({mtime_ns(st), int64_t(st.st_size), std::move(path)});
      }
      ::closedir(sub);
    }
    ::closedir(top);
    if (uint64_t(total) <= max_bytes_) return total;

    std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return a.mtime < b.mtime; });
    const int64_t target = int64_t(double(max_bytes_) * LOW_WATERMARK);
    for (const Entry& e : entries) {
      if (total <= target) break;
      // Another process may have evicted it already, or touched it since the scan: the first is
      // harmless, the second costs one recomputation.
      if (::unlink(e.path.c_str()) == 0 || errno == ENOENT) total -= e.size;
    }
    return total;
  }

  const std::string root_;
  const uint64_t max_bytes_;
  WarnOnce warn_;
  std::atomic<uint64_t> temp_counter_{0};
  std::mutex size_mu_;  // guards the fields below
  int64_t estimate_ = 0;
  bool scanned_ = false;
  std::chrono::steady_clock::time_point last_scan_{};
  std::mutex scan_mu_;  // one scan at a time in this process
};

}  // namespace

std::unique_ptr<Store> open_dir_store(const std::string& path, uint64_t max_bytes) {
  return std::make_unique<DirStore>(path, max_bytes);
}

}  // namespace backprompt::detail
