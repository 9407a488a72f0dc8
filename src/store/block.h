// Store blocks: the keys of a token path's blocks and the bytes of one block.
//
// Keys form a hash chain over fixed-size token blocks. chain_root mixes everything that makes
// K/V of one model incompatible with another's (model and tokenizer fingerprints, K/V codec,
// shape, block size); chain_next adds one full block of tokens. Two token paths that share a
// prefix of whole blocks share those keys, whatever built them. The trailing partial block (and
// the logits after the path's last token) live under an exact-path key, path_key.
//
// Block bytes (little-endian; version 1):
//   header   magic "BPKV", u32 version, u64 model_fp, u64 tokenizer_fp, u32 kv type,
//            u32 kv zstd, i32 n_layer, i32 kv_dim, i32 n_vocab, i32 block_size, i32 pos0, i32 n,
//            u32 flags, u32 reserved, then for each of the 5 sections below u64 size + u64
//            XXH3-64 of its bytes, then u64 XXH3-64 of all the header bytes before it.
//   sections tokens    [n] i32
//            k         kv_encode([n_layer][n][kv_dim])   (codec from the context; empty if n = 0)
//            v         kv_encode([n_layer][n][kv_dim])   (likewise)
//            logprobs  [n] f32, or empty                 (flag 1)
//            logits    [n_vocab] f32, or empty           (flag 2: the logits after tokens[n-1])
// The file is exactly the header followed by the sections.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "store/kv_codec.h"
#include "store/store.h"

namespace backprompt {

// What the K/V of a block depend on besides the tokens.
struct BlockContext {
  uint64_t model_fp = 0, tokenizer_fp = 0;
  KvCodec codec;
  int32_t n_layer = 0, kv_dim = 0, n_vocab = 0;
  int32_t block_size = 64;  // tokens per full block
};

StoreKey chain_root(const BlockContext& ctx);  // the key "before" block 0
// The key of the block `block_tokens` following the block keyed `prev` (any length is hashed,
// but the chain uses full blocks of ctx.block_size tokens).
StoreKey chain_next(const StoreKey& prev, std::span<const int32_t> block_tokens);
// The exact-path entry: `chain` is the key of the path's last full block (chain_root if none),
// `tail_tokens` the trailing partial block (may be empty). Never equal to a chain_next key.
StoreKey path_key(const StoreKey& chain, std::span<const int32_t> tail_tokens);

struct BlockData {
  int32_t pos0 = 0;                 // position of tokens[0]
  std::vector<int32_t> tokens;      // [n]
  std::vector<float> k, v;          // [n_layer][n][kv_dim]
  std::vector<float> logprobs;      // [n] or empty (NaN entries allowed)
  std::vector<float> last_logits;   // [n_vocab] or empty (exact-path entries carry them)
};

// The bytes of one block. The data's shapes must match the context (BP_ASSERT).
std::vector<uint8_t> encode_block(const BlockContext& ctx, const BlockData& data);
// Error(CORRUPT_FILE) for anything malformed, truncated or failing its checksum (the message
// names the section); Error(MODEL_MISMATCH) if the block was made under another context
// (fingerprints, codec, shape, block size; the message says which). Never crashes on any input.
BlockData decode_block(const BlockContext& ctx, std::span<const uint8_t> bytes);

// Does `bytes` start with a block's magic?
bool is_block(std::span<const uint8_t> bytes);
// A human-readable multi-line description of a block's header (format, fingerprints, codec,
// shape, positions, token count, section sizes, checksum status), or of why it is not one.
// Needs no context; never throws.
std::string describe_block(std::span<const uint8_t> bytes);

}  // namespace backprompt
