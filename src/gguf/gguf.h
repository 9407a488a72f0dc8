// GGUF (v2 and v3) reading over mmap, and writing.
//
// Reading validates the whole header before anything is used: magic, version, counts, string
// lengths, metadata value types, tensor types, shapes, offsets, alignment, and that every
// tensor lies inside the file. Any violation throws Error(CORRUPT_FILE) (or UNSUPPORTED for a
// valid file using a tensor type we do not implement, GGUF v1, a version above 3, or a
// big-endian file) with a message "<path>: <field> at offset <n>: <what>".
// After open() succeeds, every accessor is bounds-safe.
// Beyond the format itself the reader also requires: non-empty, unique keys and tensor names;
// bool values 0 or 1; 1 to 4 dimensions, each >= 1, ne[0] a multiple of the type's block size;
// tensor offsets multiples of the alignment; tensors inside the file and not overlapping.
// Nested arrays are validated (up to 8 levels) and can be copied, but no getter returns them.
// Opening a mapped file reads only the header: tensor data stays untouched in the mapping until
// used. Placement::MEMORY reads the whole file into memory of its own first (see Placement).
//
// Thread-safety: a File is immutable after open(); all const methods may be called concurrently.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "tensor/dtype.h"

namespace backprompt::gguf {

enum class ValueType : uint32_t {
  UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6,
  BOOL = 7, STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12,
};

// One metadata entry. `raw` points into the mapping: for scalars the value bytes, for strings
// the length-prefixed string, for arrays the array header (element type, count, elements).
struct KeyValue {
  std::string key;
  ValueType type;
  ValueType array_type = ValueType::UINT8;  // meaningful when type == ARRAY
  uint64_t array_len = 0;                   // meaningful when type == ARRAY
  const uint8_t* raw = nullptr;             // start of the value's bytes (after the type field)
  size_t raw_size = 0;                      // bytes of the value, including any length prefixes
};

struct TensorInfo {
  std::string name;
  DType type;
  std::vector<int64_t> ne;   // dimensions, ne[0] innermost (contiguous): a [out, in] matrix has ne = {in, out}
  uint64_t offset;           // relative to the start of the data section
  const uint8_t* data;       // into the mapping
  size_t n_bytes;
  int64_t n_elements() const;
};

// Where an open File's bytes live.
enum class Placement {
  MAPPED,  // a read-only private mapping of the file: the page cache's pages, nothing copied
  MEMORY,  // a copy read into anonymous memory that asks for transparent huge pages (2 MiB)
};

class File {
 public:
  // Maps (or reads, for Placement::MEMORY) and validates `path`. Throws Error(IO_ERROR) if it
  // cannot be opened, mapped or read, Error(OUT_OF_MEMORY) if a MEMORY copy cannot be allocated,
  // Error(CORRUPT_FILE) if it is malformed.
  static std::unique_ptr<File> open(const std::string& path, Placement placement = Placement::MAPPED);
  // Validates an in-memory image (used by the fuzzer and tests); `bytes` must outlive the File.
  static std::unique_ptr<File> from_memory(std::span<const uint8_t> bytes, std::string name = "<memory>");
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  std::span<const uint8_t> bytes() const { return {base_, size_}; }
  Placement placement() const { return placement_; }

  const std::vector<KeyValue>& metadata() const { return kv_; }
  const KeyValue* find(std::string_view key) const;  // nullptr if absent

  // Typed getters: std::nullopt when the key is absent; Error(CORRUPT_FILE) naming the key when
  // present with an incompatible type. get_int accepts any integer type (and bool);
  // get_float accepts FLOAT32/FLOAT64 and integers.
  std::optional<int64_t> get_int(std::string_view key) const;
  std::optional<double> get_float(std::string_view key) const;
  std::optional<bool> get_bool(std::string_view key) const;
  std::optional<std::string_view> get_string(std::string_view key) const;
  // Arrays: nullopt when absent; Error(CORRUPT_FILE) when not an array of that element type
  // (get_int_array accepts any integer element type, and bool; get_float_array accepts FLOAT32
  // and FLOAT64). Strings are views into the file's bytes, valid while the File lives.
  std::optional<std::vector<std::string_view>> get_string_array(std::string_view key) const;
  std::optional<std::vector<float>> get_float_array(std::string_view key) const;
  std::optional<std::vector<int64_t>> get_int_array(std::string_view key) const;

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find_tensor(std::string_view name) const;  // nullptr if absent

 private:
  File() = default;
  void parse();
  std::string path_;
  const uint8_t* base_ = nullptr;
  size_t size_ = 0;
  bool mapped_ = false;     // base_ is a mapping of the file
  size_t alloc_bytes_ = 0;  // > 0: base_ is a MEMORY copy from detail::big_alloc of this many bytes
  Placement placement_ = Placement::MAPPED;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  std::vector<KeyValue> kv_;
  std::vector<TensorInfo> tensors_;
  // Name -> index into kv_ / tensors_; the views point into the mapping, which outlives them.
  std::unordered_map<std::string_view, size_t> kv_index_;
  std::unordered_map<std::string_view, size_t> tensor_index_;
};

// Builds a GGUF v3 file. Tensor data is produced at write time by a fill callback so that
// multi-gigabyte models are streamed, never held in memory whole (one tensor at a time).
// Tensor data is aligned to general.alignment: 32 (and the key is not written) unless the caller
// sets it (as a uint32 power of two). Metadata is written in the order keys were first set.
// Invalid keys, names or shapes throw Error(INVALID_ARGUMENT).
// Thread-safety: none; use from one thread.
class Writer {
 public:
  void set_u32(const std::string& key, uint32_t v);
  void set_i32(const std::string& key, int32_t v);
  void set_u64(const std::string& key, uint64_t v);
  void set_f32(const std::string& key, float v);
  void set_bool(const std::string& key, bool v);
  void set_string(const std::string& key, const std::string& v);
  void set_string_array(const std::string& key, const std::vector<std::string>& v);
  void set_f32_array(const std::string& key, const std::vector<float>& v);
  void set_i32_array(const std::string& key, const std::vector<int32_t>& v);
  // Copies one metadata entry verbatim from another file (e.g. a tokenizer's vocabulary).
  void copy_kv(const KeyValue& kv);
  // `fill` receives a buffer of exactly dtype_row_bytes(type, ne[0]) * (other dims) bytes.
  void add_tensor(const std::string& name, DType type, std::vector<int64_t> ne,
                  std::function<void(std::span<uint8_t>)> fill);
  // Writes to `path` + ".tmp", fsyncs, renames over `path`. Error(IO_ERROR) on failure.
  // Setting a key twice keeps the last value.
  void write(const std::string& path) const;

 private:
  struct PendingKv { std::string key; std::vector<uint8_t> encoded; };  // type + value bytes
  struct PendingTensor {
    std::string name; DType type; std::vector<int64_t> ne;
    std::function<void(std::span<uint8_t>)> fill;
  };
  void put(const std::string& key, std::vector<uint8_t> encoded);
  std::vector<PendingKv> kv_;
  std::vector<PendingTensor> tensors_;
};

}  // namespace backprompt::gguf
