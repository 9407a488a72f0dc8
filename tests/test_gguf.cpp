// GGUF reader and writer: round trips and the real test-data files (malformed files:
// test_gguf_malformed.cpp).
#include <gtest/gtest.h>
#include <stdlib.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
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
// Well-formed files

TEST(GgufReader, SmallFileParses) {
  for (uint32_t version : {2u, 3u}) {
    SmallFile s = make_small_file(version);
    auto f = parse(s.bytes);
    EXPECT_EQ(f->version(), version);
    EXPECT_EQ(f->alignment(), 32u);
    ASSERT_EQ(f->metadata().size(), 4u);
    EXPECT_EQ(f->get_string("general.architecture"), "llama");
    EXPECT_EQ(f->get_int("test.a"), 7);
    EXPECT_EQ(f->get_float("test.a"), 7.0);
    EXPECT_EQ(f->get_bool("test.c"), true);
    EXPECT_EQ(f->get_int("test.c"), 1);
    auto arr = f->get_string_array("test.b");
    ASSERT_TRUE(arr);
    EXPECT_EQ(*arr, (std::vector<std::string_view>{"a", "bc"}));
    const gguf::KeyValue* kv = f->find("test.b");
    ASSERT_NE(kv, nullptr);
    EXPECT_EQ(kv->type, ValueType::ARRAY);
    EXPECT_EQ(kv->array_type, ValueType::STRING);
    EXPECT_EQ(kv->array_len, 2u);
    EXPECT_EQ(kv->raw_size, 4u + 8u + 9u + 10u);
    EXPECT_EQ(f->find("absent"), nullptr);
    EXPECT_FALSE(f->get_int("absent"));
    EXPECT_FALSE(f->get_string_array("absent"));

    ASSERT_EQ(f->tensors().size(), 2u);
    const gguf::TensorInfo* a = f->find_tensor("t.a");
    ASSERT_NE(a, nullptr);
    EXPECT_EQ(a->type, DType::F32);
    EXPECT_EQ(a->ne, (std::vector<int64_t>{4, 2}));
    EXPECT_EQ(a->n_elements(), 8);
    EXPECT_EQ(a->n_bytes, 32u);
    EXPECT_EQ(a->data, f->bytes().data() + s.data_start);
    float v[8];
    std::memcpy(v, a->data, sizeof(v));
    EXPECT_EQ(v[7], 7.5f);
    const gguf::TensorInfo* b = f->find_tensor("t.b");
    ASSERT_NE(b, nullptr);
    EXPECT_EQ(b->type, DType::Q8_0);
    EXPECT_EQ(b->n_bytes, 34u);
    EXPECT_EQ(b->offset, 32u);
    EXPECT_EQ(b->data + b->n_bytes, f->bytes().data() + f->bytes().size());
    EXPECT_EQ(f->find_tensor("t.c"), nullptr);
  }
}

