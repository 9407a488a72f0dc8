// Text::save and Cache::restore: a text's whole state to a file and back (format in
// snapshot_format.h), written atomically.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>

#include "backprompt/cache.h"
#include "backprompt/error.h"
#include "backprompt/snapshot.h"
#include "backprompt/text.h"
#include "cache/cache_impl.h"
#include "snapshot_format.h"

namespace backprompt {

using detail::CacheImpl;
using detail::Node;
using detail::Segment;

const char* kv_type_name(KvType t) {
  switch (t) {
    case KvType::F32: return "f32";
    case KvType::F16: return "f16";
    case KvType::BF16: return "bf16";
    case KvType::Q8_0: return "q8_0";
  }
  return "unknown";
}

std::optional<KvType> kv_type_from_name(std::string_view s) {
  for (KvType t : {KvType::F32, KvType::F16, KvType::BF16, KvType::Q8_0})
    if (s == kv_type_name(t)) return t;
  return std::nullopt;
}

namespace {

DType to_dtype(KvType t) {
  switch (t) {
    case KvType::F32: return DType::F32;
    case KvType::F16: return DType::F16;
    case KvType::BF16: return DType::BF16;
    case KvType::Q8_0: return DType::Q8_0;
  }
  throw Error(ErrorCode::INVALID_ARGUMENT, "snapshot: unknown K/V type " + std::to_string(static_cast<int>(t)));
}

[[noreturn]] void io_error(const std::string& path, const std::string& what, int err) {
  throw Error(ErrorCode::IO_ERROR, "snapshot " + path + ": " + what + ": " + std::strerror(err));
}

// ---------------------------------------------------------------------------------------------
// Files

// Writes what `produce` emits to `path` atomically: a new file beside it, fsync, rename over
// `path`, fsync of the directory. On any failure the temporary file is removed and `path` is
// left as it was.
void write_atomically(const std::string& path, const std::function<void(const snapshot::Sink&)>& produce) {
  static std::atomic<uint64_t> counter{0};
  const std::filesystem::path final_path(path);
  const std::string dir = final_path.has_parent_path() ? final_path.parent_path().string() : std::string(".");
  const auto stamp = static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  std::string tmp;
  int fd = -1;
  for (int attempt = 0; attempt < 100 && fd < 0; ++attempt) {
    tmp = path + ".tmp." + std::to_string(getpid()) + "." + std::to_string(stamp % 1000000007) + "." +
          std::to_string(counter++);
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0 && errno != EEXIST) io_error(path, "cannot create " + tmp, errno);
  }
  if (fd < 0) io_error(path, "cannot create a temporary file", EEXIST);

  auto fail = [&](const std::string& what, int err) {
    if (fd >= 0) ::close(fd);
    fd = -1;
    ::unlink(tmp.c_str());
    io_error(path, what, err);
  };
  try {
    produce([&](std::span<const uint8_t> b) {
      size_t done = 0;
      while (done < b.size()) {
        const ssize_t w = ::write(fd, b.data() + done, b.size() - done);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) fail("write to " + tmp + " failed", errno);
        done += static_cast<size_t>(w);
      }
    });
  } catch (...) {
    if (fd >= 0) {  // fail() has not cleaned up yet (the error came from the encoder)
      ::close(fd);
      ::unlink(tmp.c_str());
    }
    throw;
  }
  if (::fsync(fd) != 0) fail("fsync of " + tmp + " failed", errno);
  const int rc = ::close(fd);
  fd = -1;
  if (rc != 0) fail("close of " + tmp + " failed", errno);
  if (::rename(tmp.c_str(), path.c_str()) != 0) fail("rename of " + tmp + " failed", errno);
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {  // the rename is done; a directory that cannot be synced is reported
    const int err = ::fsync(dfd) == 0 ? 0 : errno;
    ::close(dfd);
    if (err != 0 && err != EINVAL) io_error(path, "fsync of directory " + dir + " failed", err);
  }
}

