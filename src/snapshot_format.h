// The snapshot file format: encoder and validating decoder, independent of Cache and Model so
// that tests and the fuzzer can work on bytes.
//
// Layout (little-endian):
//   preamble  magic "bp-snap\n" (8 bytes), u32 version (1), u32 n_sections
//   sections  each: u32 kind, u32 index, u64 length, u64 XXH3-64 of the payload, payload
//             in this order (the index is the layer for KEYS/VALUES, else 0):
//     HEAD      u64 model fingerprint, u64 tokenizer fingerprint, i32 n_layer, i32 n_kv_head,
//               i32 head_dim, i32 n_vocab, u32 K/V type (GGUF type id), u32 flags (bit 0: zstd),
//               u64 n_tokens                                                        (48 bytes)
//     TOKENS    i32 [n_tokens]
//     KEYS l    K of layer l, [n_tokens][n_kv_head * head_dim] through kv_codec    (l = 0..n_layer-1,
//     VALUES l  V of layer l, likewise                                              interleaved)
//     LOGPROBS  f32 [n_tokens]: log p(token_i | before), NaN where unknown (always at 0)
//     LOGITS    f32 [n_vocab]: the logits after the last token
//     SAMPLER   f32 temperature, i32 top_k, f32 top_p, u32 zero, u64 seed, u64 rng_state (32 bytes)
//     TEXT      the text's string (bytes)
//   nothing after the last section.
//
// Goals: every byte is covered by a check (magic, version, section kinds and lengths, checksums,
// value ranges), so a damaged file is an error naming its section, never a crash or a wrong
// state. Non-goals: mmap-able alignment (K/V are converted on load anyway), random access.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "backprompt/sampling.h"
#include "store/kv_codec.h"

namespace backprompt::snapshot {

constexpr uint8_t MAGIC[8] = {'b', 'p', '-', 's', 'n', 'a', 'p', '\n'};
constexpr uint32_t FORMAT_VERSION = 1;
constexpr size_t PREAMBLE_BYTES = 16;
constexpr size_t SECTION_HEADER_BYTES = 24;

enum class SectionKind : uint32_t {
  HEAD = 1,
  TOKENS = 2,
  KEYS = 3,
  VALUES = 4,
  LOGPROBS = 5,
  LOGITS = 6,
  SAMPLER = 7,
  TEXT = 8,
};

struct Header {
  uint32_t version = FORMAT_VERSION;
  uint64_t model_fingerprint = 0;
  uint64_t tokenizer_fingerprint = 0;
  int32_t n_layer = 0;
  int32_t n_kv_head = 0;
  int32_t head_dim = 0;
  int32_t n_vocab = 0;
  KvCodec codec;
  uint64_t n_tokens = 0;
  int64_t kv_dim() const { return static_cast<int64_t>(n_kv_head) * head_dim; }
};

// Where a section lies in a file.
struct SectionInfo {
  SectionKind kind;
  uint32_t index = 0;
  uint64_t offset = 0;  // of the section header
  uint64_t length = 0;  // of the payload
  uint64_t checksum = 0;
};

// One whole snapshot in memory.
struct Snapshot {
  Header header;
  std::vector<int32_t> tokens;     // [n_tokens]
  std::vector<float> k, v;         // [n_layer][n_tokens][kv_dim]
  std::vector<float> logprobs;     // [n_tokens] NaN where unknown
  std::vector<float> last_logits;  // [n_vocab]
  SamplingParams sampler;
  std::string text;
  std::vector<SectionInfo> sections;  // where each section lies in the decoded bytes
};

std::string section_name(SectionKind kind, uint32_t index);  // "head", "keys of layer 3", ...

// Writes the snapshot as a sequence of byte runs to `sink` (one section at a time, so the whole
// file is never held in memory). The K/V come in chunks of consecutive positions (e.g. the nodes
// of a path), each laid out like a KvSpanView: rows of kv_dim floats, layer l at
// k + l * layer_stride. Checks the sizes with BP_ASSERT.
using Sink = std::function<void(std::span<const uint8_t>)>;
struct KvChunk {
  const float* k = nullptr;  // [n_layer][layer_stride / kv_dim][kv_dim], first n_tokens rows used
  const float* v = nullptr;
  int64_t n_tokens = 0;
  int64_t layer_stride = 0;  // floats
};
struct EncodeInput {
  const Header* header = nullptr;
  std::span<const int32_t> tokens;      // [n_tokens]
  std::vector<KvChunk> kv;              // covering the n_tokens positions in order
  std::span<const float> logprobs;      // [n_tokens]
  std::span<const float> last_logits;   // [n_vocab]
  SamplingParams sampler;
  std::string_view text;
};
void encode(const EncodeInput& in, const Sink& sink);
std::vector<uint8_t> encode(const Snapshot& s);  // the whole file in memory (tests, fuzzer seeds)

// Decoding. `file` names the source in messages. Every failure is Error(CORRUPT_FILE) naming the
// section and offset (Error(UNSUPPORTED) for a newer format version).
//
// The preamble and HEAD only (cheap; checks HEAD's checksum).
Header decode_header(std::span<const uint8_t> bytes, const std::string& file);
// Every section's framing and checksum, and the header; nothing decoded beyond HEAD.
std::vector<SectionInfo> scan(std::span<const uint8_t> bytes, const std::string& file, Header* header = nullptr);
// Everything, validated. `max_kv_values` bounds the K/V decoded (zstd can expand a small file
// a lot): a file that needs more is CORRUPT_FILE. With with_kv false, the K/V sections are
// validated (framing, checksums, sizes) but `k` and `v` are left empty: see decode_kv() and
// kv_in_place().
Snapshot decode(std::span<const uint8_t> bytes, const std::string& file, uint64_t max_kv_values = uint64_t(1) << 36,
                bool with_kv = true);
// Decodes the K/V of a file that decode() accepted (`s` is its result) into k and v, each
// [n_layer][n_tokens][kv_dim] floats.
void decode_kv(std::span<const uint8_t> bytes, const std::string& file, const Snapshot& s, float* k, float* v);
// Raw f32 K/V need no decoding: in a file that decode() accepted, they lie at a fixed stride
// (KEYS and VALUES sections of equal length alternate), so the bytes can be read in place.
// Returns false (nothing set) for other storage types, or if `bytes` is not 4-byte aligned.
struct KvInPlace {
  const float* k = nullptr;  // K of layer l at k + l * layer_stride: [n_tokens][kv_dim]
  const float* v = nullptr;
  int64_t layer_stride = 0;  // floats
};
bool kv_in_place(std::span<const uint8_t> bytes, const Header& header, KvInPlace* out);
// Just the SAMPLER section's payload of a scanned file.
SamplingParams decode_sampler(std::span<const uint8_t> bytes, const SectionInfo& section, const std::string& file);

}  // namespace backprompt::snapshot
