// backprompt::Error: the one exception type the library throws for bad input.
//
// Every failure caused by something outside the library (a malformed file, a wrong model,
// an unreachable server, an impossible allocation) is reported as an Error carrying a code and
// a message that names what is wrong: the file, the field, the offset. A cache miss or a key
// that is not found is ordinary control flow and never an Error. Broken internal invariants
// are bugs: they abort with file and line (BP_ASSERT), they are not thrown.
#pragma once

#include <stdexcept>
#include <string>

namespace backprompt {

enum class ErrorCode {
  INVALID_ARGUMENT,  // a caller passed something that cannot work (bad option, position past context)
  CORRUPT_FILE,      // a file is malformed, truncated or fails its checksum
  MODEL_MISMATCH,    // state made by another model or tokenizer
  IO_ERROR,          // open/read/write/mmap failed
  OUT_OF_MEMORY,     // an allocation the caller asked for cannot be made
  UNSUPPORTED,       // a valid file using something this build does not implement
};

const char* error_code_name(ErrorCode code);

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message);
  ErrorCode code() const { return code_; }

 private:
  ErrorCode code_;
};

namespace detail {
[[noreturn]] void assert_fail(const char* expr, const char* file, int line);
}

}  // namespace backprompt

// Internal invariant: a failure is a bug in backprompt, never a user error.
#define BP_ASSERT(cond) \
  do { if (!(cond)) ::backprompt::detail::assert_fail(#cond, __FILE__, __LINE__); } while (0)
