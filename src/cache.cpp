// backprompt::Cache: texts, tokenization by policy, batched evaluation, statistics.
#include "backprompt/cache.h"

#include "backprompt/error.h"
#include "cache/cache_impl.h"

namespace backprompt {

using detail::CacheImpl;
using detail::Segment;

namespace detail {

const std::vector<int32_t>& CacheImpl::segment_tokens(const std::string& s, bool at_start) {
  auto key = std::make_pair(s, at_start);
  auto it = segment_memo_.find(key);
  if (it != segment_memo_.end()) return it->second;
  EncodeOptions opt;
  opt.add_bos = false;
  opt.add_space_prefix = at_start;
  return segment_memo_.emplace(std::move(key), model->tokenizer().encode(s, opt)).first->second;
}

std::vector<int32_t> CacheImpl::tokenize(const std::vector<std::shared_ptr<const Segment>>& segs) {
  if (options.policy == TokenizePolicy::JOINED) return tokenize_joined(segs);
  const Tokenizer& tok = model->tokenizer();
  std::vector<int32_t> out;
  if (tok.add_bos() && tok.bos() >= 0) out.push_back(tok.bos());
  bool at_start = true;  // BOS and the "▁" prefix belong to the start of the whole text only
  for (const auto& s : segs) {
    const std::vector<int32_t>& t = s->is_tokens ? s->tokens : segment_tokens(s->text, at_start);
    out.insert(out.end(), t.begin(), t.end());
    if (s->is_tokens ? !s->tokens.empty() : !s->text.empty()) at_start = false;
  }
  return out;
}

std::vector<int32_t> CacheImpl::tokenize_joined(const std::vector<std::shared_ptr<const Segment>>& segs) const {
  const Tokenizer& tok = model->tokenizer();
  std::vector<int32_t> out;
  if (tok.add_bos() && tok.bos() >= 0) out.push_back(tok.bos());
  bool at_start = true;
  std::string run;  // consecutive string segments are tokenized together
  auto flush = [&] {
    if (run.empty()) return;
    EncodeOptions opt;
    opt.add_space_prefix = at_start;
    const std::vector<int32_t> t = tok.encode(run, opt);
    out.insert(out.end(), t.begin(), t.end());
    run.clear();
    at_start = false;
  };
  for (const auto& s : segs) {
    if (!s->is_tokens) {
      run += s->text;
      continue;
    }
    flush();
    out.insert(out.end(), s->tokens.begin(), s->tokens.end());
    if (!s->tokens.empty()) at_start = false;
  }
  flush();
  return out;
}

}  // namespace detail

Cache::Cache(std::shared_ptr<const Model> model, CacheOptions options) {
  if (!model) throw Error(ErrorCode::INVALID_ARGUMENT, "cache: no model");
  impl_ = std::make_shared<CacheImpl>(std::move(model), options);
}

Cache::~Cache() { flush(); }

void Cache::flush() {
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  if (impl_->writer) impl_->writer->flush();
}

static Text make_text(const std::shared_ptr<CacheImpl>& impl, std::shared_ptr<const Segment> seg) {
  auto segs = std::make_shared<std::vector<std::shared_ptr<const Segment>>>();
  segs->push_back(std::move(seg));
  Text t(impl, std::move(segs));
  if (impl->options.eager && !t.tokens().empty()) t.next_logits();  // no tokens: nothing to compute
  return t;
}

Text Cache::text(std::string s) {
  auto seg = std::make_shared<Segment>();
  seg->text = std::move(s);
  return make_text(impl_, std::move(seg));
}

Text Cache::tokens(std::vector<int32_t> ids) {
  const Tokenizer& tok = impl_->model->tokenizer();
  for (int32_t id : ids)
    if (id < 0 || id >= tok.n_vocab())
      throw Error(ErrorCode::INVALID_ARGUMENT, "cache: token id " + std::to_string(id) + " is outside the vocabulary (" +
                                                   std::to_string(tok.n_vocab()) + ")");
  auto seg = std::make_shared<Segment>();
  seg->text = tok.decode(ids);
  seg->tokens = std::move(ids);
  seg->is_tokens = true;
  return make_text(impl_, std::move(seg));
}

void Cache::eval(std::span<const Text> texts, const EvalOptions& options) {
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  std::vector<detail::EvalRequest> reqs;
  for (const Text& t : texts) {
    if (t.cache_impl() != impl_) throw Error(ErrorCode::INVALID_ARGUMENT, "cache: a text belongs to another cache");
    detail::EvalRequest r;
    r.tokens = impl_->tokenize(t.segment_list());
    r.logprobs = options.logprobs;
    r.logprobs_from = std::max<size_t>(1, options.logprobs_from);
    if (!r.tokens.empty()) reqs.push_back(std::move(r));
  }
  if (reqs.empty()) return;
  std::vector<std::vector<detail::Node*>> paths = impl_->evaluate(reqs);
  impl_->release_paths(paths);
}

CacheStats Cache::stats() const {
  std::lock_guard<std::recursive_mutex> lock(impl_->mu);
  CacheStats s = impl_->stats;
  s.n_nodes = impl_->tree.n_nodes();
  s.bytes = impl_->tree.bytes();
  return s;
}

const Model& Cache::model() const { return *impl_->model; }
const CacheOptions& Cache::options() const { return impl_->options; }

}  // namespace backprompt
