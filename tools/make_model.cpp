// `backprompt make-model --arch gpt2|llama --preset NAME --dtype TYPE [--vocab V.gguf] [--seed S] -o OUT`
#include <cstdio>
#include <map>
#include <memory>
#include <string>

#include "commands.h"
#include "model/make_model.h"

namespace backprompt::tools {

namespace {

struct MakeModelCliOptions {
  std::string arch;
  std::string preset = "tiny";
  std::string dtype = "f32";
  std::string vocab;
  uint64_t seed = 1;
  std::string out;
};

}  // namespace

CommandRun setup_make_model(CLI::App& cmd) {
  auto opt = std::make_shared<MakeModelCliOptions>();
  cmd.add_option("--arch", opt->arch, "Architecture")->required()->check(CLI::IsMember({"gpt2", "llama"}));
  cmd.add_option("--preset", opt->preset,
                 "Shape: tiny (both), gpt2-124m (gpt2), llama-110m, tinyllama-1.1b (llama)")
      ->capture_default_str();
  cmd.add_option("--dtype", opt->dtype, "Type of the weight matrices (norms and biases stay f32)")
      ->check(CLI::IsMember({"f32", "f16", "bf16", "q8_0"}))
      ->capture_default_str();
  cmd.add_option("--vocab", opt->vocab, "GGUF whose tokenizer.* metadata is copied (default: a byte vocabulary)");
  cmd.add_option("--seed", opt->seed, "Seed of the random weights")->capture_default_str();
  cmd.add_option("-o,--output", opt->out, "Output GGUF file")->required();

  return [opt]() {
    MakeModelOptions mo;
    mo.arch = opt->arch == "gpt2" ? Arch::GPT2 : Arch::LLAMA;
    bool known_preset = false;
    for (const std::string& p : make_model_presets(mo.arch)) known_preset |= p == opt->preset;
    if (!known_preset) {
      std::string valid;
      for (const std::string& p : make_model_presets(mo.arch)) valid += (valid.empty() ? "" : ", ") + p;
      throw UsageError("--preset " + opt->preset + " is not a " + opt->arch + " preset (valid: " + valid + ")");
    }
    mo.preset = opt->preset;
    mo.dtype = *dtype_from_name(opt->dtype);
    mo.vocab_path = opt->vocab;
    mo.seed = opt->seed;
    const MakeModelResult r = make_model(mo, opt->out);
    const ModelConfig& c = r.config;
    std::fprintf(stderr,
                 "backprompt: wrote %s: %s %s, %s, %d layers, n_embd %d, %d heads (%d kv), n_ff %d, n_ctx %d, "
                 "n_vocab %d, %.2fM parameters\n",
                 opt->out.c_str(), opt->arch.c_str(), opt->preset.c_str(), opt->dtype.c_str(), c.n_layer, c.n_embd,
                 c.n_head, c.n_kv_head, c.n_ff, c.n_ctx, c.n_vocab, static_cast<double>(r.n_params) / 1e6);
    return 0;
  };
}

}  // namespace backprompt::tools
