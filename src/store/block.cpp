// Store blocks: the key chain (XXH3-128) and the block byte format described in block.h.
#include "store/block.h"

#include <bit>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <limits>

#define XXH_INLINE_ALL  // header-only: the fuzz target links no library
#include <xxhash.h>

#include "backprompt/error.h"

namespace backprompt {

static_assert(std::endian::native == std::endian::little, "block format is little-endian");

namespace {

constexpr char BLOCK_MAGIC[4] = {'B', 'P', 'K', 'V'};
constexpr uint32_t BLOCK_VERSION = 1;
constexpr uint32_t FLAG_LOGPROBS = 1;
constexpr uint32_t FLAG_LAST_LOGITS = 2;
constexpr int N_SECTIONS = 5;
constexpr const char* SECTION_NAMES[N_SECTIONS] = {"tokens", "k", "v", "logprobs", "logits"};
constexpr size_t FIXED_BYTES = 64;                                 // magic .. reserved
constexpr size_t HEADER_BYTES = FIXED_BYTES + N_SECTIONS * 16 + 8;  // + section table + checksum

// Domain tags keep the three kinds of keys apart.
constexpr uint8_t TAG_ROOT = 'R', TAG_BLOCK = 'B', TAG_PATH = 'P';

// The fields of a header, as read (not yet validated against a context).
struct Header {
  uint32_t version = 0;
  uint64_t model_fp = 0, tokenizer_fp = 0;
  uint32_t kv_type = 0, kv_zstd = 0;
  int32_t n_layer = 0, kv_dim = 0, n_vocab = 0, block_size = 0, pos0 = 0, n = 0;
  uint32_t flags = 0, reserved = 0;
  uint64_t section_bytes[N_SECTIONS] = {};
  uint64_t section_hash[N_SECTIONS] = {};
  uint64_t header_hash = 0;
};

template <typename T>
void put(std::vector<uint8_t>& out, T v) {
  const size_t at = out.size();
  out.resize(at + sizeof(T));
  std::memcpy(out.data() + at, &v, sizeof(T));
}

template <typename T>
T get(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

StoreKey key_of(XXH3_state_t* st) {
  const XXH128_hash_t h = XXH3_128bits_digest(st);
  return {h.high64, h.low64};
}

StoreKey hash_after(uint8_t tag, const StoreKey& prev, std::span<const int32_t> tokens) {
  XXH3_state_t st;
  XXH3_INITSTATE(&st);
  XXH3_128bits_reset(&st);
  const uint64_t n = tokens.size();
  XXH3_128bits_update(&st, &tag, 1);
  XXH3_128bits_update(&st, &prev.hi, 8);
  XXH3_128bits_update(&st, &prev.lo, 8);
  XXH3_128bits_update(&st, &n, 8);
  XXH3_128bits_update(&st, tokens.data(), tokens.size_bytes());
  return key_of(&st);
}

// Reads the header; false if there are too few bytes or the magic is wrong. No validation.
bool read_header(std::span<const uint8_t> bytes, Header& h) {
  if (bytes.size() < HEADER_BYTES || std::memcmp(bytes.data(), BLOCK_MAGIC, 4) != 0) return false;
  const uint8_t* p = bytes.data() + 4;
  h.version = get<uint32_t>(p); p += 4;
  h.model_fp = get<uint64_t>(p); p += 8;
  h.tokenizer_fp = get<uint64_t>(p); p += 8;
  h.kv_type = get<uint32_t>(p); p += 4;
  h.kv_zstd = get<uint32_t>(p); p += 4;
  h.n_layer = get<int32_t>(p); p += 4;
  h.kv_dim = get<int32_t>(p); p += 4;
  h.n_vocab = get<int32_t>(p); p += 4;
  h.block_size = get<int32_t>(p); p += 4;
  h.pos0 = get<int32_t>(p); p += 4;
  h.n = get<int32_t>(p); p += 4;
  h.flags = get<uint32_t>(p); p += 4;
  h.reserved = get<uint32_t>(p); p += 4;
  for (int s = 0; s < N_SECTIONS; ++s) {
    h.section_bytes[s] = get<uint64_t>(p); p += 8;
    h.section_hash[s] = get<uint64_t>(p); p += 8;
  }
  h.header_hash = get<uint64_t>(p);
  return true;
}

std::string codec_name(uint32_t type, uint32_t zstd) {
  std::string s = dtype_is_supported(type) ? dtype_name(static_cast<DType>(type)) : "type " + std::to_string(type);
  if (zstd) s += "+zstd";
  return s;
}

[[noreturn]] void corrupt(const std::string& what) { throw Error(ErrorCode::CORRUPT_FILE, "store block: " + what); }

[[noreturn]] void mismatch(const char* field, const std::string& got, const std::string& want) {
  throw Error(ErrorCode::MODEL_MISMATCH,
              std::string("store block: made under another ") + field + " (" + got + ", expected " + want + ")");
}

std::string hex64(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016" PRIx64, v);
  return buf;
}

// Byte offsets of the sections (from the header's sizes); false if they overflow the bytes.
bool section_offsets(const Header& h, size_t n_bytes, size_t offsets[N_SECTIONS + 1]) {
  uint64_t at = HEADER_BYTES;
  for (int s = 0; s < N_SECTIONS; ++s) {
    offsets[s] = at;
    if (h.section_bytes[s] > n_bytes - at) return false;  // at <= n_bytes holds by induction
    at += h.section_bytes[s];
  }
  offsets[N_SECTIONS] = at;
  return true;
}

}  // namespace

std::string StoreKey::hex() const { return hex64(hi) + hex64(lo); }

StoreKey chain_root(const BlockContext& ctx) {
  XXH3_state_t st;
  XXH3_INITSTATE(&st);
  XXH3_128bits_reset(&st);
  const char tag[] = "backprompt kv chain v1";
  const uint32_t fields[] = {static_cast<uint32_t>(ctx.codec.type), ctx.codec.zstd ? 1u : 0u,
                             static_cast<uint32_t>(ctx.n_layer),    static_cast<uint32_t>(ctx.kv_dim),
                             static_cast<uint32_t>(ctx.n_vocab),    static_cast<uint32_t>(ctx.block_size)};
  XXH3_128bits_update(&st, &TAG_ROOT, 1);
  XXH3_128bits_update(&st, tag, sizeof(tag));
  XXH3_128bits_update(&st, &ctx.model_fp, 8);
  XXH3_128bits_update(&st, &ctx.tokenizer_fp, 8);
  XXH3_128bits_update(&st, fields, sizeof(fields));
  return key_of(&st);
}

StoreKey chain_next(const StoreKey& prev, std::span<const int32_t> block_tokens) {
  return hash_after(TAG_BLOCK, prev, block_tokens);
}

StoreKey path_key(const StoreKey& chain, std::span<const int32_t> tail_tokens) {
  return hash_after(TAG_PATH, chain, tail_tokens);
}

std::vector<uint8_t> encode_block(const BlockContext& ctx, const BlockData& data) {
  const size_t n = data.tokens.size();
  const size_t n_kv = static_cast<size_t>(ctx.n_layer) * n * static_cast<size_t>(ctx.kv_dim);
  BP_ASSERT(n <= static_cast<size_t>(std::numeric_limits<int32_t>::max()));
  BP_ASSERT(data.k.size() == n_kv && data.v.size() == n_kv);
  BP_ASSERT(data.logprobs.empty() || data.logprobs.size() == n);
  BP_ASSERT(data.last_logits.empty() || data.last_logits.size() == static_cast<size_t>(ctx.n_vocab));

  // Sections first (into one buffer after a placeholder header), then the header over them.
  std::vector<uint8_t> out(HEADER_BYTES);
  size_t offsets[N_SECTIONS + 1];
  auto append_raw = [&](const void* p, size_t n_bytes) {
    const size_t at = out.size();
    out.resize(at + n_bytes);
    if (n_bytes) std::memcpy(out.data() + at, p, n_bytes);
  };
  offsets[0] = out.size();
  append_raw(data.tokens.data(), n * sizeof(int32_t));
  // No K/V (an exact-path entry with an empty tail): empty sections, whatever the codec.
  offsets[1] = out.size();
  if (n_kv) kv_encode(ctx.codec, data.k, out);
  offsets[2] = out.size();
  if (n_kv) kv_encode(ctx.codec, data.v, out);
  offsets[3] = out.size();
  append_raw(data.logprobs.data(), data.logprobs.size() * sizeof(float));
  offsets[4] = out.size();
  append_raw(data.last_logits.data(), data.last_logits.size() * sizeof(float));
  offsets[5] = out.size();

  uint32_t flags = 0;
  if (!data.logprobs.empty()) flags |= FLAG_LOGPROBS;
  if (!data.last_logits.empty()) flags |= FLAG_LAST_LOGITS;
  std::vector<uint8_t> h;
  h.reserve(HEADER_BYTES);
  h.insert(h.end(), BLOCK_MAGIC, BLOCK_MAGIC + 4);
  put<uint32_t>(h, BLOCK_VERSION);
  put<uint64_t>(h, ctx.model_fp);
  put<uint64_t>(h, ctx.tokenizer_fp);
  put<uint32_t>(h, static_cast<uint32_t>(ctx.codec.type));
  put<uint32_t>(h, ctx.codec.zstd ? 1 : 0);
  put<int32_t>(h, ctx.n_layer);
  put<int32_t>(h, ctx.kv_dim);
  put<int32_t>(h, ctx.n_vocab);
  put<int32_t>(h, ctx.block_size);
  put<int32_t>(h, data.pos0);
  put<int32_t>(h, static_cast<int32_t>(n));
  put<uint32_t>(h, flags);
  put<uint32_t>(h, 0);
  BP_ASSERT(h.size() == FIXED_BYTES);
  for (int s = 0; s < N_SECTIONS; ++s) {
    const size_t n_bytes = offsets[s + 1] - offsets[s];
    put<uint64_t>(h, n_bytes);
    put<uint64_t>(h, XXH3_64bits(out.data() + offsets[s], n_bytes));
  }
  put<uint64_t>(h, XXH3_64bits(h.data(), h.size()));
  BP_ASSERT(h.size() == HEADER_BYTES);
  std::memcpy(out.data(), h.data(), HEADER_BYTES);
  return out;
}

BlockData decode_block(const BlockContext& ctx, std::span<const uint8_t> bytes) {
  Header h;
  if (bytes.size() >= 4 && std::memcmp(bytes.data(), BLOCK_MAGIC, 4) != 0) corrupt("bad magic (not a K/V block)");
  if (!read_header(bytes, h))
    corrupt("truncated header (" + std::to_string(bytes.size()) + " bytes, need " + std::to_string(HEADER_BYTES) + ")");
  if (XXH3_64bits(bytes.data(), HEADER_BYTES - 8) != h.header_hash) corrupt("header checksum mismatch");
  if (h.version != BLOCK_VERSION) corrupt("unsupported format version " + std::to_string(h.version));

  // Which context made it: checked before any size, so that a foreign block says so.
  if (h.model_fp != ctx.model_fp) mismatch("model", hex64(h.model_fp), hex64(ctx.model_fp));
  if (h.tokenizer_fp != ctx.tokenizer_fp) mismatch("tokenizer", hex64(h.tokenizer_fp), hex64(ctx.tokenizer_fp));
  const uint32_t want_zstd = ctx.codec.zstd ? 1 : 0;
  if (h.kv_type != static_cast<uint32_t>(ctx.codec.type) || h.kv_zstd != want_zstd)
    mismatch("K/V storage type", codec_name(h.kv_type, h.kv_zstd),
             codec_name(static_cast<uint32_t>(ctx.codec.type), want_zstd));
  auto check_shape = [](const char* field, int32_t got, int32_t want) {
    if (got != want) mismatch(field, std::to_string(got), std::to_string(want));
  };
  check_shape("n_layer", h.n_layer, ctx.n_layer);
  check_shape("kv_dim", h.kv_dim, ctx.kv_dim);
  check_shape("n_vocab", h.n_vocab, ctx.n_vocab);
  check_shape("block size", h.block_size, ctx.block_size);

  if (h.n < 0 || h.pos0 < 0 || h.pos0 > std::numeric_limits<int32_t>::max() - h.n)
    corrupt("bad positions (pos0 " + std::to_string(h.pos0) + ", n " + std::to_string(h.n) + ")");
  if ((h.flags & ~(FLAG_LOGPROBS | FLAG_LAST_LOGITS)) != 0 || h.reserved != 0) corrupt("unknown flags");
  const uint64_t n = static_cast<uint64_t>(h.n);
  const uint64_t want_bytes[N_SECTIONS] = {n * 4, 0, 0, (h.flags & FLAG_LOGPROBS) ? n * 4 : 0,
                                           (h.flags & FLAG_LAST_LOGITS) ? uint64_t(ctx.n_vocab) * 4 : 0};
  const bool no_kv = uint64_t(ctx.n_layer) * n * uint64_t(ctx.kv_dim) == 0;
  for (int s = 0; s < N_SECTIONS; ++s)
    if ((s == 0 || s >= 3 || no_kv) && h.section_bytes[s] != want_bytes[s])
      corrupt(std::string("section ") + SECTION_NAMES[s] + " has " + std::to_string(h.section_bytes[s]) +
              " bytes, expected " + std::to_string(want_bytes[s]));
  size_t offsets[N_SECTIONS + 1];
  if (!section_offsets(h, bytes.size(), offsets) || offsets[N_SECTIONS] != bytes.size())
    corrupt("size mismatch (" + std::to_string(bytes.size()) + " bytes; truncated or trailing data)");
  for (int s = 0; s < N_SECTIONS; ++s)
    if (XXH3_64bits(bytes.data() + offsets[s], h.section_bytes[s]) != h.section_hash[s])
      corrupt(std::string("section ") + SECTION_NAMES[s] + " checksum mismatch at offset " + std::to_string(offsets[s]));

  // Sizes are now bounded by the input: n tokens take 4n bytes of it.
  BlockData d;
  d.pos0 = h.pos0;
  d.tokens.resize(n);
  if (n) std::memcpy(d.tokens.data(), bytes.data() + offsets[0], n * 4);
  const size_t n_kv = static_cast<size_t>(ctx.n_layer) * n * static_cast<size_t>(ctx.kv_dim);
  d.k.resize(n_kv);
  d.v.resize(n_kv);
  if (!no_kv) {
    kv_decode(ctx.codec, bytes.subspan(offsets[1], h.section_bytes[1]), d.k, "store block section k");
    kv_decode(ctx.codec, bytes.subspan(offsets[2], h.section_bytes[2]), d.v, "store block section v");
  }
  if (h.flags & FLAG_LOGPROBS) {
    d.logprobs.resize(n);
    std::memcpy(d.logprobs.data(), bytes.data() + offsets[3], n * 4);
  }
  if (h.flags & FLAG_LAST_LOGITS) {
    d.last_logits.resize(ctx.n_vocab);
    std::memcpy(d.last_logits.data(), bytes.data() + offsets[4], size_t(ctx.n_vocab) * 4);
  }
  return d;
}

bool is_block(std::span<const uint8_t> bytes) {
  return bytes.size() >= 4 && std::memcmp(bytes.data(), BLOCK_MAGIC, 4) == 0;
}

std::string describe_block(std::span<const uint8_t> bytes) {
  try {
    Header h;
    if (!is_block(bytes)) return "not a backprompt K/V block (bad magic)\n";
    if (!read_header(bytes, h))
      return "backprompt K/V block: truncated header (" + std::to_string(bytes.size()) + " bytes, need " +
             std::to_string(HEADER_BYTES) + ")\n";
    const bool header_ok = XXH3_64bits(bytes.data(), HEADER_BYTES - 8) == h.header_hash;
    std::string s;
    s += "format:        backprompt K/V block, version " + std::to_string(h.version) + "\n";
    s += "header:        " + std::string(header_ok ? "checksum ok" : "CHECKSUM MISMATCH") + "\n";
    s += "model fp:      " + hex64(h.model_fp) + "\n";
    s += "tokenizer fp:  " + hex64(h.tokenizer_fp) + "\n";
    s += "kv storage:    " + codec_name(h.kv_type, h.kv_zstd) + "\n";
    s += "shape:         n_layer " + std::to_string(h.n_layer) + ", kv_dim " + std::to_string(h.kv_dim) +
         ", n_vocab " + std::to_string(h.n_vocab) + ", block size " + std::to_string(h.block_size) + "\n";
    s += "tokens:        " + std::to_string(h.n) + " at positions " + std::to_string(h.pos0) + ".." +
         std::to_string(int64_t(h.pos0) + h.n) + "\n";
    s += "outputs:       logprobs " + std::string(h.flags & FLAG_LOGPROBS ? "yes" : "no") + ", last logits " +
         (h.flags & FLAG_LAST_LOGITS ? "yes" : "no") + "\n";
    size_t offsets[N_SECTIONS + 1];
    const bool sizes_ok = section_offsets(h, bytes.size(), offsets) && offsets[N_SECTIONS] == bytes.size();
    s += "size:          " + std::to_string(bytes.size()) + " bytes" +
         (sizes_ok ? "" : " (MISMATCH: truncated or trailing data)") + "\n";
    for (int s_i = 0; s_i < N_SECTIONS; ++s_i) {
      char line[160];
      std::string status = "-";
      if (section_offsets(h, bytes.size(), offsets))
        status = XXH3_64bits(bytes.data() + offsets[s_i], h.section_bytes[s_i]) == h.section_hash[s_i]
                     ? "checksum ok" : "CHECKSUM MISMATCH";
      std::snprintf(line, sizeof(line), "section %-9s %12" PRIu64 " bytes  %s\n", SECTION_NAMES[s_i],
                    h.section_bytes[s_i], status.c_str());
      s += line;
    }
    return s;
  } catch (...) {
    return "backprompt K/V block: cannot describe\n";
  }
}

}  // namespace backprompt