TEST_F(GgufFiles, WriterRoundTripsEveryMetadataType) {
  // A hand-made source for the types the Writer has no setter for, copied with copy_kv.
  Bytes w;
  w.u32(0x46554747); w.u32(3); w.u64(0); w.u64(11);
  w.str("s.u8"); w.u32(0); w.u8(200);
  w.str("s.i8"); w.u32(1); w.put<int8_t>(-100);
  w.str("s.u16"); w.u32(2); w.put<uint16_t>(60000);
  w.str("s.i16"); w.u32(3); w.put<int16_t>(-30000);
  w.str("s.i64"); w.u32(11); w.put<int64_t>(-(int64_t(1) << 40));
  w.str("s.f64"); w.u32(12); w.put<double>(0.125);
  w.str("s.u64big"); w.u32(10); w.u64(~uint64_t(0));
  w.str("s.nested"); w.u32(9); w.u32(9); w.u64(2);     // [[1, 2], ["x"]]
  w.u32(0); w.u64(2); w.u8(1); w.u8(2);
  w.u32(8); w.u64(1); w.str("x");
  w.str("s.bools"); w.u32(9); w.u32(7); w.u64(3); w.u8(1); w.u8(0); w.u8(1);
  w.str("s.f64s"); w.u32(9); w.u32(12); w.u64(2); w.put<double>(1.5); w.put<double>(-2.0);
  w.str("s.u16s"); w.u32(9); w.u32(2); w.u64(2); w.put<uint16_t>(1); w.put<uint16_t>(65535);
  auto src = parse(w.b, "src.gguf");

  gguf::Writer out;
  out.set_u32("k.u32", 4000000000u);
  out.set_i32("k.i32", -7);
  out.set_u64("k.u64", uint64_t(1) << 50);
  out.set_f32("k.f32", 1e-5f);
  out.set_bool("k.true", true);
  out.set_bool("k.false", false);
  out.set_string("k.str", "héllo");
  out.set_string("k.empty", "");
  out.set_string_array("k.strs", {"", "a", std::string("nul\0in", 6)});
  out.set_f32_array("k.f32s", {1.0f, -0.5f, 3e38f});
  out.set_i32_array("k.i32s", {-1, 0, 2147483647});
  out.set_i32_array("k.empty_arr", {});
  out.set_f32_array("k.empty_f32s", {});
  for (const gguf::KeyValue& kv : src->metadata()) out.copy_kv(kv);
  std::string p = path("meta.gguf");
  out.write(p);

  auto f = gguf::File::open(p);
  EXPECT_EQ(f->version(), 3u);
  EXPECT_EQ(f->find("general.alignment"), nullptr);  // default alignment is implied, not written
  ASSERT_EQ(f->metadata().size(), 13u + 11u);
  EXPECT_EQ(f->metadata()[0].key, "k.u32");  // order of first set
  EXPECT_EQ(f->get_int("k.u32"), 4000000000);
  EXPECT_EQ(f->find("k.u32")->type, ValueType::UINT32);
  EXPECT_EQ(f->get_int("k.i32"), -7);
  EXPECT_EQ(f->find("k.i32")->type, ValueType::INT32);
  EXPECT_EQ(f->get_int("k.u64"), int64_t(1) << 50);
  EXPECT_EQ(f->find("k.u64")->type, ValueType::UINT64);
  EXPECT_EQ(f->get_float("k.f32"), double(1e-5f));
  EXPECT_EQ(f->get_bool("k.true"), true);
  EXPECT_EQ(f->get_bool("k.false"), false);
  EXPECT_EQ(f->get_string("k.str"), "héllo");
  EXPECT_EQ(f->get_string("k.empty"), "");
  EXPECT_EQ(*f->get_string_array("k.strs"), (std::vector<std::string_view>{"", "a", std::string_view("nul\0in", 6)}));
  EXPECT_EQ(*f->get_float_array("k.f32s"), (std::vector<float>{1.0f, -0.5f, 3e38f}));
  EXPECT_EQ(*f->get_int_array("k.i32s"), (std::vector<int64_t>{-1, 0, 2147483647}));
  EXPECT_TRUE(f->get_int_array("k.empty_arr")->empty());
  EXPECT_TRUE(f->get_float_array("k.empty_f32s")->empty());

  EXPECT_EQ(f->get_int("s.u8"), 200);
  EXPECT_EQ(f->get_int("s.i8"), -100);
  EXPECT_EQ(f->get_int("s.u16"), 60000);
  EXPECT_EQ(f->get_int("s.i16"), -30000);
  EXPECT_EQ(f->get_int("s.i64"), -(int64_t(1) << 40));
  EXPECT_EQ(f->get_float("s.f64"), 0.125);
  EXPECT_THROW(f->get_int("s.u64big"), bp::Error);  // does not fit in int64
  EXPECT_EQ(f->get_float("s.u64big"), 18446744073709551615.0);
  EXPECT_EQ(*f->get_int_array("s.bools"), (std::vector<int64_t>{1, 0, 1}));  // like get_int, accepts bool
  EXPECT_EQ(*f->get_float_array("s.f64s"), (std::vector<float>{1.5f, -2.0f}));
  EXPECT_EQ(*f->get_int_array("s.u16s"), (std::vector<int64_t>{1, 65535}));
  EXPECT_THROW(f->get_int_array("s.nested"), bp::Error);
  // Copied entries are byte-identical to their source.
  for (const gguf::KeyValue& kv : src->metadata()) {
    const gguf::KeyValue* c = f->find(kv.key);
    ASSERT_NE(c, nullptr) << kv.key;
    EXPECT_EQ(c->type, kv.type);
    EXPECT_EQ(c->array_type, kv.array_type);
    EXPECT_EQ(c->array_len, kv.array_len);
    ASSERT_EQ(c->raw_size, kv.raw_size);
    EXPECT_EQ(std::memcmp(c->raw, kv.raw, kv.raw_size), 0) << kv.key;
  }
}

