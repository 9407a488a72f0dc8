// GGUF reader: maps a file, validates its whole header, then serves metadata and tensor views.
//
// Layout (little-endian, v2 and v3 identical):
//   u32 magic "GGUF", u32 version, u64 n_tensors, u64 n_kv,
//   n_kv x { string key, u32 value_type, value },
//   n_tensors x { string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset },
//   padding to general.alignment, data section (offsets are relative to its start).
// A string is u64 length + bytes; an array is u32 element type + u64 count + elements.
//
// Every read goes through Cursor, which checks the remaining bytes before touching them, and
// every count is checked against the bytes left before anything is allocated, so a hostile
// header costs at most O(header size) time and memory.
#include "gguf/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstring>
#include <limits>

#include "backprompt/error.h"
#include "tensor/big_alloc.h"

static_assert(std::endian::native == std::endian::little, "GGUF reading assumes a little-endian host");

namespace backprompt::gguf {

namespace {

constexpr uint32_t GGUF_MAGIC = 0x46554747;  // "GGUF" read as a little-endian u32
constexpr uint32_t MAX_DIMS = 4;
constexpr int MAX_ARRAY_DEPTH = 8;            // more levels of arrays in arrays are rejected
constexpr uint64_t DEFAULT_ALIGNMENT = 32;

// Smallest possible encodings, used to reject counts that cannot fit in the bytes left.
constexpr uint64_t MIN_KV_BYTES = 8 + 1 + 4 + 1;                // key len, 1-byte key, type, u8 value
constexpr uint64_t MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8;  // name len, 1-byte name, n_dims, ne[0], type, offset
constexpr uint64_t MIN_ARRAY_HEADER_BYTES = 4 + 8;

[[noreturn]] void fail(ErrorCode code, const std::string& path, std::string_view field, uint64_t offset,
                       const std::string& what) {
  throw Error(code, path + ": " + std::string(field) + " at offset " + std::to_string(offset) + ": " + what);
}

// Bytes of one scalar of a fixed-size type; 0 for STRING and ARRAY; -1 for an invalid type id.
int scalar_size(uint32_t type) {
  switch (static_cast<ValueType>(type)) {
    case ValueType::UINT8: case ValueType::INT8: case ValueType::BOOL: return 1;
    case ValueType::UINT16: case ValueType::INT16: return 2;
    case ValueType::UINT32: case ValueType::INT32: case ValueType::FLOAT32: return 4;
    case ValueType::UINT64: case ValueType::INT64: case ValueType::FLOAT64: return 8;
    case ValueType::STRING: case ValueType::ARRAY: return 0;
  }
  return -1;
}

const char* value_type_name(ValueType t) {
  switch (t) {
    case ValueType::UINT8: return "uint8";
    case ValueType::INT8: return "int8";
    case ValueType::UINT16: return "uint16";
    case ValueType::INT16: return "int16";
    case ValueType::UINT32: return "uint32";
    case ValueType::INT32: return "int32";
    case ValueType::FLOAT32: return "float32";
    case ValueType::BOOL: return "bool";
    case ValueType::STRING: return "string";
    case ValueType::ARRAY: return "array";
    case ValueType::UINT64: return "uint64";
    case ValueType::INT64: return "int64";
    case ValueType::FLOAT64: return "float64";
  }
  return "invalid";
}

bool is_integer(ValueType t) {
  switch (t) {
    case ValueType::UINT8: case ValueType::INT8: case ValueType::UINT16: case ValueType::INT16:
    case ValueType::UINT32: case ValueType::INT32: case ValueType::UINT64: case ValueType::INT64:
      return true;
    default:
      return false;
  }
}

// Names of ggml types that exist (or existed) but that backprompt does not implement, so that a
// valid model using them gets UNSUPPORTED rather than CORRUPT_FILE. nullptr: not a ggml type.
const char* ggml_type_name(uint32_t id) {
  static const char* const NAMES[] = {
      "f32", "f16", "q4_0", "q4_1", nullptr, nullptr, "q5_0", "q5_1", "q8_0", "q8_1",
      "q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q8_K", "iq2_xxs", "iq2_xs", "iq3_xxs", "iq1_s",
      "iq4_nl", "iq3_s", "iq2_s", "iq4_xs", "i8", "i16", "i32", "i64", "f64", "iq1_m",
      "bf16", "q4_0_4_4", "q4_0_4_8", "q4_0_8_8", "tq1_0", "tq2_0", "iq4_nl_4_4", "iq4_nl_4_8",
      "iq4_nl_8_8", "mxfp4",
  };
  return id < std::size(NAMES) ? NAMES[id] : nullptr;
}

template <typename T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// A bounds-checked reading position in the image.
class Cursor {
 public:
  Cursor(const uint8_t* base, size_t size, const std::string& path) : base_(base), size_(size), path_(path) {}

