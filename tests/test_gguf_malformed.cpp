// Hand-made malformed GGUF files: every one must throw backprompt::Error naming what is wrong,
// never crash or read out of bounds.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "backprompt/error.h"
#include "gguf/gguf.h"
#include "gguf_test_util.h"
#include "test_util.h"

namespace bp = backprompt;
namespace gguf = backprompt::gguf;
using bp::DType;
using bp::ErrorCode;
using gguf::ValueType;
using namespace bp::testing::gguf_files;
using bp::testing::test_data_dir;

// ---------------------------------------------------------------------------------------------
// Malformed files: each must throw Error with the right code, naming the file, field and offset.

TEST(GgufMalformed, TruncatedAtEveryOffset) {
  SmallFile s = make_small_file();
  for (size_t n = 0; n < s.bytes.size(); ++n) {
    std::vector<uint8_t> prefix(s.bytes.begin(), s.bytes.begin() + n);
    try {
      parse(prefix);
      ADD_FAILURE() << "prefix of " << n << " bytes parsed";
    } catch (const bp::Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::CORRUPT_FILE) << e.what();
    }
  }
  EXPECT_NO_THROW(parse(s.bytes));
}

TEST_F(GgufFiles, TruncatedWriterOutputAndRealFile) {
  // A Writer-made file: every prefix that cuts the header or a tensor's data fails.
  gguf::Writer w;
  w.set_string("general.architecture", "x");
  w.set_f32_array("a", {1, 2, 3});
  w.add_tensor("t0", DType::F16, {3}, [](std::span<uint8_t> d) { std::fill(d.begin(), d.end(), 1); });
  w.add_tensor("t1", DType::Q8_0, {32, 2}, [](std::span<uint8_t> d) { std::fill(d.begin(), d.end(), 2); });
  std::string p = path("t.gguf");
  w.write(p);
  std::vector<uint8_t> bytes = read_all(p);
  auto f = parse(bytes);
  const gguf::TensorInfo& last = f->tensors().back();
  size_t end = size_t(last.data - f->bytes().data()) + last.n_bytes;
  f.reset();
  for (size_t n = 0; n < end; ++n) {
    std::vector<uint8_t> prefix(bytes.begin(), bytes.begin() + n);
    EXPECT_THROW(parse(prefix), bp::Error) << n;
  }
  for (size_t n = end; n <= bytes.size(); ++n) {  // only padding is cut
    std::vector<uint8_t> prefix(bytes.begin(), bytes.begin() + n);
    EXPECT_NO_THROW(parse(prefix)) << n;
  }

  // The real model: every cut inside the header, and a sample of cuts inside the data.
  std::string real = test_data_dir() + "/stories260k/stories260K.gguf";
  if (!std::filesystem::exists(real)) {
    GTEST_SKIP() << "test data not found: " << real;
  }
  std::vector<uint8_t> model = read_all(real);
  for (size_t n = 0; n < model.size(); n += (n < 14200 ? 1 : 4099)) {
    std::vector<uint8_t> prefix(model.begin(), model.begin() + n);
    EXPECT_THROW(parse(prefix), bp::Error) << n;
  }
}

TEST(GgufMalformed, BadMagic) {
  SmallFile s = make_small_file();
  s.bytes[0] = 'X';
  expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"magic at offset 0", "not a GGUF file"});
}

TEST(GgufMalformed, BadVersion) {
  expect_error(make_small_file(0).bytes, ErrorCode::CORRUPT_FILE, {"version at offset 4"});
  expect_error(make_small_file(1).bytes, ErrorCode::UNSUPPORTED, {"version at offset 4", "version 1"});
  expect_error(make_small_file(4).bytes, ErrorCode::UNSUPPORTED, {"version at offset 4"});
  expect_error(make_small_file(0x03000000).bytes, ErrorCode::UNSUPPORTED, {"big-endian"});
  expect_error(make_small_file(0xdeadbeef).bytes, ErrorCode::CORRUPT_FILE, {"version at offset 4"});
}

TEST(GgufMalformed, HugeCounts) {
  for (uint64_t n : {~uint64_t(0), uint64_t(1) << 40, uint64_t(1) << 62, uint64_t(1000)}) {
    SmallFile s = make_small_file();
    poke<uint64_t>(s.bytes, 8, n);
    expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"tensor_count at offset 8"});
    s = make_small_file();
    poke<uint64_t>(s.bytes, 16, n);
    expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"metadata_kv_count at offset 16"});
  }
  // Counts that fit the file but are wrong: the parse runs into the next section and fails there.
  SmallFile s = make_small_file();
  poke<uint64_t>(s.bytes, 16, 5);
  EXPECT_THROW(parse(s.bytes), bp::Error);
  s = make_small_file();
  poke<uint64_t>(s.bytes, 8, 3);
  EXPECT_THROW(parse(s.bytes), bp::Error);
}