TEST_F(GgufFiles, WriterRoundTripsTensors) {
  for (uint32_t alignment : {0u, 64u}) {  // 0: the default
    struct Spec { std::string name; DType type; std::vector<int64_t> ne; };
    std::vector<Spec> specs = {
        {"f32.2d", DType::F32, {3, 2}},
        {"f16.1d", DType::F16, {5}},
        {"bf16.4d", DType::BF16, {2, 3, 1, 2}},
        {"q8_0.2d", DType::Q8_0, {64, 3}},
        {"f32.3d", DType::F32, {1, 1, 7}},
    };
    gguf::Writer out;
    if (alignment) out.set_u32("general.alignment", alignment);
    out.set_string("general.architecture", "test");
    std::vector<std::vector<uint8_t>> expected;
    for (size_t i = 0; i < specs.size(); ++i) {
      int64_t rows = 1;
      for (size_t d = 1; d < specs[i].ne.size(); ++d) rows *= specs[i].ne[d];
      std::vector<uint8_t> bytes(bp::dtype_row_bytes(specs[i].type, specs[i].ne[0]) * rows);
      for (size_t j = 0; j < bytes.size(); ++j) bytes[j] = uint8_t(j * 31 + i * 7 + 1);
      expected.push_back(bytes);
      out.add_tensor(specs[i].name, specs[i].type, specs[i].ne, [bytes](std::span<uint8_t> dst) {
        ASSERT_EQ(dst.size(), bytes.size());
        std::memcpy(dst.data(), bytes.data(), bytes.size());
      });
    }
    std::string p = path("tensors.gguf");
    out.write(p);
    EXPECT_FALSE(std::filesystem::exists(p + ".tmp"));

    auto f = gguf::File::open(p);
    uint64_t a = alignment ? alignment : 32;
    EXPECT_EQ(f->alignment(), a);
    ASSERT_EQ(f->tensors().size(), specs.size());
    for (size_t i = 0; i < specs.size(); ++i) {
      const gguf::TensorInfo& t = f->tensors()[i];
      EXPECT_EQ(t.name, specs[i].name);
      EXPECT_EQ(t.type, specs[i].type);
      EXPECT_EQ(t.ne, specs[i].ne);
      EXPECT_EQ(t.offset % a, 0u);
      EXPECT_EQ(size_t(t.data - f->bytes().data()) % a, 0u);
      ASSERT_EQ(t.n_bytes, expected[i].size());
      EXPECT_EQ(std::memcmp(t.data, expected[i].data(), t.n_bytes), 0) << t.name;
      EXPECT_EQ(f->find_tensor(specs[i].name), &t);
    }
    EXPECT_EQ(f->bytes().size() % a, 0u);  // data padded after the last tensor too
  }
}