  size_t pos() const { return pos_; }
  size_t remaining() const { return size_ - pos_; }
  const uint8_t* here() const { return base_ + pos_; }

  void need(uint64_t n, std::string_view field) const {
    if (n > remaining())
      fail(ErrorCode::CORRUPT_FILE, path_, field, pos_,
           "truncated: needs " + std::to_string(n) + " bytes, " + std::to_string(remaining()) + " left");
  }
  void skip(uint64_t n, std::string_view field) {
    need(n, field);
    pos_ += n;
  }
  uint8_t u8(std::string_view field) { return take<uint8_t>(field); }
  uint32_t u32(std::string_view field) { return take<uint32_t>(field); }
  uint64_t u64(std::string_view field) { return take<uint64_t>(field); }
  std::string_view str(std::string_view field) {
    uint64_t n = u64(field);
    if (n > remaining())
      fail(ErrorCode::CORRUPT_FILE, path_, field, pos_ - 8,
           "string length " + std::to_string(n) + " exceeds the " + std::to_string(remaining()) + " bytes left");
    std::string_view s(reinterpret_cast<const char*>(here()), n);
    pos_ += n;
    return s;
  }

 private:
  template <typename T>
  T take(std::string_view field) {
    need(sizeof(T), field);
    T v = load<T>(here());
    pos_ += sizeof(T);
    return v;
  }
  const uint8_t* base_;
  size_t size_;
  size_t pos_ = 0;
  const std::string& path_;
};

// Validates one value of `type` at the cursor and moves past it.
void skip_value(Cursor& c, uint32_t type, const std::string& path, const std::string& field, int depth) {
  size_t start = c.pos();
  int size = scalar_size(type);
  if (size < 0)
    fail(ErrorCode::CORRUPT_FILE, path, field, start, "invalid value type " + std::to_string(type));
  if (size > 0) {
    if (static_cast<ValueType>(type) == ValueType::BOOL) {
      uint8_t b = c.u8(field);
      if (b > 1) fail(ErrorCode::CORRUPT_FILE, path, field, start, "bool value " + std::to_string(b) + " is not 0 or 1");
    } else {
      c.skip(size, field);
    }
    return;
  }
  if (static_cast<ValueType>(type) == ValueType::STRING) {
    c.str(field);
    return;
  }
  // ARRAY
  if (depth >= MAX_ARRAY_DEPTH)
    fail(ErrorCode::CORRUPT_FILE, path, field, start, "arrays nested deeper than " + std::to_string(MAX_ARRAY_DEPTH));
  uint32_t elem_type = c.u32(field + " element type");
  int elem_size = scalar_size(elem_type);
  if (elem_size < 0)
    fail(ErrorCode::CORRUPT_FILE, path, field + " element type", start, "invalid value type " + std::to_string(elem_type));
  size_t count_pos = c.pos();
  uint64_t count = c.u64(field + " length");
  uint64_t min_elem = elem_size > 0 ? elem_size
                      : static_cast<ValueType>(elem_type) == ValueType::STRING ? 8 : MIN_ARRAY_HEADER_BYTES;
  if (count > c.remaining() / min_elem)
    fail(ErrorCode::CORRUPT_FILE, path, field + " length", count_pos,
         "array of " + std::to_string(count) + " elements cannot fit in the " + std::to_string(c.remaining()) +
             " bytes left");
  if (elem_size > 0 && static_cast<ValueType>(elem_type) != ValueType::BOOL) {
    c.skip(count * elem_size, field);
    return;
  }
  std::string elem_field = depth == 0 ? field + " element" : field;
  if (static_cast<ValueType>(elem_type) == ValueType::STRING) {  // the common case (vocabularies): no recursion
    for (uint64_t i = 0; i < count; ++i) c.str(elem_field);
    return;
  }
  for (uint64_t i = 0; i < count; ++i) skip_value(c, elem_type, path, elem_field, depth + 1);
}

// Reads the `size` bytes of the open file `fd` into `out`, several pieces at once (the copy out
// of the page cache is the cost, and each core copies its own pieces). "" when done, else what
// went wrong: a read error, or a file that ended early (truncated while being read).
std::string read_whole(int fd, uint8_t* out, size_t size) {
  constexpr size_t PIECE = size_t{64} << 20;
  const int64_t n_pieces = static_cast<int64_t>((size + PIECE - 1) / PIECE);
  std::atomic<int> first_errno{0};
  std::atomic<bool> short_read{false};
#pragma omp parallel for schedule(dynamic, 1) if (n_pieces > 1)
  for (int64_t i = 0; i < n_pieces; ++i) {
    size_t at = static_cast<size_t>(i) * PIECE;
    const size_t end = std::min(size, at + PIECE);
    while (at < end && first_errno.load(std::memory_order_relaxed) == 0 && !short_read.load(std::memory_order_relaxed)) {
      const ssize_t n = pread(fd, out + at, end - at, static_cast<off_t>(at));
      if (n > 0) {
        at += static_cast<size_t>(n);
      } else if (n == 0) {
        short_read.store(true);
      } else if (errno != EINTR) {
        int expected = 0;
        first_errno.compare_exchange_strong(expected, errno);
      }
    }
  }
  if (first_errno.load() != 0) return std::string("cannot read: ") + std::strerror(first_errno.load());
  if (short_read.load()) return "cannot read: the file ended early (changed while being read?)";
  return "";
}

// Overflow-checked a * b; false on overflow.
bool mul_u64(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_mul_overflow(a, b, out); }

}  // namespace

int64_t TensorInfo::n_elements() const {
  int64_t n = 1;
  for (int64_t d : ne) n *= d;  // validated against overflow when the file was opened
  return n;
}

std::unique_ptr<File> File::open(const std::string& path, Placement placement) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(ErrorCode::IO_ERROR, path + ": cannot open: " + std::strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    throw Error(ErrorCode::IO_ERROR, path + ": cannot stat: " + std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(ErrorCode::IO_ERROR, path + ": not a regular file");
  }
  std::unique_ptr<File> file(new File());
  file->path_ = path;
  file->size_ = static_cast<size_t>(st.st_size);
  file->placement_ = placement;
  if (file->size_ > 0 && placement == Placement::MEMORY) {
    // At least a huge page, so that even a small file's copy starts on a page boundary like a
    // mapping (tensor data is aligned relative to the file's start); the part past the file is
    // never touched.
    const size_t alloc_bytes = std::max(file->size_, detail::HUGE_PAGE_BYTES);
    void* p = detail::big_alloc(alloc_bytes);
    if (p == nullptr) {
      ::close(fd);
      throw Error(ErrorCode::OUT_OF_MEMORY, path + ": cannot allocate " + std::to_string(file->size_ >> 20) +
                                                " MiB to hold the file in memory");
    }
    file->base_ = static_cast<const uint8_t*>(p);  // from here on ~File frees it
    file->alloc_bytes_ = alloc_bytes;
    const std::string err = read_whole(fd, static_cast<uint8_t*>(p), file->size_);
    ::close(fd);
    if (!err.empty()) throw Error(ErrorCode::IO_ERROR, path + ": " + err);
  } else if (file->size_ > 0) {
    void* p = mmap(nullptr, file->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    int err = errno;
    ::close(fd);
    if (p == MAP_FAILED) throw Error(ErrorCode::IO_ERROR, path + ": cannot mmap: " + std::strerror(err));
    file->base_ = static_cast<const uint8_t*>(p);
    file->mapped_ = true;
  } else {
    ::close(fd);
  }
  file->parse();  // on failure, ~File unmaps or frees
  return file;
}

std::unique_ptr<File> File::from_memory(std::span<const uint8_t> bytes, std::string name) {
  std::unique_ptr<File> file(new File());
  file->path_ = std::move(name);
  file->base_ = bytes.data();
  file->size_ = bytes.size();
  file->parse();
  return file;
}

File::~File() {
  if (mapped_) munmap(const_cast<uint8_t*>(base_), size_);
  if (alloc_bytes_ > 0) detail::big_free(const_cast<uint8_t*>(base_), alloc_bytes_);
}

void File::parse() {
  const std::string& path = path_;
  auto corrupt = [&](std::string_view field, uint64_t offset, const std::string& what) {
    fail(ErrorCode::CORRUPT_FILE, path, field, offset, what);
  };
  Cursor c(base_, size_, path);

  // --- Fixed header
  uint32_t magic = c.u32("magic");
  if (magic != GGUF_MAGIC) corrupt("magic", 0, "not a GGUF file");
  version_ = c.u32("version");
  if (version_ == 1) fail(ErrorCode::UNSUPPORTED, path, "version", 4, "GGUF version 1 is not supported");
  if (version_ == 0x02000000u || version_ == 0x03000000u)
    fail(ErrorCode::UNSUPPORTED, path, "version", 4, "big-endian GGUF is not supported");
  if (version_ > 3 && version_ < 256)
    fail(ErrorCode::UNSUPPORTED, path, "version", 4, "GGUF version " + std::to_string(version_) + " is not supported");
  if (version_ != 2 && version_ != 3) corrupt("version", 4, "invalid version " + std::to_string(version_));
  uint64_t n_tensors = c.u64("tensor_count");
  uint64_t n_kv = c.u64("metadata_kv_count");
  if (n_kv > c.remaining() / MIN_KV_BYTES)
    corrupt("metadata_kv_count", 16, std::to_string(n_kv) + " entries cannot fit in the file");
  // Tensor infos follow the metadata, so they must fit in what the metadata leaves.
  if (n_tensors > (c.remaining() - n_kv * MIN_KV_BYTES) / MIN_TENSOR_INFO_BYTES)
    corrupt("tensor_count", 8, std::to_string(n_tensors) + " tensors cannot fit in the file");

  // --- Metadata
  kv_.reserve(n_kv);
  kv_index_.reserve(n_kv);
  for (uint64_t i = 0; i < n_kv; ++i) {
    size_t key_pos = c.pos();
    std::string key_field = "metadata key #" + std::to_string(i);
    std::string_view key = c.str(key_field);
    if (key.empty()) corrupt(key_field, key_pos, "empty key");
    std::string field = "metadata '" + std::string(key) + "'";
    if (!kv_index_.emplace(key, kv_.size()).second) corrupt(field, key_pos, "duplicate key");
    size_t type_pos = c.pos();
    uint32_t type = c.u32(field + " value type");
    if (scalar_size(type) < 0) corrupt(field + " value type", type_pos, "invalid value type " + std::to_string(type));
    KeyValue kv;
    kv.key = std::string(key);
    kv.type = static_cast<ValueType>(type);
    kv.raw = c.here();
    size_t value_pos = c.pos();
    skip_value(c, type, path, field, 0);
    kv.raw_size = c.pos() - value_pos;
    if (kv.type == ValueType::ARRAY) {
      kv.array_type = static_cast<ValueType>(load<uint32_t>(kv.raw));
      kv.array_len = load<uint64_t>(kv.raw + 4);
    }
    kv_.push_back(std::move(kv));
  }

  // --- Alignment
  if (const KeyValue* a = find("general.alignment")) {
    size_t a_pos = a->raw - base_;
    if (a->type != ValueType::UINT32)
      corrupt("metadata 'general.alignment'", a_pos,
              std::string("expected uint32, found ") + value_type_name(a->type));
    uint32_t v = load<uint32_t>(a->raw);
    if (v == 0 || (v & (v - 1)) != 0)
      corrupt("metadata 'general.alignment'", a_pos, std::to_string(v) + " is not a nonzero power of two");
    alignment_ = v;
  } else {
    alignment_ = DEFAULT_ALIGNMENT;
  }

  // --- Tensor infos
  std::vector<size_t> offset_field_pos;  // [n_tensors] where each tensor's offset field lies
  tensors_.reserve(n_tensors);
  tensor_index_.reserve(n_tensors);
  offset_field_pos.reserve(n_tensors);
  for (uint64_t i = 0; i < n_tensors; ++i) {
    size_t name_pos = c.pos();
    std::string name_field = "tensor #" + std::to_string(i) + " name";
    std::string_view name = c.str(name_field);
    if (name.empty()) corrupt(name_field, name_pos, "empty name");
    std::string field = "tensor '" + std::string(name) + "'";
    if (!tensor_index_.emplace(name, tensors_.size()).second) corrupt(field, name_pos, "duplicate tensor name");

    size_t dims_pos = c.pos();
    uint32_t n_dims = c.u32(field + " n_dims");
    if (n_dims == 0 || n_dims > MAX_DIMS)
      corrupt(field + " n_dims", dims_pos, "n_dims " + std::to_string(n_dims) + " is not in [1, 4]");
    TensorInfo t;
    t.name = std::string(name);
    t.ne.resize(n_dims);
    uint64_t n_elements = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      size_t ne_pos = c.pos();
      std::string ne_field = field + " ne[" + std::to_string(d) + "]";
      uint64_t ne = c.u64(ne_field);
      if (ne == 0 || ne > uint64_t(std::numeric_limits<int64_t>::max()))
        corrupt(ne_field, ne_pos, "dimension " + std::to_string(ne) + " is not in [1, 2^63)");
      if (!mul_u64(n_elements, ne, &n_elements) || n_elements > uint64_t(std::numeric_limits<int64_t>::max()))
        corrupt(ne_field, ne_pos, "element count overflows");
      t.ne[d] = static_cast<int64_t>(ne);
    }

    size_t type_pos = c.pos();
    uint32_t type_id = c.u32(field + " type");
    if (!dtype_is_supported(type_id)) {
      if (const char* known = ggml_type_name(type_id))
        fail(ErrorCode::UNSUPPORTED, path, field + " type", type_pos,
             "tensor type " + std::to_string(type_id) + " (" + known + ") is not supported");
      corrupt(field + " type", type_pos, "invalid tensor type " + std::to_string(type_id));
    }
    t.type = static_cast<DType>(type_id);
    uint64_t block = static_cast<uint64_t>(dtype_block_size(t.type));
    if (uint64_t(t.ne[0]) % block != 0)
      corrupt(field + " ne[0]", dims_pos + 4,
              std::to_string(t.ne[0]) + " is not a multiple of the block size " + std::to_string(block) + " of " +
                  dtype_name(t.type));
    uint64_t n_bytes = 0;
    if (!mul_u64(n_elements / block, dtype_block_bytes(t.type), &n_bytes) ||
        n_bytes > std::numeric_limits<size_t>::max())
      corrupt(field + " ne", dims_pos + 4, "byte size overflows");
    t.n_bytes = static_cast<size_t>(n_bytes);

    size_t offset_pos = c.pos();
    t.offset = c.u64(field + " offset");
    if (t.offset % alignment_ != 0)
      corrupt(field + " offset", offset_pos,
              std::to_string(t.offset) + " is not a multiple of the alignment " + std::to_string(alignment_));
    t.data = nullptr;  // set once the data section is known
    offset_field_pos.push_back(offset_pos);
    tensors_.push_back(std::move(t));
  }

  // --- Data section: every tensor inside the file, none overlapping
  uint64_t header_end = c.pos();
  uint64_t data_start = (header_end + alignment_ - 1) / alignment_ * alignment_;  // header_end <= size: no overflow
  uint64_t data_size = data_start <= size_ ? size_ - data_start : 0;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    TensorInfo& t = tensors_[i];
    if (t.offset > data_size || t.n_bytes > data_size - t.offset)
      corrupt("tensor '" + t.name + "' offset", offset_field_pos[i],
              "data [" + std::to_string(t.offset) + ", +" + std::to_string(t.n_bytes) +
                  ") extends past the end of the data section (" + std::to_string(data_size) + " bytes at " +
                  std::to_string(data_start) + ")");
    t.data = base_ + data_start + t.offset;
  }
  std::vector<size_t> order(tensors_.size());  // [n_tensors] tensor indices sorted by offset
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return tensors_[a].offset < tensors_[b].offset; });
  for (size_t k = 1; k < order.size(); ++k) {
    const TensorInfo& prev = tensors_[order[k - 1]];
    const TensorInfo& t = tensors_[order[k]];
    if (prev.offset + prev.n_bytes > t.offset)  // both inside the file: no overflow
      corrupt("tensor '" + t.name + "' offset", offset_field_pos[order[k]],
              "data overlaps tensor '" + prev.name + "'");
  }
}

