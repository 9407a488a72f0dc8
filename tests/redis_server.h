// A real redis-server for tests: started on a free loopback port in a temp dir, killed at the end.
#pragma once

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>

namespace backprompt::testing {

// A loopback TCP port that nothing listens on (at the time of the call).
inline int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    ::close(fd);
    return 0;
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

inline bool port_accepts(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  const bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  ::close(fd);
  return ok;
}

// The redis-server executable on PATH (or in the usual places), or "".
inline std::string find_redis_server() {
  std::string path_env = std::getenv("PATH") ? std::getenv("PATH") : "";
  path_env += ":/usr/bin:/usr/local/bin:/usr/sbin";
  size_t at = 0;
  while (at <= path_env.size()) {
    const size_t colon = std::min(path_env.find(':', at), path_env.size());
    const std::string p = path_env.substr(at, colon - at) + "/redis-server";
    if (colon > at && ::access(p.c_str(), X_OK) == 0) return p;
    at = colon + 1;
  }
  return {};
}

class RedisServer {
 public:
  // Starts a server with its data in `dir`; running() tells whether it came up.
  explicit RedisServer(const std::string& dir) {
    const std::string exe = find_redis_server();
    if (exe.empty()) return;
    std::filesystem::create_directories(dir);
    for (int attempt = 0; attempt < 3 && pid_ <= 0; ++attempt) {
      port_ = free_port();
      const std::string port = std::to_string(port_);
      const pid_t pid = ::fork();
      if (pid == 0) {
        const int null_fd = ::open("/dev/null", O_WRONLY);
        ::dup2(null_fd, 1);
        ::dup2(null_fd, 2);
        ::execl(exe.c_str(), exe.c_str(), "--port", port.c_str(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--dir", dir.c_str(), static_cast<char*>(nullptr));
        ::_exit(127);
      }
      for (int i = 0; i < 100; ++i) {  // up to 5 s
        if (port_accepts(port_)) {
          pid_ = pid;
          break;
        }
        if (::waitpid(pid, nullptr, WNOHANG) == pid) break;  // it died (port taken?): try again
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
      if (pid_ <= 0) {
        ::kill(pid, SIGKILL);
        ::waitpid(pid, nullptr, 0);
      }
    }
  }
  ~RedisServer() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  RedisServer(const RedisServer&) = delete;
  RedisServer& operator=(const RedisServer&) = delete;

  bool running() const { return pid_ > 0; }
  int port() const { return port_; }
  std::string uri(int db = 0) const { return "redis://127.0.0.1:" + std::to_string(port_) + "/" + std::to_string(db); }

 private:
  pid_t pid_ = 0;
  int port_ = 0;
};

}  // namespace backprompt::testing