TEST_F(GgufFiles, MemoryPlacementHoldsTheMappedBytes) {
  // One tensor over 64 MiB, so that the file is read in several pieces (the last one partial),
  // and a file under a huge page.
  for (const int64_t big : {(int64_t{70} << 20) / 4 + 5, int64_t{37}}) {
    gguf::Writer out;
    out.set_string("general.architecture", "test");
    out.add_tensor("big", DType::F32, {big}, [](std::span<uint8_t> dst) {
      for (size_t j = 0; j < dst.size(); ++j) dst[j] = uint8_t(j * 131 + (j >> 20) + 3);
    });
    out.add_tensor("small", DType::Q8_0, {64, 3}, [](std::span<uint8_t> dst) {
      for (size_t j = 0; j < dst.size(); ++j) dst[j] = uint8_t(j * 7 + 1);
    });
    const std::string p = path("memory.gguf");
    out.write(p);
    auto mapped = gguf::File::open(p);
    auto copy = gguf::File::open(p, gguf::Placement::MEMORY);
    EXPECT_EQ(mapped->placement(), gguf::Placement::MAPPED);
    EXPECT_EQ(copy->placement(), gguf::Placement::MEMORY);
    ASSERT_EQ(copy->bytes().size(), mapped->bytes().size());
    EXPECT_NE(copy->bytes().data(), mapped->bytes().data());
    EXPECT_EQ(std::memcmp(copy->bytes().data(), mapped->bytes().data(), copy->bytes().size()), 0) << big;
    EXPECT_EQ(reinterpret_cast<uintptr_t>(copy->bytes().data()) % 4096, 0u);  // aligned like a mapping
    EXPECT_EQ(copy->get_string("general.architecture"), "test");
    ASSERT_EQ(copy->tensors().size(), 2u);
    for (size_t i = 0; i < 2; ++i) {
      const gguf::TensorInfo& a = mapped->tensors()[i];
      const gguf::TensorInfo& b = copy->tensors()[i];
      EXPECT_EQ(b.name, a.name);
      EXPECT_EQ(b.data - copy->bytes().data(), a.data - mapped->bytes().data());
      EXPECT_EQ(b.n_bytes, a.n_bytes);
    }
    std::filesystem::remove(p);
  }
}

TEST_F(GgufFiles, MemoryPlacementRejectsWhatMappingRejects) {
  gguf::Writer w;
  w.set_string("general.architecture", "x");
  w.add_tensor("t0", DType::F32, {64, 4}, [](std::span<uint8_t> d) { std::fill(d.begin(), d.end(), 1); });
  const std::string p = path("cut.gguf");
  w.write(p);
  const std::vector<uint8_t> whole = read_all(p);
  for (size_t n : {size_t{0}, size_t{3}, size_t{40}, whole.size() - 8}) {
    bp::testing::write_file(p, std::span<const uint8_t>(whole.data(), n));
    std::string mapped_error, memory_error;
    try {
      gguf::File::open(p);
    } catch (const bp::Error& e) {
      mapped_error = e.what();
    }
    try {
      gguf::File::open(p, gguf::Placement::MEMORY);
      ADD_FAILURE() << n << " bytes opened";
    } catch (const bp::Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::CORRUPT_FILE) << e.what();
      memory_error = e.what();
    }
    EXPECT_EQ(memory_error, mapped_error) << n;
  }
  try {
    gguf::File::open(path("absent.gguf"), gguf::Placement::MEMORY);
    ADD_FAILURE() << "a missing file opened";
  } catch (const bp::Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::IO_ERROR);
    EXPECT_NE(std::string(e.what()).find("absent.gguf"), std::string::npos) << e.what();
  }
}

TEST_F(GgufFiles, WriterKeepsLastValueAndReplacesAtomically) {
  std::string p = path("m.gguf");
  gguf::Writer w1;
  w1.set_u32("a", 1);
  w1.set_string("b", "x");
  w1.set_u32("a", 2);
  w1.set_string("a", "now a string");
  w1.write(p);
  auto f = gguf::File::open(p);
  ASSERT_EQ(f->metadata().size(), 2u);
  EXPECT_EQ(f->get_string("a"), "now a string");
  std::vector<uint8_t> before = read_all(p);
  f.reset();

  // A fill callback that throws leaves the old file in place and no temporary behind.
  gguf::Writer w2;
  w2.set_u32("c", 3);
  w2.add_tensor("t", DType::F32, {4}, [](std::span<uint8_t>) { throw std::runtime_error("fill failed"); });
  EXPECT_THROW(w2.write(p), std::runtime_error);
  EXPECT_EQ(read_all(p), before);
  EXPECT_FALSE(std::filesystem::exists(p + ".tmp"));

  // An unwritable destination is an IO_ERROR.
  try {
    w1.write(path("no/such/dir/m.gguf"));
    ADD_FAILURE() << "expected an error";
  } catch (const bp::Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::IO_ERROR);
  }
}

