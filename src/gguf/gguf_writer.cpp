// GGUF writer: always GGUF v3, little-endian.
//
// The header (metadata and tensor infos) is built in memory; tensor data is produced one tensor
// at a time by the caller's fill callback and streamed to `path`.tmp, which is fsynced and renamed
// over `path`, so a reader never sees a half-written file. Each tensor's data starts at a multiple
// of general.alignment (32 unless the caller sets that key) and is padded to the next multiple,
// as llama.cpp's own writer does.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>

#include "backprompt/error.h"
#include "gguf/gguf.h"

namespace backprompt::gguf {

namespace {

constexpr uint32_t GGUF_MAGIC = 0x46554747;
constexpr uint32_t GGUF_VERSION = 3;
constexpr uint64_t DEFAULT_ALIGNMENT = 32;

void put_bytes(std::vector<uint8_t>& out, const void* p, size_t n) {
  const uint8_t* b = static_cast<const uint8_t*>(p);
  out.insert(out.end(), b, b + n);
}
template <typename T>
void put_scalar(std::vector<uint8_t>& out, T v) {
  put_bytes(out, &v, sizeof(T));
}
void put_string(std::vector<uint8_t>& out, std::string_view s) {
  put_scalar<uint64_t>(out, s.size());
  put_bytes(out, s.data(), s.size());
}
void put_type(std::vector<uint8_t>& out, ValueType t) { put_scalar<uint32_t>(out, static_cast<uint32_t>(t)); }

template <typename T>
std::vector<uint8_t> encode_scalar(ValueType t, T v) {
  std::vector<uint8_t> e;
  put_type(e, t);
  put_scalar(e, v);
  return e;
}

template <typename T>
std::vector<uint8_t> encode_array(ValueType elem, const std::vector<T>& v) {
  std::vector<uint8_t> e;
  put_type(e, ValueType::ARRAY);
  put_type(e, elem);
  put_scalar<uint64_t>(e, v.size());
  put_bytes(e, v.data(), v.size() * sizeof(T));
  return e;
}

// Writes all of [p, p+n) to fd; false on error (errno set).
bool write_all(int fd, const uint8_t* p, size_t n) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

// Bytes of a tensor of `type` and shape `ne`; throws INVALID_ARGUMENT for a shape GGUF cannot hold.
size_t tensor_bytes(const std::string& name, DType type, const std::vector<int64_t>& ne) {
  if (name.empty()) throw Error(ErrorCode::INVALID_ARGUMENT, "gguf writer: empty tensor name");
  if (!dtype_is_supported(static_cast<uint32_t>(type)))
    throw Error(ErrorCode::INVALID_ARGUMENT, "gguf writer: tensor '" + name + "': unsupported type");
  if (ne.empty() || ne.size() > 4)
    throw Error(ErrorCode::INVALID_ARGUMENT, "gguf writer: tensor '" + name + "': needs 1 to 4 dimensions");
  uint64_t n_elements = 1;
  for (int64_t d : ne) {
    if (d <= 0 || __builtin_mul_overflow(n_elements, uint64_t(d), &n_elements) ||
        n_elements > uint64_t(std::numeric_limits<int64_t>::max()))
      throw Error(ErrorCode::INVALID_ARGUMENT, "gguf writer: tensor '" + name + "': invalid shape");
  }
  uint64_t block = dtype_block_size(type);
  if (uint64_t(ne[0]) % block != 0)
    throw Error(ErrorCode::INVALID_ARGUMENT, "gguf writer: tensor '" + name + "': ne[0] = " + std::to_string(ne[0]) +
                                                 " is not a multiple of the block size " + std::to_string(block));
  uint64_t n_bytes;
  if (__builtin_mul_overflow(n_elements / block, uint64_t(dtype_block_bytes(type)), &n_bytes) ||
      n_bytes > std::numeric_limits<size_t>::max())
    throw Error(ErrorCode::INVALID_ARGUMENT, "gguf writer: tensor '" + name + "': too large");
  return static_cast<size_t>(n_bytes);
}

}  // namespace

void Writer::put(const std::string& key, std::vector<uint8_t> encoded) {
  if (key.empty()) throw Error(ErrorCode::INVALID_ARGUMENT, "gguf writer: empty metadata key");
  for (PendingKv& kv : kv_) {
    if (kv.key == key) {
      kv.encoded = std::move(encoded);
      return;
    }
  }
  kv_.push_back({key, std::move(encoded)});
}

void Writer::set_u32(const std::string& key, uint32_t v) { put(key, encode_scalar(ValueType::UINT32, v)); }
void Writer::set_i32(const std::string& key, int32_t v) { put(key, encode_scalar(ValueType::INT32, v)); }
void Writer::set_u64(const std::string& key, uint64_t v) { put(key, encode_scalar(ValueType::UINT64, v)); }
void Writer::set_f32(const std::string& key, float v) { put(key, encode_scalar(ValueType::FLOAT32, v)); }
void Writer::set_bool(const std::string& key, bool v) { put(key, encode_scalar(ValueType::BOOL, uint8_t(v ? 1 : 0))); }

void Writer::set_string(const std::string& key, const std::string& v) {
  std::vector<uint8_t> e;
  put_type(e, ValueType::STRING);
  put_string(e, v);
  put(key, std::move(e));
}

void Writer::set_string_array(const std::string& key, const std::vector<std::string>& v) {
  std::vector<uint8_t> e;
  put_type(e, ValueType::ARRAY);
  put_type(e, ValueType::STRING);
  put_scalar<uint64_t>(e, v.size());
  for (const std::string& s : v) put_string(e, s);
  put(key, std::move(e));
}

void Writer::set_f32_array(const std::string& key, const std::vector<float>& v) {
  put(key, encode_array(ValueType::FLOAT32, v));
}

void Writer::set_i32_array(const std::string& key, const std::vector<int32_t>& v) {
  put(key, encode_array(ValueType::INT32, v));
}

void Writer::copy_kv(const KeyValue& kv) {
  BP_ASSERT(kv.raw != nullptr || kv.raw_size == 0);
  std::vector<uint8_t> e;
  put_type(e, kv.type);
  put_bytes(e, kv.raw, kv.raw_size);
  put(kv.key, std::move(e));
}

void Writer::add_tensor(const std::string& name, DType type, std::vector<int64_t> ne,
                        std::function<void(std::span<uint8_t>)> fill) {
  tensor_bytes(name, type, ne);  // validates
  for (const PendingTensor& t : tensors_) {
    if (t.name == name) throw Error(ErrorCode::INVALID_ARGUMENT, "gguf writer: duplicate tensor '" + name + "'");
  }
  tensors_.push_back({name, type, std::move(ne), std::move(fill)});
}

void Writer::write(const std::string& path) const {
  // Alignment: the caller's general.alignment (a uint32 power of two) or the default.
  uint64_t alignment = DEFAULT_ALIGNMENT;
  for (const PendingKv& kv : kv_) {
    if (kv.key != "general.alignment") continue;
    uint32_t type, v = 0;
    std::memcpy(&type, kv.encoded.data(), 4);
    if (type == uint32_t(ValueType::UINT32)) std::memcpy(&v, kv.encoded.data() + 4, 4);
    if (v == 0 || (v & (v - 1)) != 0)
      throw Error(ErrorCode::INVALID_ARGUMENT, "gguf writer: general.alignment must be a uint32 power of two");
    alignment = v;
  }

  // Header: fixed part, metadata, tensor infos with offsets laid out back to back, each aligned.
  std::vector<uint8_t> header;
  put_scalar<uint32_t>(header, GGUF_MAGIC);
  put_scalar<uint32_t>(header, GGUF_VERSION);
  put_scalar<uint64_t>(header, tensors_.size());
  put_scalar<uint64_t>(header, kv_.size());
  for (const PendingKv& kv : kv_) {
    put_string(header, kv.key);
    put_bytes(header, kv.encoded.data(), kv.encoded.size());
  }
  std::vector<size_t> n_bytes(tensors_.size());  // [n_tensors]
  uint64_t offset = 0;
  size_t max_bytes = 0;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const PendingTensor& t = tensors_[i];
    n_bytes[i] = tensor_bytes(t.name, t.type, t.ne);
    max_bytes = std::max(max_bytes, n_bytes[i]);
    put_string(header, t.name);
    put_scalar<uint32_t>(header, static_cast<uint32_t>(t.ne.size()));
    for (int64_t d : t.ne) put_scalar<uint64_t>(header, static_cast<uint64_t>(d));
    put_scalar<uint32_t>(header, static_cast<uint32_t>(t.type));
    put_scalar<uint64_t>(header, offset);
    offset = align_up(offset + n_bytes[i], alignment);
  }
  header.resize(align_up(header.size(), alignment), 0);