// --- Lookups and typed getters

const KeyValue* File::find(std::string_view key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kv_[it->second];
}

const TensorInfo* File::find_tensor(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

namespace {

[[noreturn]] void wrong_type(const File& f, const KeyValue& kv, const std::string& expected) {
  std::string found = value_type_name(kv.type);
  if (kv.type == ValueType::ARRAY) found += std::string(" of ") + value_type_name(kv.array_type);
  fail(ErrorCode::CORRUPT_FILE, f.path(), "metadata '" + kv.key + "'", kv.raw - f.bytes().data(),
       "expected " + expected + ", found " + found);
}

// Reads one integer of integer type `t` at p; false if it does not fit in int64.
bool read_int(ValueType t, const uint8_t* p, int64_t* out) {
  switch (t) {
    case ValueType::UINT8: *out = load<uint8_t>(p); return true;
    case ValueType::INT8: *out = load<int8_t>(p); return true;
    case ValueType::BOOL: *out = load<uint8_t>(p); return true;
    case ValueType::UINT16: *out = load<uint16_t>(p); return true;
    case ValueType::INT16: *out = load<int16_t>(p); return true;
    case ValueType::UINT32: *out = load<uint32_t>(p); return true;
    case ValueType::INT32: *out = load<int32_t>(p); return true;
    case ValueType::INT64: *out = load<int64_t>(p); return true;
    case ValueType::UINT64: {
      uint64_t v = load<uint64_t>(p);
      if (v > uint64_t(std::numeric_limits<int64_t>::max())) return false;
      *out = static_cast<int64_t>(v);
      return true;
    }
    default: BP_ASSERT(false);
  }
  return false;
}

}  // namespace

std::optional<int64_t> File::get_int(std::string_view key) const {
  const KeyValue* kv = find(key);
  if (!kv) return std::nullopt;
  if (!is_integer(kv->type) && kv->type != ValueType::BOOL) wrong_type(*this, *kv, "an integer");
  int64_t v;
  if (!read_int(kv->type, kv->raw, &v))
    fail(ErrorCode::CORRUPT_FILE, path_, "metadata '" + kv->key + "'", kv->raw - base_, "value does not fit in int64");
  return v;
}

std::optional<double> File::get_float(std::string_view key) const {
  const KeyValue* kv = find(key);
  if (!kv) return std::nullopt;
  if (kv->type == ValueType::FLOAT32) return load<float>(kv->raw);
  if (kv->type == ValueType::FLOAT64) return load<double>(kv->raw);
  if (kv->type == ValueType::UINT64) return static_cast<double>(load<uint64_t>(kv->raw));
  if (is_integer(kv->type)) {
    int64_t v;
    read_int(kv->type, kv->raw, &v);
    return static_cast<double>(v);
  }
  wrong_type(*this, *kv, "a number");
}

std::optional<bool> File::get_bool(std::string_view key) const {
  const KeyValue* kv = find(key);
  if (!kv) return std::nullopt;
  if (kv->type != ValueType::BOOL) wrong_type(*this, *kv, "bool");
  return load<uint8_t>(kv->raw) != 0;
}

std::optional<std::string_view> File::get_string(std::string_view key) const {
  const KeyValue* kv = find(key);
  if (!kv) return std::nullopt;
  if (kv->type != ValueType::STRING) wrong_type(*this, *kv, "string");
  return std::string_view(reinterpret_cast<const char*>(kv->raw) + 8, load<uint64_t>(kv->raw));
}

// Array elements start after the u32 element type and the u64 count.
std::optional<std::vector<std::string_view>> File::get_string_array(std::string_view key) const {
  const KeyValue* kv = find(key);
  if (!kv) return std::nullopt;
  if (kv->type != ValueType::ARRAY || kv->array_type != ValueType::STRING) wrong_type(*this, *kv, "array of string");
  std::vector<std::string_view> out;  // [array_len] views into the mapping
  out.reserve(kv->array_len);
  const uint8_t* p = kv->raw + MIN_ARRAY_HEADER_BYTES;
  for (uint64_t i = 0; i < kv->array_len; ++i) {
    uint64_t n = load<uint64_t>(p);
    out.emplace_back(reinterpret_cast<const char*>(p) + 8, n);
    p += 8 + n;
  }
  return out;
}

std::optional<std::vector<float>> File::get_float_array(std::string_view key) const {
  const KeyValue* kv = find(key);
  if (!kv) return std::nullopt;
  bool f32 = kv->array_type == ValueType::FLOAT32, f64 = kv->array_type == ValueType::FLOAT64;
  if (kv->type != ValueType::ARRAY || !(f32 || f64)) wrong_type(*this, *kv, "array of float32");
  std::vector<float> out(kv->array_len);  // [array_len]
  const uint8_t* p = kv->raw + MIN_ARRAY_HEADER_BYTES;
  if (f32) {
    if (!out.empty()) std::memcpy(out.data(), p, out.size() * sizeof(float));
  } else {
    for (uint64_t i = 0; i < kv->array_len; ++i) out[i] = static_cast<float>(load<double>(p + 8 * i));
  }
  return out;
}

std::optional<std::vector<int64_t>> File::get_int_array(std::string_view key) const {
  const KeyValue* kv = find(key);
  if (!kv) return std::nullopt;
  if (kv->type != ValueType::ARRAY || !(is_integer(kv->array_type) || kv->array_type == ValueType::BOOL))
    wrong_type(*this, *kv, "array of integers");
  std::vector<int64_t> out(kv->array_len);  // [array_len]
  const uint8_t* p = kv->raw + MIN_ARRAY_HEADER_BYTES;
  int elem = scalar_size(static_cast<uint32_t>(kv->array_type));
  for (uint64_t i = 0; i < kv->array_len; ++i) {
    if (!read_int(kv->array_type, p + i * elem, &out[i]))
      fail(ErrorCode::CORRUPT_FILE, path_, "metadata '" + kv->key + "' element " + std::to_string(i),
           p + i * elem - base_, "value does not fit in int64");
  }
  return out;
}

}  // namespace backprompt::gguf