TEST(GgufWriter, RejectsInvalidArguments) {
  gguf::Writer w;
  auto fill = [](std::span<uint8_t>) {};
  auto expect_invalid = [](auto&& fn) {
    try {
      fn();
      ADD_FAILURE() << "expected INVALID_ARGUMENT";
    } catch (const bp::Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::INVALID_ARGUMENT) << e.what();
    }
  };
  expect_invalid([&] { w.add_tensor("", DType::F32, {4}, fill); });
  expect_invalid([&] { w.add_tensor("t", DType::F32, {}, fill); });
  expect_invalid([&] { w.add_tensor("t", DType::F32, {1, 1, 1, 1, 1}, fill); });
  expect_invalid([&] { w.add_tensor("t", DType::F32, {0}, fill); });
  expect_invalid([&] { w.add_tensor("t", DType::F32, {-3}, fill); });
  expect_invalid([&] { w.add_tensor("t", DType::Q8_0, {33}, fill); });
  expect_invalid([&] { w.add_tensor("t", DType::F32, {int64_t(1) << 40, int64_t(1) << 40}, fill); });
  expect_invalid([&] { w.add_tensor("t", static_cast<DType>(12), {32}, fill); });
  w.add_tensor("t", DType::F32, {4}, fill);
  expect_invalid([&] { w.add_tensor("t", DType::F16, {4}, fill); });
  expect_invalid([&] { w.set_u32("", 1); });
  gguf::Writer bad_alignment;
  bad_alignment.set_u32("general.alignment", 24);
  expect_invalid([&] { bad_alignment.write("/nonexistent/never-written.gguf"); });
}

TEST_F(GgufFiles, OpenReportsIoErrors) {
  try {
    gguf::File::open(path("missing.gguf"));
    ADD_FAILURE();
  } catch (const bp::Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::IO_ERROR);
    EXPECT_NE(std::string(e.what()).find("missing.gguf"), std::string::npos);
  }
  try {
    gguf::File::open(dir_);
    ADD_FAILURE();
  } catch (const bp::Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::IO_ERROR);
  }
  std::ofstream(path("empty.gguf")).close();
  try {
    gguf::File::open(path("empty.gguf"));
    ADD_FAILURE();
  } catch (const bp::Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::CORRUPT_FILE);
    EXPECT_NE(std::string(e.what()).find("empty.gguf: magic at offset 0"), std::string::npos) << e.what();
  }
}

// ---------------------------------------------------------------------------------------------
// Real files from the shared test data

TEST(GgufReader, Stories260K) {
  std::string dir = test_data_dir() + "/stories260k";
  std::string p = dir + "/stories260K.gguf";
  if (!std::filesystem::exists(p)) {
    GTEST_SKIP() << "test data not found: " << p << " (set BACKPROMPT_TEST_DATA)";
  }
  auto f = gguf::File::open(p);
  EXPECT_EQ(f->version(), 3u);
  EXPECT_EQ(f->metadata().size(), 19u);
  EXPECT_EQ(f->get_string("general.architecture"), "llama");
  EXPECT_EQ(f->get_string("tokenizer.ggml.model"), "llama");
  EXPECT_EQ(f->get_int("llama.embedding_length"), 64);
  EXPECT_EQ(f->get_int("llama.feed_forward_length"), 172);
  EXPECT_EQ(f->get_int("llama.block_count"), 5);
  EXPECT_EQ(f->get_int("llama.attention.head_count"), 8);
  EXPECT_EQ(f->get_int("llama.attention.head_count_kv"), 4);
  EXPECT_EQ(f->get_int("llama.context_length"), 2048);
  EXPECT_EQ(f->get_int("tokenizer.ggml.seperator_token_id"), 4294967295);
  EXPECT_NEAR(*f->get_float("llama.attention.layer_norm_rms_epsilon"), 1e-5, 1e-9);
  auto tokens = f->get_string_array("tokenizer.ggml.tokens");
  ASSERT_TRUE(tokens);
  ASSERT_EQ(tokens->size(), 512u);
  EXPECT_EQ((*tokens)[1], "<s>");
  EXPECT_EQ((*tokens)[2], "</s>");
  EXPECT_EQ(f->get_float_array("tokenizer.ggml.scores")->size(), 512u);
  EXPECT_EQ(f->get_int_array("tokenizer.ggml.token_type")->size(), 512u);
  EXPECT_THROW(f->get_int("general.architecture"), bp::Error);

  ASSERT_EQ(f->tensors().size(), 48u);
  const gguf::TensorInfo* emb = f->find_tensor("token_embd.weight");
  ASSERT_NE(emb, nullptr);
  EXPECT_EQ(emb->type, DType::F32);
  EXPECT_EQ(emb->ne, (std::vector<int64_t>{64, 512}));
  EXPECT_EQ(emb->n_bytes, 64u * 512u * 4u);
  const gguf::TensorInfo* down = f->find_tensor("blk.4.ffn_down.weight");
  ASSERT_NE(down, nullptr);
  EXPECT_EQ(down->ne, (std::vector<int64_t>{172, 64}));
  EXPECT_EQ(f->tensors().back().data + f->tensors().back().n_bytes, f->bytes().data() + f->bytes().size());

  // The same embedding table sits in the llama2.c checkpoint right after its 7-int header.
  std::vector<uint8_t> bin = read_all(dir + "/stories260K.bin");
  if (bin.size() >= 28 + emb->n_bytes) {
    EXPECT_EQ(std::memcmp(emb->data, bin.data() + 28, emb->n_bytes), 0);
  }

  touch_everything(*f);
}

