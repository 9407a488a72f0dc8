// K/V at rest: f32 values encoded as f32, f16, bf16 or q8_0, optionally zstd-compressed.
//
// Encoding of n values (the caller knows n; nothing else is stored):
//   raw:  the values as one row of the type (q8_0: ceil(n / 32) blocks, the last one zero-padded).
//   zstd: one zstd frame (content size recorded) whose content is the raw encoding with its bytes
//         grouped into planes: byte 0 of every element, then byte 1, ... (an element is 4 bytes for
//         f32, 2 for f16/bf16; q8_0 blocks are split into the scales, then the quants). Floats of
//         similar magnitude share their high bytes, which zstd then finds; the raw order would
//         interleave them with noisy low bytes.
#include "store/kv_codec.h"

#include <zstd.h>

#include <cstring>
#include <string>

#include "backprompt/error.h"

namespace backprompt {

namespace {

constexpr int ZSTD_LEVEL = 3;

// Bytes of the raw encoding of n values.
size_t raw_bytes(DType t, size_t n) {
  const size_t block = static_cast<size_t>(dtype_block_size(t));
  return (n + block - 1) / block * dtype_block_bytes(t);
}

// Plane layout of a raw encoding: `n_planes` planes, element e's byte b at plane b, index e.
// q8_0 is 2 "planes" of unequal width (scales, quants): handled by its own pair of functions.
size_t element_bytes(DType t) { return t == DType::Q8_0 ? 0 : dtype_block_bytes(t); }

void to_planes(DType t, const uint8_t* raw, size_t n_bytes, uint8_t* out) {
  const size_t w = element_bytes(t);
  if (w == 0) {  // q8_0: [n_blocks] scales (2 bytes), then [n_blocks][32] quants
    const size_t n_blocks = n_bytes / sizeof(BlockQ8_0);
    for (size_t b = 0; b < n_blocks; ++b) {
      const uint8_t* blk = raw + b * sizeof(BlockQ8_0);
      std::memcpy(out + 2 * b, blk, 2);
      std::memcpy(out + 2 * n_blocks + Q8_0_BLOCK * b, blk + 2, Q8_0_BLOCK);
    }
    return;
  }
  const size_t n = n_bytes / w;
  for (size_t e = 0; e < n; ++e)
    for (size_t b = 0; b < w; ++b) out[b * n + e] = raw[e * w + b];
}

void from_planes(DType t, const uint8_t* planes, size_t n_bytes, uint8_t* raw) {
  const size_t w = element_bytes(t);
  if (w == 0) {
    const size_t n_blocks = n_bytes / sizeof(BlockQ8_0);
    for (size_t b = 0; b < n_blocks; ++b) {
      uint8_t* blk = raw + b * sizeof(BlockQ8_0);
      std::memcpy(blk, planes + 2 * b, 2);
      std::memcpy(blk + 2, planes + 2 * n_blocks + Q8_0_BLOCK * b, Q8_0_BLOCK);
    }
    return;
  }
  const size_t n = n_bytes / w;
  for (size_t e = 0; e < n; ++e)
    for (size_t b = 0; b < w; ++b) raw[e * w + b] = planes[b * n + e];
}

// Per-thread buffers (for zstd, and for unaligned input or output), kept between calls: a
// snapshot or a run of store blocks needs the same sizes again and again, and fresh large
// allocations cost page faults each time. Held: at most twice the largest run (de)coded on the
// thread, while the thread lives.
std::vector<uint8_t>& scratch(int which, size_t n_bytes) {
  thread_local std::vector<uint8_t> buffers[2];
  std::vector<uint8_t>& b = buffers[which];
  if (b.size() < n_bytes) b.resize(n_bytes);
  return b;
}

// The raw encoding of `values` into `out` (exactly raw_bytes(t, n) bytes).
void encode_raw(DType t, std::span<const float> values, uint8_t* out) {
  const int64_t block = dtype_block_size(t);
  const int64_t n = static_cast<int64_t>(values.size());
  const int64_t n_full = n / block * block;
  quantize_row(t, values.data(), out, n_full);
  if (n_full < n) {  // q8_0 tail: one zero-padded block
    float tail[Q8_0_BLOCK] = {};  // [32]
    std::copy(values.begin() + n_full, values.end(), tail);
    quantize_row(t, tail, out + dtype_row_bytes(t, n_full), block);
  }
}

void decode_raw(DType t, const uint8_t* raw, std::span<float> out) {
  const int64_t block = dtype_block_size(t);
  const int64_t n = static_cast<int64_t>(out.size());
  const int64_t n_full = n / block * block;
  dequantize_row(t, raw, out.data(), n_full);
  if (n_full < n) {
    float tail[Q8_0_BLOCK];  // [32]
    dequantize_row(t, raw + dtype_row_bytes(t, n_full), tail, block);
    std::copy(tail, tail + (n - n_full), out.begin() + n_full);
  }
}

[[noreturn]] void corrupt(const char* what, const std::string& why) {
  throw Error(ErrorCode::CORRUPT_FILE, std::string(what) + ": " + why);
}

}  // namespace

void kv_encode(const KvCodec& codec, std::span<const float> values, std::vector<uint8_t>& out) {
  BP_ASSERT(dtype_is_supported(static_cast<uint32_t>(codec.type)));
  const size_t n_raw = raw_bytes(codec.type, values.size());
  if (!codec.zstd) {
    const size_t at = out.size();
    out.resize(at + n_raw);
    if (reinterpret_cast<uintptr_t>(out.data() + at) % alignof(float) == 0) {
      encode_raw(codec.type, values, out.data() + at);
    } else {  // the row types are stored through uint16_t / block pointers: go through aligned memory
      std::vector<uint8_t>& raw = scratch(0, n_raw);
      encode_raw(codec.type, values, raw.data());
      std::memcpy(out.data() + at, raw.data(), n_raw);
    }
    return;
  }
  std::vector<uint8_t>& raw = scratch(0, n_raw);     // [n_raw] bytes
  std::vector<uint8_t>& planes = scratch(1, n_raw);  // [n_raw] bytes
  encode_raw(codec.type, values, raw.data());
  to_planes(codec.type, raw.data(), n_raw, planes.data());
  const size_t at = out.size();
  out.resize(at + ZSTD_compressBound(n_raw));
  const size_t n = ZSTD_compress(out.data() + at, out.size() - at, planes.data(), n_raw, ZSTD_LEVEL);
  if (ZSTD_isError(n)) throw Error(ErrorCode::OUT_OF_MEMORY, std::string("kv: zstd: ") + ZSTD_getErrorName(n));
  out.resize(at + n);
}

void kv_decode(const KvCodec& codec, std::span<const uint8_t> bytes, std::span<float> out, const char* what) {
  if (!dtype_is_supported(static_cast<uint32_t>(codec.type)))
    corrupt(what, "unknown K/V type " + std::to_string(static_cast<uint32_t>(codec.type)));
  const size_t n_raw = raw_bytes(codec.type, out.size());
  if (!codec.zstd) {
    if (bytes.size() != n_raw)
      corrupt(what, std::to_string(bytes.size()) + " bytes of " + dtype_name(codec.type) + " K/V, expected " +
                        std::to_string(n_raw) + " for " + std::to_string(out.size()) + " values");
    if (reinterpret_cast<uintptr_t>(bytes.data()) % alignof(float) == 0) {
      decode_raw(codec.type, bytes.data(), out);
    } else {
      std::vector<uint8_t>& raw = scratch(0, n_raw);
      std::memcpy(raw.data(), bytes.data(), n_raw);
      decode_raw(codec.type, raw.data(), out);
    }
    return;
  }
  // One frame, exactly the bytes given, announcing exactly the size expected: checked before
  // anything is allocated, so a small input cannot claim a huge output.
  const size_t frame = ZSTD_findFrameCompressedSize(bytes.data(), bytes.size());
  if (ZSTD_isError(frame) || frame != bytes.size())
    corrupt(what, "not one zstd frame of " + std::to_string(bytes.size()) + " bytes");
  const unsigned long long content = ZSTD_getFrameContentSize(bytes.data(), bytes.size());
  if (content != n_raw)
    corrupt(what, "zstd frame holds " +
                      (content == ZSTD_CONTENTSIZE_UNKNOWN || content == ZSTD_CONTENTSIZE_ERROR ? std::string("unknown")
                                                                                                : std::to_string(content)) +
                      " bytes, expected " + std::to_string(n_raw));
  std::vector<uint8_t>& planes = scratch(0, n_raw);  // [n_raw] bytes
  std::vector<uint8_t>& raw = scratch(1, n_raw);     // [n_raw] bytes
  const size_t n = ZSTD_decompress(planes.data(), n_raw, bytes.data(), bytes.size());
  if (ZSTD_isError(n) || n != n_raw)
    corrupt(what, std::string("zstd: ") + (ZSTD_isError(n) ? ZSTD_getErrorName(n) : "short frame"));
  from_planes(codec.type, planes.data(), n_raw, raw.data());
  decode_raw(codec.type, raw.data(), out);
}

}  // namespace backprompt
