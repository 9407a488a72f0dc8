// Snapshot files: encoding and validating decoding (layout in snapshot_format.h).
#include "snapshot_format.h"

#define XXH_INLINE_ALL  // header-only: the fuzzer builds this file without the xxhash library
#include <xxhash.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

#include "backprompt/error.h"

namespace backprompt::snapshot {

static_assert(std::endian::native == std::endian::little, "snapshot files are little-endian; so is this code");

namespace {

constexpr size_t HEAD_BYTES = 48;
constexpr size_t SAMPLER_BYTES = 32;
constexpr uint32_t FLAG_ZSTD = 1;

// Bounds on the header's numbers: far above any real model, low enough that products of them
// cannot overflow 64 bits.
constexpr int32_t MAX_LAYERS = 1 << 12;
constexpr int32_t MAX_KV_HEADS = 1 << 12;
constexpr int32_t MAX_HEAD_DIM = 1 << 14;
constexpr int32_t MAX_VOCAB = 1 << 26;
constexpr uint64_t MAX_TOKENS = uint64_t(1) << 31;

// ---------------------------------------------------------------------------------------------
// Writing

template <class T> void put(std::vector<uint8_t>& out, T value) {
  const size_t at = out.size();
  out.resize(at + sizeof(T));
  std::memcpy(out.data() + at, &value, sizeof(T));
}

template <class T> void put_array(std::vector<uint8_t>& out, std::span<const T> values) {
  const size_t at = out.size();
  out.resize(at + values.size_bytes());
  if (!values.empty()) std::memcpy(out.data() + at, values.data(), values.size_bytes());
}

void emit_section(const Sink& sink, SectionKind kind, uint32_t index, const std::vector<uint8_t>& payload) {
  std::vector<uint8_t> h;  // [24]
  put<uint32_t>(h, static_cast<uint32_t>(kind));
  put<uint32_t>(h, index);
  put<uint64_t>(h, payload.size());
  put<uint64_t>(h, XXH3_64bits(payload.data(), payload.size()));
  sink(h);
  sink(payload);
}

// ---------------------------------------------------------------------------------------------
// Reading

[[noreturn]] void corrupt(const std::string& file, const std::string& what) {
  throw Error(ErrorCode::CORRUPT_FILE, "snapshot " + file + ": " + what);
}

template <class T> T get(std::span<const uint8_t> bytes, size_t at) {
  BP_ASSERT(at + sizeof(T) <= bytes.size());
  T value;
  std::memcpy(&value, bytes.data() + at, sizeof(T));
  return value;
}

uint32_t check_preamble(std::span<const uint8_t> bytes, const std::string& file) {
  if (bytes.size() < sizeof(MAGIC) || std::memcmp(bytes.data(), MAGIC, sizeof(MAGIC)) != 0)
    corrupt(file, "preamble: not a backprompt snapshot (bad magic at offset 0)");
  if (bytes.size() < PREAMBLE_BYTES) corrupt(file, "preamble: the file ends at offset " + std::to_string(bytes.size()));
  const uint32_t version = get<uint32_t>(bytes, 8);
  if (version == 0) corrupt(file, "preamble: format version 0 at offset 8");
  if (version > FORMAT_VERSION)
    throw Error(ErrorCode::UNSUPPORTED, "snapshot " + file + ": format version " + std::to_string(version) +
                                            " is newer than this build reads (" + std::to_string(FORMAT_VERSION) + ")");
  return version;
}

// Reads the header of the section expected at `at` and checks its kind, length and checksum.
SectionInfo read_section(std::span<const uint8_t> bytes, size_t at, SectionKind kind, uint32_t index,
                         const std::string& file) {
  const std::string name = section_name(kind, index);
  if (bytes.size() - at < SECTION_HEADER_BYTES)
    corrupt(file, name + ": the file ends at offset " + std::to_string(bytes.size()) + ", inside or before its header");
  SectionInfo s;
  s.kind = static_cast<SectionKind>(get<uint32_t>(bytes, at));
  s.index = get<uint32_t>(bytes, at + 4);
  s.offset = at;
  s.length = get<uint64_t>(bytes, at + 8);
  s.checksum = get<uint64_t>(bytes, at + 16);
  if (s.kind != kind || s.index != index)
    corrupt(file, name + ": expected at offset " + std::to_string(at) + ", found section kind " +
                      std::to_string(static_cast<uint32_t>(s.kind)) + " index " + std::to_string(s.index));
  const size_t payload = at + SECTION_HEADER_BYTES;
  if (s.length > bytes.size() - payload)
    corrupt(file, name + ": length " + std::to_string(s.length) + " at offset " + std::to_string(at + 8) +
                      " runs past the end of the file (" + std::to_string(bytes.size()) + " bytes)");
  if (XXH3_64bits(bytes.data() + payload, s.length) != s.checksum)
    corrupt(file, name + ": checksum mismatch (section at offset " + std::to_string(at) + ")");
  return s;
}

std::span<const uint8_t> payload(std::span<const uint8_t> bytes, const SectionInfo& s) {
  return bytes.subspan(s.offset + SECTION_HEADER_BYTES, s.length);
}

void expect_length(const SectionInfo& s, uint64_t expected, const std::string& file) {
  if (s.length != expected)
    corrupt(file, section_name(s.kind, s.index) + ": " + std::to_string(s.length) + " bytes, expected " +
                      std::to_string(expected) + " (section at offset " + std::to_string(s.offset) + ")");
}

Header parse_head(std::span<const uint8_t> bytes, const SectionInfo& s, uint32_t version, const std::string& file) {
  expect_length(s, HEAD_BYTES, file);
  const std::span<const uint8_t> p = payload(bytes, s);
  Header h;
  h.version = version;
  h.model_fingerprint = get<uint64_t>(p, 0);
  h.tokenizer_fingerprint = get<uint64_t>(p, 8);
  h.n_layer = get<int32_t>(p, 16);
  h.n_kv_head = get<int32_t>(p, 20);
  h.head_dim = get<int32_t>(p, 24);
  h.n_vocab = get<int32_t>(p, 28);
  const uint32_t type = get<uint32_t>(p, 32);
  const uint32_t flags = get<uint32_t>(p, 36);
  h.n_tokens = get<uint64_t>(p, 40);
  auto check = [&](bool ok, const std::string& what) {
    if (!ok) corrupt(file, "head: " + what);
  };
  check(h.n_layer >= 1 && h.n_layer <= MAX_LAYERS, "n_layer " + std::to_string(h.n_layer) + " out of range");
  check(h.n_kv_head >= 1 && h.n_kv_head <= MAX_KV_HEADS, "n_kv_head " + std::to_string(h.n_kv_head) + " out of range");
  check(h.head_dim >= 1 && h.head_dim <= MAX_HEAD_DIM, "head_dim " + std::to_string(h.head_dim) + " out of range");
  check(h.n_vocab >= 1 && h.n_vocab <= MAX_VOCAB, "n_vocab " + std::to_string(h.n_vocab) + " out of range");
  check(dtype_is_supported(type), "unknown K/V type " + std::to_string(type));
  check((flags & ~FLAG_ZSTD) == 0, "unknown flags " + std::to_string(flags));
  check(h.n_tokens >= 1 && h.n_tokens <= MAX_TOKENS, "n_tokens " + std::to_string(h.n_tokens) + " out of range");
  h.codec.type = static_cast<DType>(type);
  h.codec.zstd = (flags & FLAG_ZSTD) != 0;
  return h;
}

// The sections expected after HEAD, in order.
std::vector<std::pair<SectionKind, uint32_t>> body_sections(const Header& h) {
  std::vector<std::pair<SectionKind, uint32_t>> out = {{SectionKind::TOKENS, 0}};
  for (int32_t l = 0; l < h.n_layer; ++l) {
    out.push_back({SectionKind::KEYS, static_cast<uint32_t>(l)});
    out.push_back({SectionKind::VALUES, static_cast<uint32_t>(l)});
  }
  for (SectionKind k : {SectionKind::LOGPROBS, SectionKind::LOGITS, SectionKind::SAMPLER, SectionKind::TEXT})
    out.push_back({k, 0});
  return out;
}

size_t raw_kv_bytes(DType t, uint64_t n) {
  const uint64_t block = static_cast<uint64_t>(dtype_block_size(t));
  return (n + block - 1) / block * dtype_block_bytes(t);
}

}  // namespace

std::string section_name(SectionKind kind, uint32_t index) {
  switch (kind) {
    case SectionKind::HEAD: return "head";
    case SectionKind::TOKENS: return "tokens";
    case SectionKind::KEYS: return "keys of layer " + std::to_string(index);
    case SectionKind::VALUES: return "values of layer " + std::to_string(index);
    case SectionKind::LOGPROBS: return "logprobs";
    case SectionKind::LOGITS: return "logits";
    case SectionKind::SAMPLER: return "sampler";
    case SectionKind::TEXT: return "text";
  }
  return "section kind " + std::to_string(static_cast<uint32_t>(kind));
}

// ---------------------------------------------------------------------------------------------
// Encoding

void encode(const EncodeInput& in, const Sink& sink) {
  BP_ASSERT(in.header != nullptr);
  const Header& h = *in.header;
  const int64_t kv = h.kv_dim();
  const uint64_t n = h.n_tokens;
  BP_ASSERT(in.tokens.size() == n && in.logprobs.size() == n);
  BP_ASSERT(in.last_logits.size() == static_cast<size_t>(h.n_vocab));
  int64_t n_chunked = 0;
  for (const KvChunk& c : in.kv) {
    BP_ASSERT(c.n_tokens >= 0 && c.layer_stride >= c.n_tokens * kv);
    n_chunked += c.n_tokens;
  }
  BP_ASSERT(n_chunked == static_cast<int64_t>(n));

  std::vector<uint8_t> pre;  // [16]
  put_array<uint8_t>(pre, MAGIC);
  put<uint32_t>(pre, FORMAT_VERSION);
  put<uint32_t>(pre, static_cast<uint32_t>(6 + 2 * h.n_layer));
  sink(pre);

  std::vector<uint8_t> p;
  put<uint64_t>(p, h.model_fingerprint);
  put<uint64_t>(p, h.tokenizer_fingerprint);
  put<int32_t>(p, h.n_layer);
  put<int32_t>(p, h.n_kv_head);
  put<int32_t>(p, h.head_dim);
  put<int32_t>(p, h.n_vocab);
  put<uint32_t>(p, static_cast<uint32_t>(h.codec.type));
  put<uint32_t>(p, h.codec.zstd ? FLAG_ZSTD : 0);
  put<uint64_t>(p, n);
  emit_section(sink, SectionKind::HEAD, 0, p);

  p.clear();
  put_array<int32_t>(p, in.tokens);
  emit_section(sink, SectionKind::TOKENS, 0, p);

  // One layer's K (or V) must be contiguous for the codec: used in place when it is one chunk,
  // else gathered into `rows` (reused from layer to layer).
  std::vector<float> rows;  // [n][kv_dim]
  if (in.kv.size() > 1) rows.resize(static_cast<size_t>(n * kv));
  for (int32_t l = 0; l < h.n_layer; ++l) {
    for (SectionKind kind : {SectionKind::KEYS, SectionKind::VALUES}) {
      const bool keys = kind == SectionKind::KEYS;
      const float* src = rows.data();
      if (in.kv.size() == 1) {
        src = (keys ? in.kv[0].k : in.kv[0].v) + l * in.kv[0].layer_stride;
      } else {
        int64_t at = 0;
        for (const KvChunk& c : in.kv) {
          const float* from = (keys ? c.k : c.v) + l * c.layer_stride;
          std::copy(from, from + c.n_tokens * kv, rows.begin() + at * kv);
          at += c.n_tokens;
        }
      }
      p.clear();
      kv_encode(h.codec, std::span<const float>(src, static_cast<size_t>(n * kv)), p);
      emit_section(sink, kind, static_cast<uint32_t>(l), p);
    }
  }

  p.clear();
  put_array<float>(p, in.logprobs);
  emit_section(sink, SectionKind::LOGPROBS, 0, p);
  p.clear();
  put_array<float>(p, in.last_logits);
  emit_section(sink, SectionKind::LOGITS, 0, p);

  p.clear();
  put<float>(p, in.sampler.temperature);
  put<int32_t>(p, in.sampler.top_k);
  put<float>(p, in.sampler.top_p);
  put<uint32_t>(p, 0);
  put<uint64_t>(p, in.sampler.seed);
  put<uint64_t>(p, in.sampler.rng_state);
  emit_section(sink, SectionKind::SAMPLER, 0, p);

  p.assign(in.text.begin(), in.text.end());
  emit_section(sink, SectionKind::TEXT, 0, p);
}

std::vector<uint8_t> encode(const Snapshot& s) {
  EncodeInput in;
  in.header = &s.header;
  in.tokens = s.tokens;
  const int64_t n = static_cast<int64_t>(s.header.n_tokens);
  in.kv.push_back({s.k.data(), s.v.data(), n, n * s.header.kv_dim()});
  in.logprobs = s.logprobs;
  in.last_logits = s.last_logits;
  in.sampler = s.sampler;
  in.text = s.text;
  std::vector<uint8_t> out;
  encode(in, [&](std::span<const uint8_t> b) { out.insert(out.end(), b.begin(), b.end()); });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Decoding

Header decode_header(std::span<const uint8_t> bytes, const std::string& file) {
  const uint32_t version = check_preamble(bytes, file);
  const SectionInfo head = read_section(bytes, PREAMBLE_BYTES, SectionKind::HEAD, 0, file);
  return parse_head(bytes, head, version, file);
}

std::vector<SectionInfo> scan(std::span<const uint8_t> bytes, const std::string& file, Header* header) {
  const uint32_t version = check_preamble(bytes, file);
  const uint32_t n_sections = get<uint32_t>(bytes, 12);
  std::vector<SectionInfo> out;
  out.push_back(read_section(bytes, PREAMBLE_BYTES, SectionKind::HEAD, 0, file));
  const Header h = parse_head(bytes, out[0], version, file);
  const auto expected = body_sections(h);
  if (n_sections != expected.size() + 1)
    corrupt(file, "preamble: " + std::to_string(n_sections) + " sections at offset 12, expected " +
                      std::to_string(expected.size() + 1) + " for " + std::to_string(h.n_layer) + " layers");
  size_t at = PREAMBLE_BYTES + SECTION_HEADER_BYTES + out[0].length;
  for (const auto& [kind, index] : expected) {
    out.push_back(read_section(bytes, at, kind, index, file));
    at += SECTION_HEADER_BYTES + out.back().length;
  }
  if (at != bytes.size())
    corrupt(file, "end of file: " + std::to_string(bytes.size() - at) + " bytes after the last section (offset " +
                      std::to_string(at) + ")");
  if (header) *header = h;
  return out;
}

SamplingParams decode_sampler(std::span<const uint8_t> bytes, const SectionInfo& s, const std::string& file) {
  BP_ASSERT(s.kind == SectionKind::SAMPLER);
  expect_length(s, SAMPLER_BYTES, file);
  const std::span<const uint8_t> p = payload(bytes, s);
  SamplingParams sp;
  sp.temperature = get<float>(p, 0);
  sp.top_k = get<int32_t>(p, 4);
  sp.top_p = get<float>(p, 8);
  const uint32_t zero = get<uint32_t>(p, 12);
  sp.seed = get<uint64_t>(p, 16);
  sp.rng_state = get<uint64_t>(p, 24);
  if (!(sp.temperature >= 0.0f) || std::isinf(sp.temperature) || sp.top_k < 0 || !(sp.top_p > 0.0f) || zero != 0)
    corrupt(file, "sampler: invalid sampling parameters");
  return sp;
}

Snapshot decode(std::span<const uint8_t> bytes, const std::string& file, uint64_t max_kv_values, bool with_kv) {
  Snapshot s;
  s.sections = scan(bytes, file, &s.header);
  const std::vector<SectionInfo>& sections = s.sections;
  const Header& h = s.header;
  const uint64_t n = h.n_tokens;
  const uint64_t per_layer = n * static_cast<uint64_t>(h.kv_dim());  // values of K (or V) of one layer

  // Sizes first, so nothing is allocated for a file that cannot be right.
  size_t i = 1;
  const SectionInfo& tokens = sections[i++];
  expect_length(tokens, n * sizeof(int32_t), file);
  if (per_layer > max_kv_values / 2 / static_cast<uint64_t>(h.n_layer))
    corrupt(file, "head: " + std::to_string(n) + " tokens of K/V need more than the " + std::to_string(max_kv_values) +
                      " values this decoder accepts");
  for (int32_t l = 0; l < 2 * h.n_layer; ++l) {
    const SectionInfo& kv = sections[i++];
    if (!h.codec.zstd) expect_length(kv, raw_kv_bytes(h.codec.type, per_layer), file);
  }
  const SectionInfo& logprobs = sections[i++];
  const SectionInfo& logits = sections[i++];
  const SectionInfo& sampler = sections[i++];
  const SectionInfo& text = sections[i++];
  expect_length(logprobs, n * sizeof(float), file);
  expect_length(logits, static_cast<uint64_t>(h.n_vocab) * sizeof(float), file);

  s.tokens.resize(n);
  std::memcpy(s.tokens.data(), payload(bytes, tokens).data(), tokens.length);
  for (uint64_t t = 0; t < n; ++t)
    if (s.tokens[t] < 0 || s.tokens[t] >= h.n_vocab)
      corrupt(file, "tokens: token " + std::to_string(t) + " is " + std::to_string(s.tokens[t]) + ", outside the vocabulary (" +
                        std::to_string(h.n_vocab) + ")");

  if (with_kv) {
    s.k.resize(per_layer * static_cast<uint64_t>(h.n_layer));
    s.v.resize(s.k.size());
    decode_kv(bytes, file, s, s.k.data(), s.v.data());
  }

  s.logprobs.resize(n);
  std::memcpy(s.logprobs.data(), payload(bytes, logprobs).data(), logprobs.length);
  s.last_logits.resize(static_cast<size_t>(h.n_vocab));
  std::memcpy(s.last_logits.data(), payload(bytes, logits).data(), logits.length);
  s.sampler = decode_sampler(bytes, sampler, file);
  const std::span<const uint8_t> t = payload(bytes, text);
  s.text.assign(t.begin(), t.end());
  return s;
}

void decode_kv(std::span<const uint8_t> bytes, const std::string& file, const Snapshot& s, float* k, float* v) {
  const Header& h = s.header;
  const uint64_t per_layer = h.n_tokens * static_cast<uint64_t>(h.kv_dim());
  BP_ASSERT(s.sections.size() == static_cast<size_t>(6 + 2 * h.n_layer));
  size_t i = 2;  // after HEAD and TOKENS
  for (int32_t l = 0; l < h.n_layer; ++l) {
    for (float* dst : {k, v}) {
      const SectionInfo& sec = s.sections[i++];
      const std::string what = "snapshot " + file + ": " + section_name(sec.kind, sec.index);
      kv_decode(h.codec, payload(bytes, sec), std::span<float>(dst + l * per_layer, per_layer), what.c_str());
    }
  }
}

bool kv_in_place(std::span<const uint8_t> bytes, const Header& h, KvInPlace* out) {
  if (h.codec.type != DType::F32 || h.codec.zstd) return false;
  const uint64_t len = h.n_tokens * static_cast<uint64_t>(h.kv_dim()) * sizeof(float);  // one section's payload
  const uint64_t k0 = PREAMBLE_BYTES + SECTION_HEADER_BYTES + HEAD_BYTES + SECTION_HEADER_BYTES +
                      h.n_tokens * sizeof(int32_t) + SECTION_HEADER_BYTES;
  const uint64_t stride = 2 * (SECTION_HEADER_BYTES + len);  // bytes from one layer's K to the next
  BP_ASSERT(k0 + (static_cast<uint64_t>(h.n_layer) - 1) * stride + SECTION_HEADER_BYTES + 2 * len <= bytes.size());
  const uint8_t* k = bytes.data() + k0;
  if (reinterpret_cast<uintptr_t>(k) % alignof(float) != 0 || stride % sizeof(float) != 0) return false;
  out->k = reinterpret_cast<const float*>(k);
  out->v = reinterpret_cast<const float*>(k + SECTION_HEADER_BYTES + len);
  out->layer_stride = static_cast<int64_t>(stride / sizeof(float));
  return true;
}

}  // namespace backprompt::snapshot
