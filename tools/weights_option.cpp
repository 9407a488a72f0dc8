// The --weights option shared by the commands that load a model.
#include "commands.h"

namespace backprompt::tools {

void add_weights_option(CLI::App& cmd, std::string* name) {
  cmd.add_option("--weights", *name,
                 "Where the weights live: mmap (the file's mapping, shared with other processes), memory (a copy on "
                 "huge pages: faster decode), auto (memory for files of 64 MiB or more that fit comfortably)")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "mmap", "memory"}));
}

LoadOptions load_options(const std::string& name) {
  const std::optional<WeightPlacement> p = weight_placement_from_name(name);
  if (!p) throw UsageError("--weights must be auto, mmap or memory, not '" + name + "'");
  LoadOptions o;
  o.weights = *p;
  return o;
}

}  // namespace backprompt::tools
