// Helpers of the GGUF tests (test_gguf.cpp, test_gguf_malformed.cpp): a little-endian byte
// builder, a small valid file whose field offsets are known, parsing from an exact-size copy, and
// a fixture with a fresh directory per test.
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "backprompt/error.h"
#include "gguf/gguf.h"
#include "tensor/dtype.h"

namespace backprompt::testing::gguf_files {

namespace bp = backprompt;
namespace gguf = backprompt::gguf;
using bp::ErrorCode;

// ---------------------------------------------------------------------------------------------
// Helpers: a little-endian byte builder, and a small valid file whose field offsets are known so
// that tests can corrupt one field at a time.

struct Bytes {
  std::vector<uint8_t> b;
  size_t size() const { return b.size(); }
  template <typename T>
  size_t put(T v) {
    size_t at = b.size();
    b.resize(at + sizeof(T));
    std::memcpy(b.data() + at, &v, sizeof(T));
    return at;
  }
  size_t u8(uint8_t v) { return put(v); }
  size_t u32(uint32_t v) { return put(v); }
  size_t u64(uint64_t v) { return put(v); }
  size_t str(std::string_view s) {
    size_t at = u64(s.size());
    b.insert(b.end(), s.begin(), s.end());
    return at;
  }
  void pad_to(size_t alignment) { b.resize((b.size() + alignment - 1) / alignment * alignment, 0); }
};

template <typename T>
inline void poke(std::vector<uint8_t>& b, size_t at, T v) {
  ASSERT_LE(at + sizeof(T), b.size());
  std::memcpy(b.data() + at, &v, sizeof(T));
}

// Metadata: general.architecture = "llama", test.a = u32 7, test.b = ["a", "bc"], test.c = true.
// Tensors: "t.a" f32 [2][4] at 0 (32 bytes), "t.b" q8_0 [32] at 32 (34 bytes). The file ends
// right after t.b's data, so that every strict prefix of it is invalid.
struct SmallFile {
  std::vector<uint8_t> bytes;
  size_t key_a_len, type_a, value_a, key_b, value_b_len, value_b_elem0, type_c, value_c;
  size_t ta_name, ta_n_dims, ta_ne0, ta_ne1, ta_type, ta_offset;
  size_t tb_name, tb_ne0, tb_type, tb_offset;
  size_t data_start;
};

inline SmallFile make_small_file(uint32_t version = 3) {
  SmallFile f;
  Bytes w;
  w.u32(0x46554747);
  w.u32(version);
  w.u64(2);  // tensors
  w.u64(4);  // metadata
  w.str("general.architecture");
  w.u32(8);
  w.str("llama");
  f.key_a_len = w.str("test.a");
  f.type_a = w.u32(4);
  f.value_a = w.u32(7);
  f.key_b = w.str("test.b");
  w.u32(9);
  w.u32(8);
  f.value_b_len = w.u64(2);
  f.value_b_elem0 = w.str("a");
  w.str("bc");
  w.str("test.c");
  f.type_c = w.u32(7);
  f.value_c = w.u8(1);
  f.ta_name = w.str("t.a");
  f.ta_n_dims = w.u32(2);
  f.ta_ne0 = w.u64(4);
  f.ta_ne1 = w.u64(2);
  f.ta_type = w.u32(0);
  f.ta_offset = w.u64(0);
  f.tb_name = w.str("t.b");
  w.u32(1);
  f.tb_ne0 = w.u64(32);
  f.tb_type = w.u32(8);
  f.tb_offset = w.u64(32);
  w.pad_to(32);
  f.data_start = w.size();
  for (int i = 0; i < 8; ++i) w.put<float>(float(i) + 0.5f);
  w.put<uint16_t>(bp::f32_to_f16(0.25f));
  for (int i = 0; i < 32; ++i) w.put<int8_t>(int8_t(i - 16));
  f.bytes = std::move(w.b);
  return f;
}

// Parses `bytes` from an exactly sized heap copy (so that ASan sees any overread).
inline std::unique_ptr<gguf::File> parse(const std::vector<uint8_t>& bytes, const std::string& name = "test.gguf") {
  static thread_local std::vector<uint8_t> keep;  // must outlive the File; tests use one at a time
  keep = bytes;
  keep.shrink_to_fit();
  return gguf::File::from_memory(keep, name);
}

// Expects parsing to throw Error with `code` and a message containing every string in `needles`.
inline void expect_error(const std::vector<uint8_t>& bytes, ErrorCode code, std::vector<std::string> needles = {}) {
  try {
    parse(bytes);
    ADD_FAILURE() << "expected an error";
  } catch (const bp::Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    std::string msg = e.what();
    EXPECT_NE(msg.find("test.gguf: "), std::string::npos) << msg;
    EXPECT_NE(msg.find(" at offset "), std::string::npos) << msg;
    for (const std::string& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "missing '" << n << "' in " << msg;
  }
}

// Calls every accessor; any Error is fine, anything else fails the test (or crashes under ASan).
inline void touch_everything(const gguf::File& f) {
  for (const gguf::KeyValue& kv : f.metadata()) {
    try { f.get_int(kv.key); } catch (const bp::Error&) {}
    try { f.get_float(kv.key); } catch (const bp::Error&) {}
    try { f.get_bool(kv.key); } catch (const bp::Error&) {}
    try { f.get_string(kv.key); } catch (const bp::Error&) {}
    try { f.get_string_array(kv.key); } catch (const bp::Error&) {}
    try { f.get_float_array(kv.key); } catch (const bp::Error&) {}
    try { f.get_int_array(kv.key); } catch (const bp::Error&) {}
  }
  for (const gguf::TensorInfo& t : f.tensors()) {
    ASSERT_GE(t.data, f.bytes().data());
    ASSERT_LE(t.data + t.n_bytes, f.bytes().data() + f.bytes().size());
    volatile uint8_t sink = t.data[0] ^ t.data[t.n_bytes - 1];
    (void)sink;
  }
}

inline std::vector<uint8_t> read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

// A fresh directory per test, removed afterwards.
class GgufFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (std::filesystem::temp_directory_path() / "bp_gguf_XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }
  std::string dir_;
};

}  // namespace backprompt::testing::gguf_files
