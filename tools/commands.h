// The `backprompt` subcommands. Each tools/<name>.cpp defines one setup function: it declares the
// subcommand's options on `cmd` and returns the function that runs the subcommand once the
// command line has been parsed. main.cpp lists them in its command table.
//
// Output conventions: results on stdout, diagnostics on stderr. A run function returns the exit
// code (0); it throws UsageError for a bad combination of arguments (exit 2) and lets
// backprompt::Error through for failures at run time (exit 1).
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <stdexcept>
#include <string>

#include "backprompt/model.h"

namespace backprompt::tools {

using CommandRun = std::function<int()>;
using CommandSetup = CommandRun (*)(CLI::App& cmd);

class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// --weights auto|mmap|memory on `cmd` (where the model's weights live, WeightPlacement), stored
// in `*name`; load_options turns it into Model::load's options (tools/weights_option.cpp).
void add_weights_option(CLI::App& cmd, std::string* name);
LoadOptions load_options(const std::string& name);

CommandRun setup_generate(CLI::App& cmd);    // tools/generate.cpp
CommandRun setup_tokenize(CLI::App& cmd);    // tools/tokenize.cpp
CommandRun setup_make_model(CLI::App& cmd);  // tools/make_model.cpp
CommandRun setup_bench(CLI::App& cmd);       // tools/bench.cpp
CommandRun setup_score(CLI::App& cmd);       // tools/score.cpp
CommandRun setup_graph(CLI::App& cmd);       // tools/graph.cpp
CommandRun setup_inspect(CLI::App& cmd);     // tools/inspect.cpp

}  // namespace backprompt::tools
