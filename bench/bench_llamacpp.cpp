// bench_llamacpp: the same prefill and decode measurements as `backprompt bench`, run by llama.cpp
// (libllama, loaded at run time), so that both runtimes are timed on the same machine, the same
// model files, the same minute. bench/llamacpp.sh fetches a prebuilt libllama (the npm package
// @node-llama-cpp/linux-x64, whose CPU backends are chosen at run time like ours) and calls this.
//
//   bench_llamacpp LIBDIR MODEL [-p 512] [-n 128] [-t THREADS] [-r REPS]
//
// LIBDIR holds libllama*.so and the libggml*.so backends. Prints, like `backprompt bench`:
//   pp512: <mean> ± <sd> tok/s     one 512-token llama_decode on an empty context
//   tg128: <mean> ± <sd> tok/s     128 one-token llama_decode calls after the 512-token prompt
// with one warm-up run before REPS timed runs. The prompt is the same seeded random tokens
// `backprompt bench` uses; each decoded token is the argmax of the previous logits (as ours).
// llama.cpp runs with its library defaults otherwise (f16 K/V cache, flash attention "auto").
//
// No llama.h is needed: the handful of C functions is declared here. The parameter structs are
// returned and passed by value; they are larger than 16 bytes, so the x86-64 ABI moves them
// through memory, and a buffer at least as large as the real struct works whatever fields
// follow the few set here (n_ctx, n_batch, n_ubatch, n_threads, n_threads_batch), found by
// their default values, which are checked first.
#include <dlfcn.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

struct ParamsBlob {  // llama_model_params / llama_context_params, by value
  alignas(16) unsigned char bytes[1024];
};

struct Batch {  // llama_batch
  int32_t n_tokens;
  int32_t* token;
  float* embd;
  int32_t* pos;
  int32_t* n_seq_id;
  int32_t** seq_id;
  int8_t* logits;
};

struct Api {
  void (*backend_init)();
  void (*load_all_from_path)(const char*);
  ParamsBlob (*model_default_params)();
  void* (*model_load_from_file)(const char*, ParamsBlob);
  ParamsBlob (*context_default_params)();
  void* (*init_from_model)(void*, ParamsBlob);
  Batch (*batch_get_one)(int32_t*, int32_t);
  int32_t (*decode)(void*, Batch);
  float* (*get_logits_ith)(void*, int32_t);
  void* (*get_memory)(void*);
  void (*memory_clear)(void*, bool);
  const void* (*model_get_vocab)(const void*);
  int32_t (*vocab_n_tokens)(const void*);
  void (*free_ctx)(void*);
  void (*model_free)(void*);
  const char* (*print_system_info)();
  void (*log_set)(void (*)(int, const char*, void*), void*);       // llama_log_set
  void (*ggml_log_set)(void (*)(int, const char*, void*), void*);  // ggml_log_set (backend loading)
};

// llama.cpp's log, errors only (ggml_log_level: 4 = GGML_LOG_LEVEL_ERROR).
void log_errors(int level, const char* text, void*) {
  if (level == 4) std::fputs(text, stderr);
}

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "bench_llamacpp: %s\n", what.c_str());
  std::exit(1);
}

void* open_lib(const std::string& dir, const char* const* names) {
  std::string tried;
  for (const char* const* n = names; *n != nullptr; ++n) {
    const std::string path = dir + "/" + *n;
    if (void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL)) return h;
    tried += std::string(tried.empty() ? "" : "; ") + dlerror();
  }
  fail("cannot load " + std::string(names[0]) + " from " + dir + ": " + tried);
}

template <typename F>
void bind(void* lib, const char* name, F& fn) {
  void* p = dlsym(lib, name);
  if (p == nullptr) fail(std::string("libllama has no ") + name);
  fn = reinterpret_cast<F>(p);
}

