// libFuzzer target: store block decoding (decode_block) under every K/V codec, and describe_block.
// Any backprompt::Error is an accepted outcome; a crash, sanitizer report, leak or timeout is a bug.
// Built and run by tests/fuzz/run_fuzz.sh, which reads the lines below.
// FUZZ_SOURCES: src/store/block.cpp src/store/kv_codec.cpp src/tensor/dtype.cpp src/error.cpp
// FUZZ_LIBS: -lzstd
//
// Compiled with -DFUZZ_MAKE_SEEDS (and without -fsanitize=fuzzer) this file is instead a program
// that writes small valid blocks (every codec; with and without outputs) into the directory given
// as its argument: the seed corpus.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "backprompt/error.h"
#include "store/block.h"

namespace bp = backprompt;

namespace {

const bp::KvCodec CODECS[] = {{bp::DType::F32, false}, {bp::DType::F32, true},  {bp::DType::F16, false},
                              {bp::DType::F16, true},  {bp::DType::BF16, false}, {bp::DType::BF16, true},
                              {bp::DType::Q8_0, false}, {bp::DType::Q8_0, true}};

bp::BlockContext context(const bp::KvCodec& codec) {
  bp::BlockContext ctx;
  ctx.model_fp = 0x0123456789abcdefull;
  ctx.tokenizer_fp = 0x1111222233334444ull;
  ctx.codec = codec;
  ctx.n_layer = 2;
  ctx.kv_dim = 32;
  ctx.n_vocab = 16;
  ctx.block_size = 8;
  return ctx;
}

}  // namespace

#ifndef FUZZ_MAKE_SEEDS

namespace {

// Checksums stop almost every mutation at the first check. A second copy of the input gets
// correct checksums (layout from block.h: section table of (u64 size, u64 hash) at byte 64,
// header hash at byte 144 over the 144 bytes before it), so that the parsing behind them is
// fuzzed too. Sizes that run past the end are left alone.
std::vector<uint8_t> with_fixed_checksums(std::span<const uint8_t> bytes) {
  constexpr size_t TABLE = 64, N_SECTIONS = 5, HEADER = TABLE + N_SECTIONS * 16 + 8;
  std::vector<uint8_t> b(bytes.begin(), bytes.end());
  if (b.size() < HEADER) return b;
  uint64_t at = HEADER;
  for (size_t s = 0; s < N_SECTIONS; ++s) {
    uint64_t n;
    std::memcpy(&n, b.data() + TABLE + s * 16, 8);
    if (n > b.size() - at) break;
    const uint64_t h = XXH3_64bits(b.data() + at, n);
    std::memcpy(b.data() + TABLE + s * 16 + 8, &h, 8);
    at += n;
  }
  const uint64_t h = XXH3_64bits(b.data(), HEADER - 8);
  std::memcpy(b.data() + HEADER - 8, &h, 8);
  return b;
}

size_t decode_all(std::span<const uint8_t> bytes) {
  size_t sink = bp::describe_block(bytes).size() + bp::is_block(bytes);
  for (const bp::KvCodec& codec : CODECS) {
    try {
      const bp::BlockData d = bp::decode_block(context(codec), bytes);
      float acc = 0.0f;
      for (float x : d.k) acc += x;
      for (float x : d.v) acc += x;
      sink += d.tokens.size() + d.logprobs.size() + d.last_logits.size() + size_t(d.pos0) + (acc != 0.0f);
    } catch (const bp::Error&) {
    }
  }
  return sink;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const uint8_t> bytes(data, size);
  volatile size_t sink = decode_all(bytes);
  sink = sink + decode_all(with_fixed_checksums(bytes));
  (void)sink;
  return 0;
}

#else

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s SEED_DIR\n", argv[0]);
    return 2;
  }
  int n_files = 0;
  for (const bp::KvCodec& codec : CODECS) {
    const bp::BlockContext ctx = context(codec);
    for (int n : {0, 3, 8}) {
      bp::BlockData d;
      d.pos0 = 8 * n;
      for (int i = 0; i < n; ++i) d.tokens.push_back(i * 5 + 1);
      for (int i = 0; i < ctx.n_layer * n * ctx.kv_dim; ++i) {
        d.k.push_back(std::sin(0.1f * float(i)));
        d.v.push_back(std::cos(0.2f * float(i)));
      }
      if (n % 2 == 1) d.logprobs.assign(n, -1.5f);
      if (n != 3) d.last_logits.assign(ctx.n_vocab, 0.5f);
      const std::vector<uint8_t> bytes = bp::encode_block(ctx, d);
      const std::string path = std::string(argv[1]) + "/block_" + std::to_string(n_files++) + ".bin";
      FILE* f = std::fopen(path.c_str(), "wb");
      if (!f || std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size()) return 1;
      std::fclose(f);
    }
  }
  return 0;
}

#endif
