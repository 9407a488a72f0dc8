// Cache::to_dot: Graphviz view of how texts are built from segments and which tree nodes hold
// their tokens (computed, pinned, or not in the cache: never computed or evicted).
#include <set>
#include <sstream>

#include "backprompt/cache.h"
#include "backprompt/error.h"
#include "cache/cache_impl.h"

namespace backprompt {

namespace {

std::string dot_escape(std::string_view s, size_t max_len = 40) {
  std::string out;
  size_t n = 0;
  for (char ch : s) {
    if (n++ >= max_len) {
      out += "...";
      break;
    }
    if (ch == '"' || ch == '\\') out += '\\', out += ch;
    else if (ch == '\n') out += "\\\\n";
    else if (static_cast<unsigned char>(ch) < 0x20) out += ' ';
    else out += ch;
  }
  return out;
}

std::string human_bytes(uint64_t b) {
  std::ostringstream os;
  os.precision(3);
  if (b >= (1u << 20)) os << static_cast<double>(b) / (1 << 20) << " MiB";
  else if (b >= 1024) os << static_cast<double>(b) / 1024 << " KiB";
  else os << b << " B";
  return os.str();
}

}  // namespace

std::string Cache::to_dot(std::span<const Text> texts) const {
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  detail::CacheImpl& c = *impl_;
  std::ostringstream os;
  os << "digraph backprompt {\n  rankdir=LR;\n  node [fontname=\"Helvetica\" fontsize=10];\n";
  std::set<const void*> seen_segments;
  std::set<const detail::Node*> seen_nodes;
  for (size_t ti = 0; ti < texts.size(); ++ti) {
    const Text& t = texts[ti];
    if (t.cache_impl() != impl_) throw Error(ErrorCode::INVALID_ARGUMENT, "to_dot: a text belongs to another cache");
    const std::vector<int32_t> toks = c.tokenize(t.segment_list());
    os << "  text" << ti << " [shape=box style=bold label=\"text " << ti << "\\n" << toks.size() << " tokens\"];\n";
    size_t si = 0;
    for (const auto& seg : t.segment_list()) {
      const void* key = seg.get();
      if (seen_segments.insert(key).second)
        os << "  seg" << key << " [shape=note label=\"" << (seg->is_tokens ? "tokens: " : "") << "\\\"" << dot_escape(seg->text)
           << "\\\"\"];\n";
      os << "  seg" << key << " -> text" << ti << " [label=\"" << si++ << "\" color=gray40];\n";
    }
    int32_t matched = 0;
    const std::vector<detail::Node*> path = c.tree.match(toks, &matched);
    for (const detail::Node* n : path) {
      if (!seen_nodes.insert(n).second) continue;
      const bool pinned = n->pins > 0;
      os << "  node" << n->id << " [shape=ellipse style=filled fillcolor=\"" << (pinned ? "gold" : "lightblue")
         << "\" label=\"node " << n->id << "\\n" << n->n_tokens() << " tokens @" << n->pos0 << "\\n"
         << human_bytes(c.tree.node_bytes(*n)) << (pinned ? "\\npinned" : "") << "\"];\n";
      if (!n->parent->is_root()) os << "  node" << n->parent->id << " -> node" << n->id << ";\n";
    }
    const std::string tip = path.empty() ? "" : "node" + std::to_string(path.back()->id);
    if (static_cast<size_t>(matched) < toks.size()) {
      os << "  missing" << ti << " [shape=ellipse style=dashed color=gray50 label=\"not in cache\\n(never computed or evicted)\\n"
         << toks.size() - static_cast<size_t>(matched) << " tokens\"];\n";
      if (!tip.empty()) os << "  " << tip << " -> missing" << ti << " [style=dashed];\n";
      os << "  text" << ti << " -> missing" << ti << " [style=dotted arrowhead=none];\n";
    } else if (!tip.empty()) {
      os << "  text" << ti << " -> " << tip << " [style=dotted arrowhead=none];\n";
    }
  }
  os << "}\n";
  return os.str();
}

}  // namespace backprompt
