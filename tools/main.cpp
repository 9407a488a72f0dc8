// `backprompt`: dispatches to one subcommand (see commands.h).
//
// Exit codes: 0 success (and --help), 1 an error at run time (backprompt::Error and the like),
// 2 bad command-line arguments. Every error is one line on stderr: "backprompt: error: ...".
#include <cstdio>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "backprompt/error.h"
#include "commands.h"

namespace bt = backprompt::tools;

namespace {

struct CommandEntry {
  const char* name;
  const char* description;
  bt::CommandSetup setup;
};

// Later subcommands (score, graph, inspect, bench) are one line each here.
const CommandEntry COMMANDS[] = {
    {"generate", "Generate text from a prompt, streaming tokens to stdout", bt::setup_generate},
    {"tokenize", "Print the token ids of a text", bt::setup_tokenize},
    {"make-model", "Write a model with random weights in a real shape (GGUF)", bt::setup_make_model},
    {"bench", "Measure prefill and decode speed (tokens per second)", bt::setup_bench},
    {"score", "Score completions of a prompt by log-probability (prompt computed once)", bt::setup_score},
    {"graph", "Write Graphviz DOT of texts, their segments and the cache nodes they use", bt::setup_graph},
    {"inspect", "Print the header of a snapshot file (format, fingerprints, tokens, K/V storage, sections)", bt::setup_inspect},
};

int report_error(const std::string& message, int exit_code) {
  std::string line = message;
  for (char& c : line) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  while (!line.empty() && line.back() == ' ') line.pop_back();
  std::fprintf(stderr, "backprompt: error: %s\n", line.c_str());
  return exit_code;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"backprompt: run GPT-2 and Llama models from GGUF files on the CPU", "backprompt"};
  app.require_subcommand(0, 1);
  std::vector<std::pair<CLI::App*, bt::CommandRun>> commands;  // [command]
  for (const CommandEntry& c : COMMANDS) {
    CLI::App* sub = app.add_subcommand(c.name, c.description);
    commands.emplace_back(sub, c.setup(*sub));
  }

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help: help text on stdout
    std::string where;
    for (const auto& [sub, run] : commands) {
      if (sub->parsed()) where = sub->get_name() + ": ";
    }
    return report_error(where + e.what(), 2);
  }

  for (const auto& [sub, run] : commands) {
    if (!sub->parsed()) continue;
    try {
      return run();
    } catch (const bt::UsageError& e) {
      return report_error(sub->get_name() + ": " + e.what(), 2);
    } catch (const backprompt::Error& e) {
      return report_error(e.what(), 1);
    } catch (const std::exception& e) {
      return report_error(e.what(), 1);
    }
  }
  std::fputs(app.help().c_str(), stdout);
  return 0;
}
