// Token text -> id lookup with string_view keys (no temporary strings on the hot path).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <unordered_map>

#include <xxhash.h>

namespace backprompt {

struct TokenTextHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return static_cast<size_t>(XXH3_64bits(s.data(), s.size())); }
};

// On duplicate token texts the lowest id is kept (callers insert in id order with emplace).
using TokenMap = std::unordered_map<std::string, int32_t, TokenTextHash, std::equal_to<>>;

}  // namespace backprompt
