// Model loading: hyperparameters from GGUF metadata, weight views with their shapes checked,
// the tokenizer, and the two fingerprints.
#include "backprompt/model.h"

#include <xxhash.h>

#include <sys/stat.h>

#include <cmath>
#include <fstream>

#include "backprompt/error.h"
#include "model/weights.h"
#include "tokenizer/load.h"

namespace backprompt {

using detail::ModelImpl;

const char* arch_name(Arch a) { return a == Arch::GPT2 ? "gpt2" : "llama"; }

namespace {

// Reads tensors of one file, checking names, types and shapes; every failure names the file.
class TensorBinder {
 public:
  TensorBinder(const gguf::File& file, ModelImpl& m) : file_(file), m_(m) {}

  const gguf::TensorInfo* find(const std::string& name, bool required) {
    const gguf::TensorInfo* t = file_.find_tensor(name);
    if (!t && required)
      throw Error(ErrorCode::CORRUPT_FILE, file_.path() + ": missing tensor '" + name + "'");
    return t;
  }

  void check_shape(const gguf::TensorInfo& t, std::vector<int64_t> ne) {
    if (t.ne != ne) {
      auto fmt = [](const std::vector<int64_t>& v) {
        std::string s = "[";
        for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
        return s + "]";
      };
      throw Error(ErrorCode::CORRUPT_FILE, file_.path() + ": tensor '" + t.name + "' has shape " +
                                               fmt(t.ne) + ", expected " + fmt(ne));
    }
  }

  // A weight matrix W[n_out, n_in] (GGUF ne = {n_in, n_out}), read in place.
  MatrixView matrix(const std::string& name, int64_t n_in, int64_t n_out, bool required = true) {
    const gguf::TensorInfo* t = find(name, required);
    if (!t) return {};
    check_shape(*t, {n_in, n_out});
    m_.n_params += static_cast<uint64_t>(t->n_elements());
    return MatrixView{t->type, t->data, n_in, n_out};
  }

  // A 1-D tensor of n values, converted to f32.
  std::vector<float> vector(const std::string& name, int64_t n) {
    const gguf::TensorInfo* t = find(name, true);
    check_shape(*t, {n});
    if (n % dtype_block_size(t->type) != 0)
      throw Error(ErrorCode::CORRUPT_FILE, file_.path() + ": tensor '" + name + "' length is not a whole number of blocks");
    std::vector<float> v(static_cast<size_t>(n));
    dequantize_row(t->type, t->data, v.data(), n);
    m_.n_params += static_cast<uint64_t>(n);
    return v;
  }