TEST(GgufMalformed, HugeStringAndArrayLengths) {
  for (uint64_t n : {~uint64_t(0), uint64_t(1) << 63, uint64_t(100000)}) {
    SmallFile s = make_small_file();
    poke<uint64_t>(s.bytes, s.key_a_len, n);
    expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"metadata key #1 at offset " + std::to_string(s.key_a_len)});
    s = make_small_file();
    poke<uint64_t>(s.bytes, s.value_b_len, n);
    expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"metadata 'test.b' length at offset " + std::to_string(s.value_b_len)});
    s = make_small_file();
    poke<uint64_t>(s.bytes, s.value_b_elem0, n);
    expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"metadata 'test.b' element"});
    s = make_small_file();
    poke<uint64_t>(s.bytes, s.ta_name, n);
    expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"tensor #0 name at offset " + std::to_string(s.ta_name)});
  }
  // A u32 array whose count fits in u64 but whose byte size does not.
  SmallFile s = make_small_file();
  poke<uint32_t>(s.bytes, s.value_b_len - 4, 4);
  poke<uint64_t>(s.bytes, s.value_b_len, uint64_t(1) << 62);
  expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"length"});
}

TEST(GgufMalformed, BadValueTypes) {
  SmallFile s = make_small_file();
  poke<uint32_t>(s.bytes, s.type_a, 13);
  expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"metadata 'test.a' value type", "invalid value type 13"});
  s = make_small_file();
  poke<uint32_t>(s.bytes, s.value_b_len - 4, 0xffffffff);
  expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"metadata 'test.b' element type"});
  s = make_small_file();
  s.bytes[s.value_c] = 2;
  expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"metadata 'test.c'", "bool value 2"});
}

TEST(GgufMalformed, NestedArraysTooDeep) {
  for (int depth : {7, 8, 100000}) {  // levels of arrays inside the top-level array
    Bytes w;
    w.u32(0x46554747); w.u32(3); w.u64(0); w.u64(1);
    w.str("deep"); w.u32(9);
    for (int i = 0; i < depth; ++i) { w.u32(9); w.u64(1); }
    w.u32(0); w.u64(0);
    if (depth < 8) {
      auto f = parse(w.b);
      EXPECT_THROW(f->get_int_array("deep"), bp::Error);
    } else {
      expect_error(w.b, ErrorCode::CORRUPT_FILE, {"nested deeper"});
    }
  }
}

TEST(GgufMalformed, BadTensorShapes) {
  SmallFile s = make_small_file();
  poke<uint32_t>(s.bytes, s.ta_n_dims, 5);
  expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"tensor 't.a' n_dims at offset " + std::to_string(s.ta_n_dims)});
  s = make_small_file();
  poke<uint32_t>(s.bytes, s.ta_n_dims, 0);
  expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"tensor 't.a' n_dims"});
  s = make_small_file();
  poke<uint64_t>(s.bytes, s.ta_ne1, 0);
  expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"tensor 't.a' ne[1] at offset " + std::to_string(s.ta_ne1)});
  s = make_small_file();
  poke<uint64_t>(s.bytes, s.ta_ne0, uint64_t(1) << 63);
  expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"tensor 't.a' ne[0]"});
  s = make_small_file();
  poke<uint64_t>(s.bytes, s.ta_ne0, uint64_t(1) << 62);  // 2^62 * 2 elements overflow int64
  expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"tensor 't.a' ne[1]", "overflows"});
  s = make_small_file();
  poke<uint64_t>(s.bytes, s.ta_ne0, uint64_t(1) << 61);  // 2^62 elements fit; 2^64 bytes do not
  expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"tensor 't.a'", "overflows"});
  s = make_small_file();
  poke<uint64_t>(s.bytes, s.ta_ne0, uint64_t(1) << 40);
  expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"tensor 't.a' offset", "past the end"});
  s = make_small_file();
  poke<uint64_t>(s.bytes, s.tb_ne0, 16);
  expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"tensor 't.b' ne[0]", "block size 32"});
}

TEST(GgufMalformed, UnknownTensorType) {
  SmallFile s = make_small_file();
  poke<uint32_t>(s.bytes, s.ta_type, 12);  // q4_K: a real ggml type backprompt does not implement
  expect_error(s.bytes, ErrorCode::UNSUPPORTED, {"tensor 't.a' type at offset " + std::to_string(s.ta_type), "12", "q4_K"});
  for (uint32_t bad : {4u, 5u, 40u, 1000u, 0xffffffffu}) {
    s = make_small_file();
    poke<uint32_t>(s.bytes, s.ta_type, bad);
    expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"tensor 't.a' type", "invalid tensor type " + std::to_string(bad)});
  }
}

TEST(GgufMalformed, BadOffsets) {
  SmallFile s = make_small_file();
  poke<uint64_t>(s.bytes, s.tb_offset, 48);
  expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"tensor 't.b' offset at offset " + std::to_string(s.tb_offset), "alignment 32"});
  s = make_small_file();
  poke<uint64_t>(s.bytes, s.tb_offset, 64);
  expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"tensor 't.b' offset", "past the end"});
  for (uint64_t off : {~uint64_t(31), uint64_t(1) << 63, ~uint64_t(0) - 63}) {
    s = make_small_file();
    poke<uint64_t>(s.bytes, s.tb_offset, off);
    expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"tensor 't.b' offset", "past the end"});
  }
  s = make_small_file();
  poke<uint64_t>(s.bytes, s.tb_offset, 0);
  expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"tensor 't.b' offset", "overlaps tensor 't.a'"});
}

