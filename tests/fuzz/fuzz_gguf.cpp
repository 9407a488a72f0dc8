// libFuzzer target: GGUF header parsing and every accessor on whatever parses.
// Any backprompt::Error is an accepted outcome; a crash, sanitizer report, leak or timeout is a bug.
// Built and run by tests/fuzz/run_fuzz.sh, which reads the two lines below.
// FUZZ_SOURCES: src/gguf/gguf.cpp src/gguf/gguf_writer.cpp src/tensor/big_alloc.cpp src/tensor/dtype.cpp src/error.cpp
// FUZZ_SEED_FILES: *.gguf
//
// Compiled with -DFUZZ_MAKE_SEEDS (and without -fsanitize=fuzzer) this file is instead a program
// that writes a few small valid GGUF files into the directory given as its argument: the seed corpus.
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "backprompt/error.h"
#include "gguf/gguf.h"

namespace gguf = backprompt::gguf;

namespace {

void touch_metadata(const gguf::File& f, const gguf::KeyValue& kv) {
  volatile size_t sink = 0;
  try { if (auto v = f.get_int(kv.key)) sink = sink + size_t(*v); } catch (const backprompt::Error&) {}
  try { if (auto v = f.get_float(kv.key)) sink = sink + size_t(*v != 0); } catch (const backprompt::Error&) {}
  try { if (auto v = f.get_bool(kv.key)) sink = sink + *v; } catch (const backprompt::Error&) {}
  try { if (auto v = f.get_string(kv.key)) sink = sink + v->size() + (v->empty() ? 0 : uint8_t(v->back())); } catch (const backprompt::Error&) {}
  try {
    if (auto v = f.get_string_array(kv.key))
      for (std::string_view s : *v) sink = sink + s.size() + (s.empty() ? 0 : uint8_t(s.front()) + uint8_t(s.back()));
  } catch (const backprompt::Error&) {}
  try {
    if (auto v = f.get_float_array(kv.key)) sink = sink + v->size();
  } catch (const backprompt::Error&) {}
  try {
    if (auto v = f.get_int_array(kv.key)) sink = sink + v->size();
  } catch (const backprompt::Error&) {}
  if (f.find(kv.key) != &kv) __builtin_trap();
  // raw/raw_size must lie inside the image.
  const uint8_t* begin = f.bytes().data();
  if (kv.raw < begin || kv.raw + kv.raw_size > begin + f.bytes().size()) __builtin_trap();
  if (kv.raw_size > 0) sink = sink + kv.raw[0] + kv.raw[kv.raw_size - 1];
}

void touch_tensor(const gguf::File& f, const gguf::TensorInfo& t) {
  const uint8_t* begin = f.bytes().data();
  const uint8_t* end = begin + f.bytes().size();
  if (f.find_tensor(t.name) != &t) __builtin_trap();
  if (t.n_bytes == 0 || t.data < begin || t.data + t.n_bytes > end) __builtin_trap();
  if (t.ne.empty() || t.ne.size() > 4 || t.n_elements() <= 0) __builtin_trap();
  int64_t rows = t.n_elements() / t.ne[0];
  if (backprompt::dtype_row_bytes(t.type, t.ne[0]) * size_t(rows) != t.n_bytes) __builtin_trap();
  // Decode the first and the last row: reads exactly the tensor's first and last bytes.
  std::vector<float> row(static_cast<size_t>(t.ne[0]));  // [ne[0]]
  size_t row_bytes = backprompt::dtype_row_bytes(t.type, t.ne[0]);
  backprompt::dequantize_row(t.type, t.data, row.data(), t.ne[0]);
  backprompt::dequantize_row(t.type, t.data + t.n_bytes - row_bytes, row.data(), t.ne[0]);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::unique_ptr<gguf::File> f;
  try {
    f = gguf::File::from_memory({data, size}, "fuzz.gguf");
  } catch (const backprompt::Error&) {
    return 0;
  }
  if (f->alignment() == 0 || (f->alignment() & (f->alignment() - 1)) != 0) __builtin_trap();
  for (const gguf::KeyValue& kv : f->metadata()) touch_metadata(*f, kv);
  for (const gguf::TensorInfo& t : f->tensors()) touch_tensor(*f, t);
  (void)f->find("general.architecture");
  (void)f->find_tensor("token_embd.weight");
  return 0;
}

#ifdef FUZZ_MAKE_SEEDS
#include <cstdio>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
    return 2;
  }
  std::string dir = argv[1];
  using backprompt::DType;
  auto pattern = [](std::span<uint8_t> d) {
    for (size_t i = 0; i < d.size(); ++i) d[i] = uint8_t(i * 37 + 11);
  };
  {  // every setter and every tensor type
    gguf::Writer w;
    w.set_string("general.architecture", "llama");
    w.set_u32("llama.block_count", 2);
    w.set_i32("test.i32", -5);
    w.set_u64("test.u64", 1ull << 40);
    w.set_f32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
    w.set_bool("tokenizer.ggml.add_bos_token", true);
    w.set_string_array("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>", "a", "b"});
    w.set_f32_array("tokenizer.ggml.scores", {0, 0, 0, -1, -2});
    w.set_i32_array("tokenizer.ggml.token_type", {2, 3, 3, 1, 1});
    w.add_tensor("token_embd.weight", DType::F32, {4, 5}, pattern);
    w.add_tensor("blk.0.attn_q.weight", DType::F16, {2, 2}, pattern);
    w.add_tensor("blk.0.ffn_up.weight", DType::BF16, {3, 1, 2}, pattern);
    w.add_tensor("output.weight", DType::Q8_0, {32, 2}, pattern);
    w.write(dir + "/seed_all_types.gguf");
  }
  {  // a larger alignment, four dimensions
    gguf::Writer w;
    w.set_u32("general.alignment", 64);
    w.add_tensor("t", DType::F32, {1, 2, 1, 3}, pattern);
    w.add_tensor("q", DType::Q8_0, {32}, pattern);
    w.write(dir + "/seed_align64.gguf");
  }
  {  // metadata only, like the ggml-vocab files
    gguf::Writer w;
    w.set_string("tokenizer.ggml.model", "gpt2");
    w.set_string_array("tokenizer.ggml.merges", {"a b", "ab c"});
    w.set_string_array("tokenizer.ggml.tokens", {"a", "b", "c", "ab", "abc"});
    w.write(dir + "/seed_vocab_only.gguf");
  }
  return 0;
}
#endif
