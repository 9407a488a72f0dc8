// `backprompt inspect FILE`: prints the header of a snapshot (format, fingerprints, token count,
// K/V storage, sampler state, sections with their sizes), checking every section's checksum, or
// of a store block. The file kind is chosen by its magic.
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "backprompt/error.h"
#include "commands.h"
#include "snapshot_format.h"
#include "store/block.h"

namespace backprompt::tools {

namespace {

std::vector<uint8_t> read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(ErrorCode::IO_ERROR, "inspect: cannot open " + path + ": " + std::strerror(errno));
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw Error(ErrorCode::IO_ERROR, "inspect: cannot read " + path);
  return bytes;
}

bool starts_with(const std::vector<uint8_t>& bytes, const uint8_t* magic, size_t n) {
  return bytes.size() >= n && std::memcmp(bytes.data(), magic, n) == 0;
}

// At most `max` bytes of `s`, printable ASCII kept, the rest escaped.
std::string escaped(const std::string& s, size_t max) {
  std::string out;
  for (size_t i = 0; i < s.size() && i < max; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c == '\\' || c == '"') out += std::string("\\") + static_cast<char>(c);
    else if (c == '\n') out += "\\n";
    else if (c >= 0x20 && c < 0x7f) out += static_cast<char>(c);
    else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    }
  }
  if (s.size() > max) out += "...";
  return out;
}

void print_snapshot(const std::string& path, const std::vector<uint8_t>& bytes) {
  namespace snap = backprompt::snapshot;
  snap::Header h;
  const std::vector<snap::SectionInfo> sections = snap::scan(bytes, path, &h);
  SamplingParams sp;
  std::string text;
  uint64_t kv_bytes = 0;
  for (const snap::SectionInfo& s : sections) {
    if (s.kind == snap::SectionKind::SAMPLER) sp = snap::decode_sampler(bytes, s, path);
    if (s.kind == snap::SectionKind::TEXT)
      text.assign(bytes.begin() + static_cast<int64_t>(s.offset + snap::SECTION_HEADER_BYTES),
                  bytes.begin() + static_cast<int64_t>(s.offset + snap::SECTION_HEADER_BYTES + s.length));
    if (s.kind == snap::SectionKind::KEYS || s.kind == snap::SectionKind::VALUES) kv_bytes += s.length;
  }
  std::printf("file: %s\n", path.c_str());
  std::printf("format: backprompt snapshot, version %u (%zu bytes, every checksum ok)\n", h.version, bytes.size());
  std::printf("model fingerprint: %016llx\n", static_cast<unsigned long long>(h.model_fingerprint));
  std::printf("tokenizer fingerprint: %016llx\n", static_cast<unsigned long long>(h.tokenizer_fingerprint));
  std::printf("tokens: %llu\n", static_cast<unsigned long long>(h.n_tokens));
  std::printf("K/V: %s%s, n_layer %d, n_kv_head %d, head_dim %d; %llu bytes (%.1f per token)\n",
              dtype_name(h.codec.type), h.codec.zstd ? " + zstd" : "", h.n_layer, h.n_kv_head, h.head_dim,
              static_cast<unsigned long long>(kv_bytes), static_cast<double>(kv_bytes) / static_cast<double>(h.n_tokens));
  std::printf("n_vocab: %d\n", h.n_vocab);
  std::printf("sampler: temperature %g, top_k %d, top_p %g, seed %llu, rng_state %llu%s\n", sp.temperature, sp.top_k,
              sp.top_p, static_cast<unsigned long long>(sp.seed), static_cast<unsigned long long>(sp.rng_state),
              sp.rng_state == 0 ? " (starts from the seed)" : "");
  std::printf("text: \"%s\" (%zu bytes)\n", escaped(text, 200).c_str(), text.size());
  std::printf("sections:\n  %10s %12s %16s  %s\n", "offset", "bytes", "xxh3", "name");
  for (const snap::SectionInfo& s : sections)
    std::printf("  %10llu %12llu %016llx  %s\n", static_cast<unsigned long long>(s.offset),
                static_cast<unsigned long long>(s.length), static_cast<unsigned long long>(s.checksum),
                snap::section_name(s.kind, s.index).c_str());
}

int run_inspect(const std::string& path) {
  const std::vector<uint8_t> bytes = read_all(path);
  if (starts_with(bytes, snapshot::MAGIC, sizeof(snapshot::MAGIC))) {
    print_snapshot(path, bytes);
    return 0;
  }
  if (is_block(bytes)) {  // a store block (a file of a dir: store)
    std::printf("file: %s\n%s", path.c_str(), describe_block(bytes).c_str());
    return 0;
  }
  throw Error(ErrorCode::CORRUPT_FILE, "inspect: " + path + " is neither a backprompt snapshot nor a store block (unknown magic)");
}

}  // namespace

CommandRun setup_inspect(CLI::App& cmd) {
  auto path = std::make_shared<std::string>();
  cmd.add_option("FILE", *path, "Snapshot file (from --cache-prompt or Text::save) or store block (a file of a dir: store)")->required();
  return [path]() { return run_inspect(*path); };
}

}  // namespace backprompt::tools