 private:
  const gguf::File& file_;
  ModelImpl& m_;
};

int64_t required_int(const gguf::File& f, const std::string& key, int64_t lo, int64_t hi) {
  std::optional<int64_t> v = f.get_int(key);
  if (!v) throw Error(ErrorCode::CORRUPT_FILE, f.path() + ": missing metadata key '" + key + "'");
  if (*v < lo || *v > hi)
    throw Error(ErrorCode::CORRUPT_FILE, f.path() + ": metadata '" + key + "' = " + std::to_string(*v) +
                                             " is out of range [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return *v;
}

ModelConfig read_config(const gguf::File& f, int32_t n_vocab) {
  ModelConfig c;
  std::optional<std::string_view> arch = f.get_string("general.architecture");
  if (!arch) throw Error(ErrorCode::CORRUPT_FILE, f.path() + ": missing metadata key 'general.architecture'");
  if (*arch == "gpt2") c.arch = Arch::GPT2;
  else if (*arch == "llama") c.arch = Arch::LLAMA;
  else throw Error(ErrorCode::UNSUPPORTED, f.path() + ": architecture '" + std::string(*arch) + "' is not supported (gpt2, llama)");
  const std::string p = std::string(*arch) + ".";
  constexpr int64_t BIG = 1 << 20;
  c.n_vocab = n_vocab;
  c.n_ctx = static_cast<int32_t>(required_int(f, p + "context_length", 1, BIG));
  c.n_embd = static_cast<int32_t>(required_int(f, p + "embedding_length", 1, BIG));
  c.n_layer = static_cast<int32_t>(required_int(f, p + "block_count", 1, 4096));
  c.n_head = static_cast<int32_t>(required_int(f, p + "attention.head_count", 1, 4096));
  c.n_ff = static_cast<int32_t>(required_int(f, p + "feed_forward_length", 1, BIG));
  if (c.n_embd % c.n_head != 0)
    throw Error(ErrorCode::CORRUPT_FILE, f.path() + ": embedding_length " + std::to_string(c.n_embd) +
                                             " is not a multiple of head_count " + std::to_string(c.n_head));
  c.head_dim = c.n_embd / c.n_head;
  c.n_kv_head = c.n_head;
  if (c.arch == Arch::GPT2) {
    c.norm_eps = static_cast<float>(f.get_float(p + "attention.layer_norm_epsilon").value_or(1e-5));
  } else {
    c.n_kv_head = static_cast<int32_t>(f.get_int(p + "attention.head_count_kv").value_or(c.n_head));
    if (c.n_kv_head < 1 || c.n_head % c.n_kv_head != 0)
      throw Error(ErrorCode::CORRUPT_FILE, f.path() + ": attention.head_count_kv " + std::to_string(c.n_kv_head) +
                                               " does not divide head_count " + std::to_string(c.n_head));
    c.norm_eps = static_cast<float>(f.get_float(p + "attention.layer_norm_rms_epsilon").value_or(1e-5));
    c.rope_dim = static_cast<int32_t>(f.get_int(p + "rope.dimension_count").value_or(c.head_dim));
    if (c.rope_dim < 0 || c.rope_dim > c.head_dim || c.rope_dim % 2 != 0)
      throw Error(ErrorCode::CORRUPT_FILE, f.path() + ": rope.dimension_count " + std::to_string(c.rope_dim) +
                                               " must be even and at most head_dim " + std::to_string(c.head_dim));
    c.rope_base = static_cast<float>(f.get_float(p + "rope.freq_base").value_or(10000.0));
    if (!(c.rope_base > 0.0f))
      throw Error(ErrorCode::CORRUPT_FILE, f.path() + ": rope.freq_base must be positive");
  }
  if (!(c.norm_eps > 0.0f) || !std::isfinite(c.norm_eps))
    throw Error(ErrorCode::CORRUPT_FILE, f.path() + ": normalization epsilon must be positive");
  return c;
}

void bind_weights(const gguf::File& f, ModelImpl& m) {
  const ModelConfig& c = m.config;
  TensorBinder b(f, m);
  const int64_t d = c.n_embd, kv = c.kv_dim(), ff = c.n_ff;
  m.token_embd = b.matrix("token_embd.weight", d, c.n_vocab);
  m.output_norm_w = b.vector("output_norm.weight", d);
  m.output = b.matrix("output.weight", d, c.n_vocab, /*required=*/false);
  if (!m.output.data) m.output = m.token_embd;  // tied
  if (c.arch == Arch::GPT2) {
    m.position_embd = b.matrix("position_embd.weight", d, c.n_ctx);
    m.output_norm_b = b.vector("output_norm.bias", d);
  }
  m.layers.resize(static_cast<size_t>(c.n_layer));
  for (int il = 0; il < c.n_layer; ++il) {
    detail::LayerWeights& L = m.layers[static_cast<size_t>(il)];
    const std::string p = "blk." + std::to_string(il) + ".";
    L.attn_norm_w = b.vector(p + "attn_norm.weight", d);
    L.ffn_norm_w = b.vector(p + "ffn_norm.weight", d);
    L.attn_out = b.matrix(p + "attn_output.weight", d, d);
    L.ffn_up = b.matrix(p + "ffn_up.weight", d, ff);
    L.ffn_down = b.matrix(p + "ffn_down.weight", ff, d);
    if (c.arch == Arch::GPT2) {
      L.attn_norm_b = b.vector(p + "attn_norm.bias", d);
      L.ffn_norm_b = b.vector(p + "ffn_norm.bias", d);
      L.attn_qkv = b.matrix(p + "attn_qkv.weight", d, 3 * d);
      L.attn_qkv_b = b.vector(p + "attn_qkv.bias", 3 * d);
      L.attn_out_b = b.vector(p + "attn_output.bias", d);
      L.ffn_up_b = b.vector(p + "ffn_up.bias", ff);
      L.ffn_down_b = b.vector(p + "ffn_down.bias", d);
    } else {
      L.attn_q = b.matrix(p + "attn_q.weight", d, d);
      L.attn_k = b.matrix(p + "attn_k.weight", d, kv);
      L.attn_v = b.matrix(p + "attn_v.weight", d, kv);
      L.ffn_gate = b.matrix(p + "ffn_gate.weight", d, ff);
    }
  }
  m.weight_type = m.layers.empty() ? m.token_embd.type : m.layers[0].attn_out.type;
}

// Hash of the hyperparameters and every tensor (name, type, shape, bytes). Tensors are hashed
// in parallel, then their hashes are combined in file order.
uint64_t compute_fingerprint(const gguf::File& f, const ModelConfig& c) {
  const std::vector<gguf::TensorInfo>& ts = f.tensors();
  std::vector<uint64_t> h(ts.size());
#pragma omp parallel for schedule(dynamic)
  for (size_t i = 0; i < ts.size(); ++i) h[i] = XXH3_64bits(ts[i].data, ts[i].n_bytes);
  XXH3_state_t* st = XXH3_createState();
  XXH3_64bits_reset(st);
  const int32_t hp[] = {static_cast<int32_t>(c.arch), c.n_vocab, c.n_ctx, c.n_embd, c.n_layer, c.n_head,
                        c.n_kv_head, c.head_dim, c.n_ff, c.rope_dim};
  const float hf[] = {c.norm_eps, c.rope_base};
  XXH3_64bits_update(st, hp, sizeof(hp));
  XXH3_64bits_update(st, hf, sizeof(hf));
  for (size_t i = 0; i < ts.size(); ++i) {
    XXH3_64bits_update(st, ts[i].name.data(), ts[i].name.size() + 1);
    const uint32_t type = static_cast<uint32_t>(ts[i].type);
    XXH3_64bits_update(st, &type, sizeof(type));
    XXH3_64bits_update(st, ts[i].ne.data(), ts[i].ne.size() * sizeof(int64_t));
    XXH3_64bits_update(st, &h[i], sizeof(h[i]));
  }
  const uint64_t out = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  return out;
}

}  // namespace

namespace detail {
ModelImpl::~ModelImpl() {
  if (file != nullptr) matmul_weights_released(file->bytes());
}
}  // namespace detail

Model::Model(std::unique_ptr<ModelImpl> impl) : impl_(std::move(impl)) {}
Model::~Model() = default;

const char* weight_placement_name(WeightPlacement p) {
  switch (p) {
    case WeightPlacement::AUTO: return "auto";
    case WeightPlacement::MAPPED: return "mmap";
    case WeightPlacement::MEMORY: return "memory";
  }
  return "?";
}

std::optional<WeightPlacement> weight_placement_from_name(std::string_view s) {
  for (WeightPlacement p : {WeightPlacement::AUTO, WeightPlacement::MAPPED, WeightPlacement::MEMORY}) {
    if (s == weight_placement_name(p)) return p;
  }
  return std::nullopt;
}

namespace detail {

WeightPlacement auto_placement(uint64_t file_bytes, uint64_t available_bytes, bool huge_pages) {
  // Decode gained 1.05-1.11x on 250-500 MB models (llama-110m f16, gpt2-124m f32) and 1.1-1.7x
  // on 1.2-4.4 GB ones (tinyllama-1.1b) in alternating runs (bench/weights.sh). Weights this
  // small are read from the caches more than from memory, so they stay mapped.
  constexpr uint64_t MIN_BYTES = uint64_t{64} << 20;
  if (!huge_pages || file_bytes < MIN_BYTES || available_bytes == 0) return WeightPlacement::MAPPED;
  return file_bytes <= available_bytes / 2 ? WeightPlacement::MEMORY : WeightPlacement::MAPPED;
}

}  // namespace detail

namespace {

// MemAvailable from /proc/meminfo in bytes; 0 if it cannot be read.
uint64_t memory_available() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  uint64_t kib = 0;
  std::string unit;
  while (in >> key >> kib >> unit) {
    if (key == "MemAvailable:") return kib << 10;
  }
  return 0;
}

// Whether transparent huge pages can be had with MADV_HUGEPAGE ("always" or "madvise").
bool huge_pages_available() {
  std::ifstream in("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string modes;
  std::getline(in, modes);
  return modes.find("[always]") != std::string::npos || modes.find("[madvise]") != std::string::npos;
}

// Where AUTO puts the weights of the file at `path` (MAPPED if it cannot be sized: open reports that).
gguf::Placement placement_for(const std::string& path, WeightPlacement asked) {
  if (asked == WeightPlacement::MEMORY) return gguf::Placement::MEMORY;
  if (asked == WeightPlacement::MAPPED) return gguf::Placement::MAPPED;
  struct stat st {};
  if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return gguf::Placement::MAPPED;
  const WeightPlacement p =
      detail::auto_placement(static_cast<uint64_t>(st.st_size), memory_available(), huge_pages_available());
  return p == WeightPlacement::MEMORY ? gguf::Placement::MEMORY : gguf::Placement::MAPPED;
}

std::unique_ptr<gguf::File> open_weights(const std::string& path, WeightPlacement asked) {
  const gguf::Placement p = placement_for(path, asked);
  if (p == gguf::Placement::MEMORY && asked == WeightPlacement::AUTO) {
    try {
      return gguf::File::open(path, p);
    } catch (const Error& e) {
      if (e.code() != ErrorCode::OUT_OF_MEMORY) throw;  // AUTO falls back to the mapping only for memory
    }
    return gguf::File::open(path, gguf::Placement::MAPPED);
  }
  return gguf::File::open(path, p);
}

}  // namespace

std::shared_ptr<Model> Model::load(const std::string& path, const LoadOptions& options) {
  auto m = std::make_unique<ModelImpl>();
  m->path = path;
  m->file = open_weights(path, options.weights);
  matmul_weights_fixed(m->file->bytes());  // read only from here on: bf16 products may pack it
  m->tokenizer = load_tokenizer(*m->file);
  m->config = read_config(*m->file, m->tokenizer->n_vocab());
  bind_weights(*m->file, *m);
  m->fingerprint = compute_fingerprint(*m->file, m->config);
  return std::shared_ptr<Model>(new Model(std::move(m)));
}

const ModelConfig& Model::config() const { return impl_->config; }
const Tokenizer& Model::tokenizer() const { return *impl_->tokenizer; }
const std::string& Model::path() const { return impl_->path; }
uint64_t Model::fingerprint() const { return impl_->fingerprint; }
uint64_t Model::tokenizer_fingerprint() const { return impl_->tokenizer->fingerprint(); }
std::string Model::weight_type_name() const { return dtype_name(impl_->weight_type); }
uint64_t Model::n_params() const { return impl_->n_params; }
WeightPlacement Model::weight_placement() const {
  return impl_->file->placement() == gguf::Placement::MEMORY ? WeightPlacement::MEMORY : WeightPlacement::MAPPED;
}

}  // namespace backprompt