int32_t argmax(const float* v, int32_t n) {
  int32_t best = 0;
  for (int32_t i = 1; i < n; ++i) {
    if (v[i] > v[best]) best = i;
  }
  return best;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: bench_llamacpp LIBDIR MODEL [-p 512] [-n 128] [-t THREADS] [-r REPS]\n");
    return 2;
  }
  const std::string dir = argv[1], model_path = argv[2];
  int n_prompt = 512, n_gen = 128, n_reps = 3;
  int n_threads = static_cast<int>(std::thread::hardware_concurrency());
  for (int i = 3; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    const int v = std::atoi(argv[i + 1]);
    if (a == "-p") n_prompt = v;
    else if (a == "-n") n_gen = v;
    else if (a == "-t") n_threads = v;
    else if (a == "-r") n_reps = v;
    else fail("unknown argument " + a);
  }
  if (n_prompt < 1 || n_gen < 0 || n_threads < 1 || n_reps < 1) fail("bad -p/-n/-t/-r value");

  const char* ggml_names[] = {"libggml.so", "libggml.v0.5.0.so", nullptr};
  const char* llama_names[] = {"libllama.so", "libllama.v0.5.0.so", nullptr};
  const char* ggml_base_names[] = {"libggml-base.so", nullptr};
  void* ggml = open_lib(dir, ggml_names);
  void* llama = open_lib(dir, llama_names);
  Api api{};
  bind(ggml, "ggml_backend_load_all_from_path", api.load_all_from_path);
  bind(llama, "llama_backend_init", api.backend_init);
  bind(llama, "llama_model_default_params", api.model_default_params);
  bind(llama, "llama_model_load_from_file", api.model_load_from_file);
  bind(llama, "llama_context_default_params", api.context_default_params);
  bind(llama, "llama_init_from_model", api.init_from_model);
  bind(llama, "llama_batch_get_one", api.batch_get_one);
  bind(llama, "llama_decode", api.decode);
  bind(llama, "llama_get_logits_ith", api.get_logits_ith);
  bind(llama, "llama_get_memory", api.get_memory);
  bind(llama, "llama_memory_clear", api.memory_clear);
  bind(llama, "llama_model_get_vocab", api.model_get_vocab);
  bind(llama, "llama_vocab_n_tokens", api.vocab_n_tokens);
  bind(llama, "llama_free", api.free_ctx);
  bind(llama, "llama_model_free", api.model_free);
  bind(llama, "llama_print_system_info", api.print_system_info);
  bind(llama, "llama_log_set", api.log_set);
  void* ggml_base = open_lib(dir, ggml_base_names);
  bind(ggml_base, "ggml_log_set", api.ggml_log_set);
  api.log_set(log_errors, nullptr);
  api.ggml_log_set(log_errors, nullptr);

  api.load_all_from_path(dir.c_str());
  api.backend_init();
  void* model = api.model_load_from_file(model_path.c_str(), api.model_default_params());
  if (model == nullptr) fail("llama.cpp cannot load " + model_path);
  const int32_t n_vocab = api.vocab_n_tokens(api.model_get_vocab(model));
  std::printf("llama.cpp: %s\n", api.print_system_info());
  std::printf("threads: %d\n", n_threads);

  // n_ctx, n_batch, n_ubatch, n_seq_max open llama_context_params; n_threads and n_threads_batch
  // follow a few fields later (how many depends on the version): the first two consecutive
  // int32 equal to ggml's default thread count (4) after the opening four.
  ParamsBlob cp = api.context_default_params();
  uint32_t words[16];
  std::memcpy(words, cp.bytes, sizeof words);
  int at = -1;
  for (int i = 4; i < 12 && at < 0; ++i) {
    if (words[i] == 4 && words[i + 1] == 4) at = i;
  }
  if (words[0] != 512 || words[1] != 2048 || words[2] != 512 || words[3] != 1 || at < 0) {
    fail("llama_context_params does not start with the expected defaults (n_ctx 512, n_batch 2048, n_ubatch 512, n_seq_max 1, "
         "then n_threads = n_threads_batch = 4): a layout this harness does not know");
  }
  words[0] = static_cast<uint32_t>(n_prompt + n_gen + 16);  // n_ctx
  words[1] = words[2] = static_cast<uint32_t>(n_prompt);     // the prompt in one batch and one ubatch
  words[at] = words[at + 1] = static_cast<uint32_t>(n_threads);
  std::memcpy(cp.bytes, words, sizeof words);
  void* ctx = api.init_from_model(model, cp);
  if (ctx == nullptr) fail("llama.cpp cannot create a context");

  // The prompt: seeded random tokens, as `backprompt bench` makes them.
  std::mt19937_64 rng(1234);
  std::uniform_int_distribution<int32_t> dist(0, n_vocab - 1);
  std::vector<int32_t> prompt(static_cast<size_t>(n_prompt));
  for (int32_t& t : prompt) t = dist(rng);

  auto prefill = [&]() {
    api.memory_clear(api.get_memory(ctx), true);
    std::vector<int32_t> tokens = prompt;
    const auto t0 = std::chrono::steady_clock::now();
    if (api.decode(ctx, api.batch_get_one(tokens.data(), n_prompt)) != 0) fail("llama_decode failed on the prompt");
    (void)api.get_logits_ith(ctx, -1);
    return seconds_since(t0);
  };
  auto generate = [&]() {
    prefill();
    int32_t next = argmax(api.get_logits_ith(ctx, -1), n_vocab);
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < n_gen; ++i) {
      if (api.decode(ctx, api.batch_get_one(&next, 1)) != 0) fail("llama_decode failed on a generated token");
      next = argmax(api.get_logits_ith(ctx, -1), n_vocab);
    }
    return seconds_since(t0);
  };
  auto report = [&](const char* label, int n_tokens, auto run) {
    run();  // warm-up
    std::vector<double> rates;
    for (int r = 0; r < n_reps; ++r) rates.push_back(n_tokens / run());
    double mean = 0, var = 0;
    for (double x : rates) mean += x;
    mean /= n_reps;
    for (double x : rates) var += (x - mean) * (x - mean);
    const double sd = n_reps > 1 ? std::sqrt(var / (n_reps - 1)) : 0.0;
    std::printf("%s%d: %.2f ± %.2f tok/s\n", label, n_tokens, mean, sd);
    std::fflush(stdout);
  };
  report("pp", n_prompt, prefill);
  if (n_gen > 0) report("tg", n_gen, generate);
  api.free_ctx(ctx);
  api.model_free(model);
  return 0;
}
