#include "backprompt/error.h"

#include <cstdio>
#include <cstdlib>

namespace backprompt {

const char* error_code_name(ErrorCode code) {
  switch (code) {
    case ErrorCode::INVALID_ARGUMENT: return "invalid_argument";
    case ErrorCode::CORRUPT_FILE: return "corrupt_file";
    case ErrorCode::MODEL_MISMATCH: return "model_mismatch";
    case ErrorCode::IO_ERROR: return "io_error";
    case ErrorCode::OUT_OF_MEMORY: return "out_of_memory";
    case ErrorCode::UNSUPPORTED: return "unsupported";
  }
  return "unknown";
}

Error::Error(ErrorCode code, const std::string& message)
    : std::runtime_error(std::string(error_code_name(code)) + ": " + message), code_(code) {}

namespace detail {
void assert_fail(const char* expr, const char* file, int line) {
  std::fprintf(stderr, "backprompt: internal error: %s:%d: assertion failed: %s\n", file, line, expr);
  std::abort();
}
}  // namespace detail

}  // namespace backprompt
