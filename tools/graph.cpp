// `backprompt graph -m MODEL (--prompt TEXT | --prompt-file FILE) --choices FILE [--endings FILE] [-o OUT.dot] [--svg OUT.svg]`
//
// Builds the same texts as `score`, evaluates them, and writes Graphviz DOT showing how they are
// made of segments and which prefix-tree nodes hold their tokens (stdout without -o). With --svg,
// runs Graphviz's `dot` if it is installed.
#include <cstdio>
#include <cstdlib>
#include <fstream>

#include "backprompt/cache.h"
#include "backprompt/error.h"
#include "commands.h"
#include "completions.h"

namespace backprompt::tools {

namespace {

struct GraphOptions {
  CompletionInputs in;
  std::string out_path;
  std::string svg_path;
  bool no_eval = false;
};

int run_graph(const GraphOptions& opt) {
  Cache cache(Model::load(opt.in.model_path, load_options(opt.in.weights)), cache_options(opt.in));
  Completions comp = build_completions(opt.in, cache);
  if (!opt.no_eval) cache.eval(comp.texts);
  const std::string dot = cache.to_dot(comp.texts);
  std::string dot_path = opt.out_path;
  if (dot_path.empty() && !opt.svg_path.empty()) dot_path = opt.svg_path + ".dot";
  if (dot_path.empty()) {
    std::fwrite(dot.data(), 1, dot.size(), stdout);
  } else {
    std::ofstream f(dot_path, std::ios::binary);
    if (!f || !(f << dot)) throw Error(ErrorCode::IO_ERROR, "cannot write '" + dot_path + "'");
  }
  if (!opt.svg_path.empty()) {
    if (std::system("command -v dot >/dev/null 2>&1") != 0)
      throw Error(ErrorCode::UNSUPPORTED, "--svg needs Graphviz's `dot` (apt-get install graphviz); the DOT file is at '" + dot_path + "'");
    const std::string cmd = "dot -Tsvg '" + dot_path + "' -o '" + opt.svg_path + "'";
    if (std::system(cmd.c_str()) != 0) throw Error(ErrorCode::IO_ERROR, "graphviz failed: " + cmd);
    std::fprintf(stderr, "wrote %s\n", opt.svg_path.c_str());
  }
  return 0;
}

}  // namespace

CommandRun setup_graph(CLI::App& cmd) {
  auto opt = std::make_shared<GraphOptions>();
  add_completion_options(cmd, opt->in);
  cmd.add_option("-o,--output", opt->out_path, "Write the DOT here (default: stdout)");
  cmd.add_option("--svg", opt->svg_path, "Also render SVG with Graphviz's dot");
  cmd.add_flag("--no-eval", opt->no_eval, "Draw the texts without computing them");
  return [opt]() { return run_graph(*opt); };
}

}  // namespace backprompt::tools