TEST(GgufReader, VocabFiles) {
  struct Case { const char* file; const char* model; size_t n_tokens; };
  for (Case c : {Case{"ggml-vocab-gpt-2.gguf", "gpt2", 50257}, Case{"ggml-vocab-llama-spm.gguf", "llama", 32000},
                 Case{"ggml-vocab-phi-3.gguf", "llama", 32064}}) {
    std::string p = test_data_dir() + "/ggml-vocab/" + c.file;
    if (!std::filesystem::exists(p)) {
      GTEST_SKIP() << "test data not found: " << p << " (set BACKPROMPT_TEST_DATA)";
    }
    auto f = gguf::File::open(p);
    EXPECT_TRUE(f->tensors().empty());
    EXPECT_EQ(f->get_string("tokenizer.ggml.model"), c.model);
    EXPECT_EQ(f->get_string_array("tokenizer.ggml.tokens")->size(), c.n_tokens) << c.file;
    EXPECT_EQ(f->get_int_array("tokenizer.ggml.token_type")->size(), c.n_tokens) << c.file;
    if (std::string(c.model) == "gpt2") {
      EXPECT_EQ(f->get_string_array("tokenizer.ggml.merges")->size(), 50000u);
      EXPECT_EQ((*f->get_string_array("tokenizer.ggml.tokens"))[0], "!");
    } else {
      EXPECT_EQ(f->get_float_array("tokenizer.ggml.scores")->size(), c.n_tokens);
      EXPECT_EQ(f->get_bool("tokenizer.ggml.add_bos_token"), true);
      EXPECT_EQ(f->get_bool("tokenizer.ggml.add_eos_token"), false);
    }
  }
}

TEST_F(GgufFiles, CopiesRealVocabulary) {
  std::string p = test_data_dir() + "/ggml-vocab/ggml-vocab-llama-spm.gguf";
  if (!std::filesystem::exists(p)) {
    GTEST_SKIP() << "test data not found: " << p << " (set BACKPROMPT_TEST_DATA)";
  }
  auto src = gguf::File::open(p);
  gguf::Writer w;
  for (const gguf::KeyValue& kv : src->metadata()) w.copy_kv(kv);
  std::string out = path("vocab.gguf");
  w.write(out);
  // No tensors: header, padded to the alignment.
  std::vector<uint8_t> a = read_all(p), b = read_all(out);
  ASSERT_GE(b.size(), a.size());
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size()), 0);
  auto f = gguf::File::open(out);
  EXPECT_EQ(*f->get_string_array("tokenizer.ggml.tokens"), *src->get_string_array("tokenizer.ggml.tokens"));
}
