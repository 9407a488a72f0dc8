// backprompt::Text: concatenation, tokens, and outputs served through the cache.
#include "backprompt/text.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "backprompt/error.h"
#include "cache/cache_impl.h"
#include "model/reserved_buffer.h"
#include "model/sampler.h"

namespace backprompt {

using detail::CacheImpl;
using detail::HeldPath;
using detail::Node;
using detail::Segment;
using SegmentList = std::vector<std::shared_ptr<const Segment>>;

Text::Text(std::shared_ptr<CacheImpl> cache, std::shared_ptr<const SegmentList> segs)
    : cache_(std::move(cache)), segs_(std::move(segs)) {}

const SegmentList& Text::segment_list() const {
  static const SegmentList empty;
  return segs_ ? *segs_ : empty;
}

std::string Text::string() const {
  std::string s;
  for (const auto& seg : segment_list()) s += seg->text;
  return s;
}

std::vector<std::string> Text::segments() const {
  std::vector<std::string> out;
  for (const auto& seg : segment_list()) out.push_back(seg->text);
  return out;
}

static CacheImpl& need_cache(const std::shared_ptr<CacheImpl>& c) {
  if (!c) throw Error(ErrorCode::INVALID_ARGUMENT, "text: this text belongs to no cache");
  return *c;
}

std::vector<int32_t> Text::tokens() const {
  CacheImpl& c = need_cache(cache_);
  std::lock_guard<std::recursive_mutex> lock(c.mu);
  return c.tokenize(segment_list());
}

namespace {

Text concat(const Text& a, const Text& b) {
  if (a.cache_impl() && b.cache_impl() && a.cache_impl() != b.cache_impl())
    throw Error(ErrorCode::INVALID_ARGUMENT, "text: cannot concatenate texts of different caches");
  auto segs = std::make_shared<SegmentList>(a.segment_list());
  segs->insert(segs->end(), b.segment_list().begin(), b.segment_list().end());
  const std::shared_ptr<CacheImpl>& cache = a.cache_impl() ? a.cache_impl() : b.cache_impl();
  Text t(cache, std::move(segs));
  if (cache && cache->options.eager && !t.tokens().empty()) t.next_logits();
  return t;
}

Text with_string(const std::shared_ptr<CacheImpl>& cache, std::string_view s) {
  auto seg = std::make_shared<Segment>();
  seg->text = std::string(s);
  return Text(cache, std::make_shared<SegmentList>(SegmentList{std::move(seg)}));
}

}  // namespace

Text operator+(const Text& a, const Text& b) { return concat(a, b); }
Text operator+(const Text& a, std::string_view b) { return concat(a, with_string(a.cache_impl(), b)); }
Text operator+(std::string_view a, const Text& b) { return concat(with_string(b.cache_impl(), a), b); }

std::vector<float> Text::next_logits() const {
  CacheImpl& c = need_cache(cache_);
  std::lock_guard<std::recursive_mutex> lock(c.mu);
  detail::EvalRequest req;
  req.tokens = c.tokenize(segment_list());
  HeldPath held(c, req);
  return held.last().last_logits;
}

std::vector<float> Text::logprobs(size_t begin) const {
  CacheImpl& c = need_cache(cache_);
  std::lock_guard<std::recursive_mutex> lock(c.mu);
  begin = std::max<size_t>(begin, 1);
  detail::EvalRequest req;
  req.tokens = c.tokenize(segment_list());
  if (req.tokens.size() <= begin) return {};
  req.logprobs = true;
  req.logprobs_from = begin;
  HeldPath held(c, req);
  std::vector<float> out;
  for (const Node* n : held.nodes())
    for (int32_t i = 0; i < n->n_tokens(); ++i)
      if (static_cast<size_t>(n->pos0 + i) >= begin) out.push_back(n->logprobs[static_cast<size_t>(i)]);
  return out;
}

Text Text::generate(int32_t n, const SamplingParams& sampling, const std::function<bool(int32_t)>& on_token,
                    uint64_t* rng_state_out) const {
  CacheImpl& c = need_cache(cache_);
  std::lock_guard<std::recursive_mutex> lock(c.mu);
  if (n < 0) throw Error(ErrorCode::INVALID_ARGUMENT, "generate: n must not be negative");
  const ModelConfig& cfg = c.model->config();
  const int64_t kv = cfg.kv_dim();
  detail::EvalRequest req;
  req.tokens = c.tokenize(segment_list());
  const std::vector<int32_t> prompt = req.tokens;
  n = std::min<int32_t>(n, cfg.n_ctx - static_cast<int32_t>(prompt.size()));
  if (n <= 0) return *this;

  std::vector<int32_t> gen;          // [n_gen]
  std::vector<float> gen_logprobs;   // [n_gen] log p(gen[t] | before)
  // [n_layer][n][kv_dim] each; committed as the tokens are generated (generation may stop early)
  detail::ReservedFloats k(static_cast<size_t>(cfg.n_layer) * n * kv), v(k.size());
  std::vector<float> logits;
  {
    HeldPath held(c, req);
    logits = held.last().last_logits;
    std::vector<KvSpanView> chain;
    for (const Node* node : held.nodes()) chain.push_back(node->view());
    Sampler sampler(sampling);
    const int32_t eos = c.model->tokenizer().eos();
    for (int32_t t = 0; t < n; ++t) {
      const int32_t tok = sampler.sample(logits);
      float m = -INFINITY;
      for (float x : logits) m = std::max(m, x);
      double s = 0.0;
      for (float x : logits) s += std::exp(static_cast<double>(x - m));
      gen_logprobs.push_back(logits[static_cast<size_t>(tok)] - m - static_cast<float>(std::log(s)));
      gen.push_back(tok);
      const bool go_on = !on_token || on_token(tok);
      std::vector<KvSpanView> past = chain;
      if (t > 0) past.push_back({k.data(), v.data(), t, static_cast<int64_t>(n) * kv});
      ForwardSpan sp;
      sp.past = past;
      sp.tokens = std::span<const int32_t>(&gen.back(), 1);
      sp.pos0 = static_cast<int32_t>(prompt.size()) + t;
      sp.k_out = k.data() + t * kv;
      sp.v_out = v.data() + t * kv;
      sp.out_layer_stride = static_cast<int64_t>(n) * kv;
      sp.logits = LogitsMode::LAST;
      sp.logits_out = logits.data();
      forward(*c.model, std::span<const ForwardSpan>(&sp, 1));
      ++c.stats.forward_calls;
      ++c.stats.tokens_computed;
      if (tok == eos || !go_on) break;
    }
    if (rng_state_out) *rng_state_out = sampler.rng_state();
  }

  // Put the generated span into the tree: any part already there stays as it is.
  std::vector<int32_t> all = prompt;
  all.insert(all.end(), gen.begin(), gen.end());
  c.insert_computed(all, static_cast<int32_t>(prompt.size()), k.data(), v.data(), static_cast<int64_t>(n) * kv, gen_logprobs,
                    logits);

  auto seg = std::make_shared<Segment>();
  seg->tokens = gen;
  seg->text = c.model->tokenizer().decode(gen);
  seg->is_tokens = true;
  auto segs = std::make_shared<SegmentList>(segment_list());
  segs->push_back(std::move(seg));
  return Text(cache_, std::move(segs));
}

void Text::pin() const {
  CacheImpl& c = need_cache(cache_);
  std::lock_guard<std::recursive_mutex> lock(c.mu);
  detail::EvalRequest req;
  req.tokens = c.tokenize(segment_list());
  if (req.tokens.empty()) return;
  HeldPath held(c, req);
  for (Node* n : held.nodes()) ++n->pins;
}

void Text::unpin() const {
  CacheImpl& c = need_cache(cache_);
  std::lock_guard<std::recursive_mutex> lock(c.mu);
  const std::vector<int32_t> toks = c.tokenize(segment_list());
  if (toks.empty()) return;
  int32_t matched = 0;
  std::vector<Node*> path = c.tree.match(toks, &matched);
  bool pinned = matched == static_cast<int32_t>(toks.size());
  for (Node* n : path) pinned = pinned && n->pins > 0;
  if (!pinned) throw Error(ErrorCode::INVALID_ARGUMENT, "text: unpin() of a text that is not pinned");
  for (Node* n : path) --n->pins;
}

std::vector<Seam> Text::seam_report() const {
  CacheImpl& c = need_cache(cache_);
  std::lock_guard<std::recursive_mutex> lock(c.mu);
  const Tokenizer& tok = c.model->tokenizer();
  const SegmentList& segs = segment_list();
  std::vector<Seam> out;
  size_t offset = 0;
  bool at_start = true;
  for (size_t i = 0; i < segs.size(); ++i) {
    const Segment& s = *segs[i];
    if (i > 0 && !at_start && !s.is_tokens && !segs[i - 1]->is_tokens && !s.text.empty() && !segs[i - 1]->text.empty()) {
      const Segment& p = *segs[i - 1];
      const bool prev_at_start = offset == p.text.size();  // was the previous segment the first text?
      EncodeOptions first, rest;
      first.add_space_prefix = prev_at_start;
      rest.add_space_prefix = false;
      std::vector<int32_t> split = tok.encode(p.text, first);
      const std::vector<int32_t> right = tok.encode(s.text, rest);
      split.insert(split.end(), right.begin(), right.end());
      const std::vector<int32_t> joined = tok.encode(p.text + s.text, first);
      if (split != joined) out.push_back({i, offset, split, joined});
    }
    offset += s.text.size();
    if (!s.text.empty()) at_start = false;
  }
  return out;
}

}  // namespace backprompt