std::vector<uint8_t> read_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) io_error(path, "cannot open", errno);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    io_error(path, "cannot stat", err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(ErrorCode::IO_ERROR, "snapshot " + path + ": not a regular file");
  }
  std::vector<uint8_t> bytes;
  try {
    bytes.resize(static_cast<size_t>(st.st_size));
  } catch (const std::bad_alloc&) {
    ::close(fd);
    throw Error(ErrorCode::OUT_OF_MEMORY, "snapshot " + path + ": cannot hold " + std::to_string(st.st_size) + " bytes");
  }
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t r = ::read(fd, bytes.data() + done, bytes.size() - done);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      const int err = errno;
      ::close(fd);
      io_error(path, "read failed", err);
    }
    if (r == 0) break;  // shrank while reading: what was read is checked like any truncated file
    done += static_cast<size_t>(r);
  }
  bytes.resize(done);
  ::close(fd);
  return bytes;
}

// Keeps an evaluated path in use (safe from eviction) while it is read.
class PathInUse {
 public:
  PathInUse(CacheImpl& c, std::vector<std::vector<Node*>> paths) : c_(c), paths_(std::move(paths)) {}
  ~PathInUse() { c_.release_paths(paths_); }
  const std::vector<Node*>& nodes() const { return paths_[0]; }

 private:
  CacheImpl& c_;
  std::vector<std::vector<Node*>> paths_;
};

std::string hex(uint64_t x) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(x));
  return buf;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Save

void Text::save(const std::string& path, const SnapshotOptions& options) const {
  if (!cache_) throw Error(ErrorCode::INVALID_ARGUMENT, "text: this text belongs to no cache");
  CacheImpl& c = *cache_;
  std::lock_guard<std::recursive_mutex> lock(c.mu);
  const ModelConfig& cfg = c.model->config();
  const int64_t kv = cfg.kv_dim();

  detail::EvalRequest req;
  req.tokens = c.tokenize(segment_list());
  if (req.tokens.empty()) throw Error(ErrorCode::INVALID_ARGUMENT, "text: save() of a text with no tokens");
  const std::vector<int32_t>& tokens = req.tokens;
  const int64_t n = static_cast<int64_t>(tokens.size());
  PathInUse held(c, c.evaluate(std::span<const detail::EvalRequest>(&req, 1)));
  BP_ASSERT(!held.nodes().empty() && held.nodes().back()->end() == n);

  // Gather the path's K/V and logprobs into one span per layer.
  std::vector<float> k(static_cast<size_t>(cfg.n_layer * n * kv)), v(k.size());  // [n_layer][n][kv_dim]
  std::vector<float> logprobs(static_cast<size_t>(n), std::numeric_limits<float>::quiet_NaN());  // [n]
  for (const Node* node : held.nodes()) {
    const int64_t len = node->n_tokens();
    for (int32_t l = 0; l < cfg.n_layer; ++l) {
      std::copy_n(node->k.begin() + l * len * kv, len * kv, k.begin() + (l * n + node->pos0) * kv);
      std::copy_n(node->v.begin() + l * len * kv, len * kv, v.begin() + (l * n + node->pos0) * kv);
    }
    if (!node->logprobs.empty()) std::copy(node->logprobs.begin(), node->logprobs.end(), logprobs.begin() + node->pos0);
  }
  logprobs[0] = std::numeric_limits<float>::quiet_NaN();  // the first token has no prediction
  const std::vector<float>& last_logits = held.nodes().back()->last_logits;
  BP_ASSERT(last_logits.size() == static_cast<size_t>(cfg.n_vocab));

  snapshot::Header h;
  h.model_fingerprint = c.model->fingerprint();
  h.tokenizer_fingerprint = c.model->tokenizer_fingerprint();
  h.n_layer = cfg.n_layer;
  h.n_kv_head = cfg.n_kv_head;
  h.head_dim = cfg.head_dim;
  h.n_vocab = cfg.n_vocab;
  h.codec.type = to_dtype(options.kv_type);
  h.codec.zstd = options.zstd;
  h.n_tokens = static_cast<uint64_t>(n);
  const std::string text = string();
  snapshot::EncodeInput in;
  in.header = &h;
  in.tokens = tokens;
  in.k = k.data();
  in.v = v.data();
  in.layer_stride = n * kv;
  in.logprobs = logprobs;
  in.last_logits = last_logits;
  in.sampler = options.sampler;
  in.text = text;
  write_atomically(path, [&](const snapshot::Sink& sink) { snapshot::encode(in, sink); });
}