TEST(GgufMalformed, DuplicateNames) {
  SmallFile s = make_small_file();
  s.bytes[s.key_b + 8 + 5] = 'a';  // "test.b" -> "test.a"
  expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"metadata 'test.a' at offset " + std::to_string(s.key_b), "duplicate key"});
  s = make_small_file();
  s.bytes[s.tb_name + 8 + 2] = 'a';  // "t.b" -> "t.a"
  expect_error(s.bytes, ErrorCode::CORRUPT_FILE, {"tensor 't.a' at offset " + std::to_string(s.tb_name), "duplicate tensor name"});
  s = make_small_file();
  poke<uint64_t>(s.bytes, s.key_a_len, 0);  // empty key; the following bytes then misparse
  EXPECT_THROW(parse(s.bytes), bp::Error);
}

TEST(GgufMalformed, BadAlignment) {
  auto with_alignment = [](uint32_t type, uint64_t value) {
    Bytes w;
    w.u32(0x46554747); w.u32(3); w.u64(0); w.u64(1);
    w.str("general.alignment"); w.u32(type);
    if (type == 10) w.u64(value); else w.u32(uint32_t(value));
    return w.b;
  };
  EXPECT_EQ(parse(with_alignment(4, 64))->alignment(), 64u);
  EXPECT_EQ(parse(with_alignment(4, 1))->alignment(), 1u);
  expect_error(with_alignment(4, 0), ErrorCode::CORRUPT_FILE, {"general.alignment", "power of two"});
  expect_error(with_alignment(4, 48), ErrorCode::CORRUPT_FILE, {"general.alignment", "power of two"});
  expect_error(with_alignment(10, 32), ErrorCode::CORRUPT_FILE, {"general.alignment", "expected uint32"});
}

TEST(GgufMalformed, TypedGettersRejectWrongTypes) {
  SmallFile s = make_small_file();
  auto f = parse(s.bytes);
  auto expect_type_error = [&](auto&& fn, const std::string& key) {
    try {
      fn();
      ADD_FAILURE() << "expected an error for " << key;
    } catch (const bp::Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::CORRUPT_FILE);
      EXPECT_NE(std::string(e.what()).find("metadata '" + key + "' at offset"), std::string::npos) << e.what();
    }
  };
  expect_type_error([&] { f->get_int("general.architecture"); }, "general.architecture");
  expect_type_error([&] { f->get_float("general.architecture"); }, "general.architecture");
  expect_type_error([&] { f->get_bool("test.a"); }, "test.a");
  expect_type_error([&] { f->get_string("test.a"); }, "test.a");
  expect_type_error([&] { f->get_string("test.b"); }, "test.b");
  expect_type_error([&] { f->get_int("test.b"); }, "test.b");
  expect_type_error([&] { f->get_string_array("test.a"); }, "test.a");
  expect_type_error([&] { f->get_float_array("test.b"); }, "test.b");
  expect_type_error([&] { f->get_int_array("test.b"); }, "test.b");
  expect_type_error([&] { f->get_int_array("general.architecture"); }, "general.architecture");
  expect_type_error([&] { f->get_string_array("test.c"); }, "test.c");
}

TEST(GgufMalformed, RandomCorruptionNeverCrashes) {
  std::vector<std::vector<uint8_t>> seeds = {make_small_file().bytes};
  {
    gguf::Writer w;  // written to memory through a temporary file
    w.set_string_array("s", {"x", "yy", "zzz"});
    w.set_i32_array("i", {1, 2, 3});
    w.add_tensor("q", DType::Q8_0, {32, 2}, [](std::span<uint8_t>) {});
    w.add_tensor("b", DType::BF16, {4, 4}, [](std::span<uint8_t>) {});
    std::string p = (std::filesystem::temp_directory_path() / ("bp_gguf_rand_" + std::to_string(getpid()))).string();
    w.write(p);
    seeds.push_back(read_all(p));
    std::filesystem::remove(p);
  }
  std::mt19937_64 rng(1234);
  int n_ok = 0, n_err = 0;
  for (int iter = 0; iter < 4000; ++iter) {
    std::vector<uint8_t> b = seeds[iter % seeds.size()];
    int n_flips = 1 + int(rng() % 4);
    for (int k = 0; k < n_flips; ++k) {
      size_t at = rng() % b.size();
      switch (rng() % 3) {
        case 0: b[at] ^= uint8_t(1u << (rng() % 8)); break;
        case 1: b[at] = uint8_t(rng()); break;
        default: b[at] = (rng() % 2) ? 0xff : 0x00; break;
      }
    }
    try {
      auto f = parse(b);
      touch_everything(*f);
      ++n_ok;
    } catch (const bp::Error&) {
      ++n_err;
    }
  }
  EXPECT_GT(n_ok, 0);
  EXPECT_GT(n_err, 0);
}
