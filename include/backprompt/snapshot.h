// Snapshots: one text's whole state in one file, to resume exactly in another run.
//
//   text.save("prompt.bps", {.sampler = params});          // tokens, K/V, logits, sampler state
//   bp::Text t = cache.restore("prompt.bps", &params);      // nothing recomputed
//
// A snapshot holds the model and tokenizer fingerprints, the hyperparameters that shape K/V, the
// tokens, the K/V of every layer (used positions only), the per-token logprobs known when it was
// saved, the logits after the last token, the sampler state and the text's string. Every section
// carries its length and an XXH3-64 checksum. Files are written atomically (temporary file in the
// same directory, fsync, rename, fsync of the directory): a crash never leaves a half file under
// the final name.
//
// Errors: Cache::restore() raises Error(MODEL_MISMATCH) naming the model or the tokenizer when the
// file was made by another one, Error(CORRUPT_FILE) naming the section for a truncated or corrupt
// file, Error(IO_ERROR) when it cannot be read; it checks everything before it changes the cache.
//
// K/V storage types other than F32 are lossy (opt-in; the README lists their measured error):
// outputs after restoring them are not exact.
#pragma once

#include <optional>
#include <string_view>

#include "backprompt/sampling.h"

namespace backprompt {

// How K/V are stored at rest.
enum class KvType {
  F32,   // exact
  F16,   // IEEE half
  BF16,  // bfloat16
  Q8_0,  // blocks of 32 int8 with an f16 scale
};

const char* kv_type_name(KvType t);                          // "f32", "f16", "bf16", "q8_0"
std::optional<KvType> kv_type_from_name(std::string_view s);  // inverse of kv_type_name

struct SnapshotOptions {
  KvType kv_type = KvType::F32;
  bool zstd = false;         // compress K/V with zstd (lossless, on top of kv_type)
  SamplingParams sampler;    // stored as is; set rng_state to resume a sampled stream
};

}  // namespace backprompt