  std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw Error(ErrorCode::IO_ERROR, tmp + ": cannot create: " + std::strerror(errno));
  auto io_fail = [&](const char* what) {
    int err = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    throw Error(ErrorCode::IO_ERROR, tmp + ": " + what + ": " + std::strerror(err));
  };
  if (!write_all(fd, header.data(), header.size())) io_fail("write failed");

  std::vector<uint8_t> buffer;  // [max_bytes + alignment] one tensor's data and its padding
  if (!tensors_.empty()) buffer.resize(max_bytes + alignment);
  for (size_t i = 0; i < tensors_.size(); ++i) {
    size_t padded = static_cast<size_t>(align_up(n_bytes[i], alignment));
    std::memset(buffer.data(), 0, padded);
    try {
      tensors_[i].fill(std::span<uint8_t>(buffer.data(), n_bytes[i]));
    } catch (...) {
      ::close(fd);
      ::unlink(tmp.c_str());
      throw;
    }
    if (!write_all(fd, buffer.data(), padded)) io_fail("write failed");
  }
  if (::fsync(fd) != 0) io_fail("fsync failed");
  if (::close(fd) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    throw Error(ErrorCode::IO_ERROR, tmp + ": close failed: " + std::strerror(err));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    throw Error(ErrorCode::IO_ERROR, path + ": cannot rename " + tmp + " over it: " + std::strerror(err));
  }
  // Make the rename durable; a failure here cannot undo the write, so it is not reported.
  std::string dir = path.find('/') == std::string::npos ? "." : path.substr(0, path.rfind('/') + 1);
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace backprompt::gguf