// ---------------------------------------------------------------------------------------------
// Restore

Text Cache::restore(const std::string& path, SamplingParams* sampler_state) {
  const Model& m = *impl_->model;
  const ModelConfig& cfg = m.config();
  const Tokenizer& tok = m.tokenizer();
  const std::vector<uint8_t> bytes = read_file(path);

  // Identity first: a file of another model is a mismatch, whatever else is in it.
  const snapshot::Header h = snapshot::decode_header(bytes, path);
  if (h.model_fingerprint != m.fingerprint())
    throw Error(ErrorCode::MODEL_MISMATCH, "snapshot " + path + ": made by another model (model fingerprint " +
                                               hex(h.model_fingerprint) + ", " + m.path() + " has " +
                                               hex(m.fingerprint()) + ")");
  if (h.tokenizer_fingerprint != m.tokenizer_fingerprint())
    throw Error(ErrorCode::MODEL_MISMATCH, "snapshot " + path + ": made with another tokenizer (tokenizer fingerprint " +
                                               hex(h.tokenizer_fingerprint) + ", " + m.path() + " has " +
                                               hex(m.tokenizer_fingerprint()) + ")");
  if (h.n_layer != cfg.n_layer || h.n_kv_head != cfg.n_kv_head || h.head_dim != cfg.head_dim || h.n_vocab != cfg.n_vocab)
    throw Error(ErrorCode::MODEL_MISMATCH, "snapshot " + path + ": K/V shape (n_layer " + std::to_string(h.n_layer) +
                                               ", n_kv_head " + std::to_string(h.n_kv_head) + ", head_dim " +
                                               std::to_string(h.head_dim) + ", n_vocab " + std::to_string(h.n_vocab) +
                                               ") differs from the model's");
  if (h.n_tokens > static_cast<uint64_t>(cfg.n_ctx))
    throw Error(ErrorCode::CORRUPT_FILE, "snapshot " + path + ": head: " + std::to_string(h.n_tokens) +
                                             " tokens, more than the model's context (" + std::to_string(cfg.n_ctx) + ")");

  const snapshot::Snapshot s = snapshot::decode(bytes, path);
  const bool bos_first = tok.add_bos() && tok.bos() >= 0;
  if (bos_first && s.tokens[0] != tok.bos())
    throw Error(ErrorCode::CORRUPT_FILE, "snapshot " + path + ": tokens: the model adds BOS (" +
                                             std::to_string(tok.bos()) + ") but the first token is " +
                                             std::to_string(s.tokens[0]));
  bool all_logprobs = true;  // known for every token after the first
  for (size_t i = 1; i < s.logprobs.size(); ++i) all_logprobs = all_logprobs && !std::isnan(s.logprobs[i]);

  auto seg = std::make_shared<Segment>();
  seg->tokens.assign(s.tokens.begin() + (bos_first ? 1 : 0), s.tokens.end());
  seg->text = s.text;
  seg->is_tokens = true;

  {
    std::lock_guard<std::recursive_mutex> lock(impl_->mu);
    const int64_t stride = static_cast<int64_t>(s.header.n_tokens) * s.header.kv_dim();
    impl_->insert_computed(s.tokens, 0, s.k.data(), s.v.data(), stride,
                           all_logprobs ? std::span<const float>(s.logprobs) : std::span<const float>(), s.last_logits);
  }
  if (sampler_state) *sampler_state = s.sampler;
  auto segs = std::make_shared<std::vector<std::shared_ptr<const Segment>>>();
  segs->push_back(std::move(seg));
  return Text(impl_, std::move(segs));
}

}  // namespace backprompt
