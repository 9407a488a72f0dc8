// libFuzzer target: the snapshot decoder (src/snapshot_format.cpp) and the K/V codec under it.
// Any backprompt::Error is an accepted outcome; a crash, sanitizer report, leak or timeout is a bug.
// A file that decodes must encode back to the same bytes (f32 without zstd: the encoding is
// canonical there).
// Built and run by tests/fuzz/run_fuzz.sh, which reads the lines below.
// FUZZ_SOURCES: src/snapshot_format.cpp src/store/kv_codec.cpp src/tensor/dtype.cpp src/error.cpp
// FUZZ_LIBS: -lzstd
//
// Compiled with -DFUZZ_MAKE_SEEDS (and without -fsanitize=fuzzer) this file is instead a program
// that writes a few small valid snapshots (every K/V type, with and without zstd) into the
// directory given as its argument: the seed corpus.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "backprompt/error.h"
#include "snapshot_format.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace snap = backprompt::snapshot;

#ifdef FUZZ_MAKE_SEEDS

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  int n_written = 0;
  for (backprompt::DType t : {backprompt::DType::F32, backprompt::DType::F16, backprompt::DType::BF16, backprompt::DType::Q8_0}) {
    for (bool zstd : {false, true}) {
      snap::Snapshot s;
      snap::Header& h = s.header;
      h.model_fingerprint = 0x1234567890abcdefULL;
      h.tokenizer_fingerprint = 0xfedcba0987654321ULL;
      h.n_layer = 2;
      h.n_kv_head = 2;
      h.head_dim = 4;
      h.n_vocab = 16;
      h.codec = {t, zstd};
      h.n_tokens = 3;
      s.tokens = {1, 7, 9};
      s.k.resize(static_cast<size_t>(h.n_layer) * h.n_tokens * h.kv_dim());
      s.v.resize(s.k.size());
      for (size_t i = 0; i < s.k.size(); ++i) {
        s.k[i] = std::sin(0.1f * static_cast<float>(i));
        s.v[i] = std::cos(0.3f * static_cast<float>(i));
      }
      s.logprobs = {NAN, -1.5f, -0.25f};
      s.last_logits.assign(16, 0.5f);
      s.sampler.temperature = 1.0f;
      s.sampler.top_p = 0.9f;
      s.sampler.rng_state = 77;
      s.text = "seed";
      const std::vector<uint8_t> bytes = snap::encode(s);
      const std::string path = dir + "/snapshot_" + backprompt::dtype_name(t) + (zstd ? "_zstd" : "") + ".bps";
      FILE* f = std::fopen(path.c_str(), "wb");
      if (!f || std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size() || std::fclose(f) != 0) {
        std::fprintf(stderr, "cannot write %s\n", path.c_str());
        return 1;
      }
      ++n_written;
    }
  }
  std::printf("wrote %d seeds to %s\n", n_written, dir.c_str());
  return 0;
}

#else

namespace {

// Rewrites each section's checksum to match its payload, following the length fields as far as
// they stay inside the input, so that mutations reach the checks behind the checksums.
std::vector<uint8_t> with_checksums_fixed(std::span<const uint8_t> in) {
  std::vector<uint8_t> out(in.begin(), in.end());
  size_t at = snap::PREAMBLE_BYTES;
  while (at + snap::SECTION_HEADER_BYTES <= out.size()) {
    uint64_t length;
    std::memcpy(&length, out.data() + at + 8, sizeof length);
    const size_t payload = at + snap::SECTION_HEADER_BYTES;
    if (length > out.size() - payload) break;
    const uint64_t sum = XXH3_64bits(out.data() + payload, length);
    std::memcpy(out.data() + at + 16, &sum, sizeof sum);
    at = payload + length;
  }
  return out;
}

void decode_all(std::span<const uint8_t> bytes) {
  try {
    const snap::Header h = snap::decode_header(bytes, "fuzz");
    volatile uint64_t sink = h.n_tokens + static_cast<uint64_t>(h.kv_dim());
    (void)sink;
  } catch (const backprompt::Error&) {
  }
  try {
    snap::Header h;
    const std::vector<snap::SectionInfo> sections = snap::scan(bytes, "fuzz", &h);
    for (const snap::SectionInfo& s : sections)
      if (s.kind == snap::SectionKind::SAMPLER) (void)snap::decode_sampler(bytes, s, "fuzz");
  } catch (const backprompt::Error&) {
  }
  try {
    const snap::Snapshot s = snap::decode(bytes, "fuzz", uint64_t(1) << 22);
    if (s.header.codec.type == backprompt::DType::F32 && !s.header.codec.zstd) {
      const std::vector<uint8_t> again = snap::encode(s);
      if (again.size() != bytes.size() || !std::equal(again.begin(), again.end(), bytes.begin())) {
        std::fprintf(stderr, "fuzz_snapshot: a decoded f32 snapshot did not encode back to its bytes\n");
        std::abort();
      }
    }
  } catch (const backprompt::Error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const uint8_t> bytes(data, size);
  decode_all(bytes);
  decode_all(with_checksums_fixed(bytes));
  return 0;
}

#endif
