// Text::save and Cache::restore: a text's whole state to a file and back (format in
// snapshot_format.h), written atomically.
#include <fcntl.h>
#include <sys/mman.h>
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

// A large zero-filled buffer straight from the kernel, asking for huge pages: fresh memory is
// paid for page by page, and with 4 KiB pages that costs more than the copying itself.
class PageBuffer {
 public:
  explicit PageBuffer(size_t n_bytes) : size_(n_bytes), mapped_(n_bytes) {
    if (size_ == 0) return;
    void* p = ::mmap(nullptr, mapped_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
      throw Error(ErrorCode::OUT_OF_MEMORY, "snapshot: cannot allocate " + std::to_string(size_) + " bytes");
#ifdef MADV_HUGEPAGE
    ::madvise(p, mapped_, MADV_HUGEPAGE);  // a hint; failure is fine
#endif
    data_ = static_cast<uint8_t*>(p);
  }
  ~PageBuffer() {
    if (data_) ::munmap(data_, mapped_);
  }
  PageBuffer(const PageBuffer&) = delete;
  PageBuffer& operator=(const PageBuffer&) = delete;
  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  void shrink(size_t n) { size_ = std::min(size_, n); }  // the logical size; the mapping stays

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;    // bytes in use
  size_t mapped_ = 0;  // bytes mapped
};

std::unique_ptr<PageBuffer> read_file(const std::string& path) {
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
  std::unique_ptr<PageBuffer> bytes;
  try {
    bytes = std::make_unique<PageBuffer>(static_cast<size_t>(st.st_size));
  } catch (...) {
    ::close(fd);
    throw;
  }
  size_t done = 0;
  while (done < bytes->size()) {
    const ssize_t r = ::read(fd, bytes->data() + done, bytes->size() - done);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      const int err = errno;
      ::close(fd);
      io_error(path, "read failed", err);
    }
    if (r == 0) break;  // shrank while reading: what was read is checked like any truncated file
    done += static_cast<size_t>(r);
  }
  bytes->shrink(done);
  ::close(fd);
  return bytes;
}

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
  detail::HeldPath held(c, req);

  // The path's nodes are the K/V chunks, in order; logprobs where the nodes have them.
  std::vector<snapshot::KvChunk> chunks;
  std::vector<float> logprobs(static_cast<size_t>(n), std::numeric_limits<float>::quiet_NaN());  // [n]
  for (const Node* node : held.nodes()) {
    const int64_t len = node->n_tokens();
    chunks.push_back({node->k.data(), node->v.data(), len, len * kv});
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
  h.codec = detail::kv_codec_for(options.kv_type, options.zstd);
  h.n_tokens = static_cast<uint64_t>(n);
  const std::string text = string();
  snapshot::EncodeInput in;
  in.header = &h;
  in.tokens = tokens;
  in.kv = std::move(chunks);
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
  const std::unique_ptr<PageBuffer> file = read_file(path);
  const std::span<const uint8_t> bytes(file->data(), file->size());

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

  // Raw f32 K/V are read where they lie in the file; other types are decoded first.
  constexpr uint64_t MAX_KV_VALUES = uint64_t(1) << 36;
  const snapshot::Snapshot s = snapshot::decode(bytes, path, MAX_KV_VALUES, /*with_kv=*/false);
  snapshot::KvInPlace in_place;
  std::unique_ptr<PageBuffer> decoded;  // [2][n_layer][n_tokens][kv_dim] floats
  if (!snapshot::kv_in_place(bytes, s.header, &in_place)) {
    const int64_t per_layer = static_cast<int64_t>(s.header.n_tokens) * s.header.kv_dim();
    const size_t n_values = static_cast<size_t>(per_layer) * static_cast<size_t>(s.header.n_layer);
    decoded = std::make_unique<PageBuffer>(2 * n_values * sizeof(float));
    float* k = reinterpret_cast<float*>(decoded->data());
    snapshot::decode_kv(bytes, path, s, k, k + n_values);
    in_place = {k, k + n_values, per_layer};
  }
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
    impl_->insert_computed(s.tokens, 0, in_place.k, in_place.v, in_place.layer_stride,
                           all_logprobs ? std::span<const float>(s.logprobs) : std::span<const float>(), s.last_logits);
  }
  if (sampler_state) *sampler_state = s.sampler;
  auto segs = std::make_shared<std::vector<std::shared_ptr<const Segment>>>();
  segs->push_back(std::move(seg));
  return Text(impl_, std::move(segs));
}

}  // namespace backprompt
