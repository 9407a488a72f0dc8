// Tokenizer tests: algorithms on hand-made vocabularies, then real vocabularies (GPT-2, Llama
// SentencePiece, Phi-3, TinyStories) against llama.cpp's fixture files and llama2.c's encoder.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "backprompt/error.h"
#include "backprompt/tokenizer.h"
#include "gguf/gguf.h"
#include "test_util.h"
#include "tokenizer/bpe.h"
#include "tokenizer/load.h"
#include "tokenizer/pretokenize.h"
#include "tokenizer/utf8.h"

namespace backprompt {
namespace {

using Ids = std::vector<int32_t>;

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<std::string> split(const std::string& s, const std::string& sep) {
  std::vector<std::string> parts;
  size_t pos = 0;
  for (size_t next; (next = s.find(sep, pos)) != std::string::npos; pos = next + sep.size()) {
    parts.push_back(s.substr(pos, next - pos));
  }
  parts.push_back(s.substr(pos));
  return parts;
}

Ids parse_ids(const std::string& line) {
  Ids ids;
  std::istringstream in(line);
  for (int32_t id; in >> id;) ids.push_back(id);
  return ids;
}

template <typename F>
ErrorCode error_code_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.code();
  }
  ADD_FAILURE() << "no Error thrown";
  return ErrorCode::IO_ERROR;
}

// ---------------------------------------------------------------------------------------------
// Hand-made vocabularies

std::string mapped(std::string_view bytes) {  // GPT-2's byte-to-unicode text of `bytes`
  std::string out;
  for (char c : bytes) utf8::append(out, gpt2_byte_to_codepoint(static_cast<uint8_t>(c)));
  return out;
}

// A byte-level vocabulary: the 256 byte tokens (id = byte), then `extra` tokens, then merges.
TokenizerData toy_bpe(const std::vector<std::string>& extra, const std::vector<std::string>& merges,
                      const std::string& pre = "gpt-2") {
  TokenizerData d;
  d.kind = TokenizerKind::GPT2_BPE;
  d.pre = pre;
  for (int b = 0; b < 256; ++b) d.tokens.push_back(mapped(std::string(1, static_cast<char>(b))));
  for (const std::string& t : extra) d.tokens.push_back(t);
  d.merges = merges;
  return d;
}

const std::string SPACE_MARK = "\xE2\x96\x81";  // "▁"

// A SentencePiece vocabulary: <unk>, <s>, </s>, 256 byte tokens (id 3 + byte), then `pieces`.
TokenizerData toy_spm(const std::vector<std::pair<std::string, float>>& pieces) {
  TokenizerData d;
  d.kind = TokenizerKind::LLAMA_SPM;
  d.pre = "default";
  d.tokens = {"<unk>", "<s>", "</s>"};
  d.scores = {0, 0, 0};
  d.token_types = {2, 3, 3};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    d.tokens.push_back(name);
    d.scores.push_back(0);
    d.token_types.push_back(static_cast<int32_t>(TokenType::BYTE));
  }
  for (const auto& [text, score] : pieces) {
    d.tokens.push_back(text);
    d.scores.push_back(score);
    d.token_types.push_back(static_cast<int32_t>(TokenType::NORMAL));
  }
  d.unk_id = 0;
  d.bos_id = 1;
  d.eos_id = 2;
  d.add_bos = true;
  return d;
}

TEST(TokenizerBpe, ByteToUnicodeMapping) {
  EXPECT_EQ(gpt2_byte_to_codepoint('!'), uint32_t('!'));
  EXPECT_EQ(gpt2_byte_to_codepoint('~'), uint32_t('~'));
  EXPECT_EQ(gpt2_byte_to_codepoint(0xA1), 0xA1u);
  EXPECT_EQ(gpt2_byte_to_codepoint(0xFF), 0xFFu);
  EXPECT_EQ(gpt2_byte_to_codepoint(0), 0x100u);
  EXPECT_EQ(gpt2_byte_to_codepoint('\n'), 0x10Au);  // "Ċ"
  EXPECT_EQ(gpt2_byte_to_codepoint(' '), 0x120u);   // "Ġ"
  EXPECT_EQ(gpt2_byte_to_codepoint(0x7F), 0x121u);
  EXPECT_EQ(gpt2_byte_to_codepoint(0xAD), 0x143u);
  std::vector<bool> seen(0x200, false);
  for (int b = 0; b < 256; ++b) {
    const uint32_t cp = gpt2_byte_to_codepoint(static_cast<uint8_t>(b));
    ASSERT_LT(cp, seen.size());
    EXPECT_FALSE(seen[cp]) << "byte " << b;
    seen[cp] = true;
  }
}

TEST(TokenizerBpe, MergesByRankThenLeftmost) {
  // ids 256.. : "bc", "ab", "aa", "aaaa"; ranks in the order of the merges.
  const Tokenizer tok(toy_bpe({"bc", "ab", "aa", "aaaa"}, {"b c", "a b", "a a", "aa aa"}));
  EXPECT_EQ(tok.encode("abc"), (Ids{'a', 256}));    // "b c" (rank 0) before "a b" (rank 1)
  EXPECT_EQ(tok.encode("ab"), (Ids{257}));
  EXPECT_EQ(tok.encode("aab"), (Ids{'a', 257}));    // "a b" (rank 1) before "a a" (rank 2)
  EXPECT_EQ(tok.encode("aaa"), (Ids{258, 'a'}));    // equal ranks: leftmost pair first
  EXPECT_EQ(tok.encode("aaaaa"), (Ids{259, 'a'}));  // aa a a a -> aa aa a -> aaaa a
  EXPECT_EQ(tok.encode("ab ab"), (Ids{257, ' ', 257}));  // " ab" is a word of its own, no merge with space
  EXPECT_EQ(tok.decode(tok.encode("aaaaab abc")), "aaaaab abc");
  EXPECT_TRUE(tok.encode("").empty());
}

TEST(TokenizerBpe, Llama3IgnoresMergesForWholeTokens) {
  // "abc" is a token that no merge produces; Llama 3 takes a word that is a token as is.
  const std::vector<std::string> extra = {"ab", "abc"};
  const std::vector<std::string> merges = {"a b"};
  const Tokenizer gpt2(toy_bpe(extra, merges, "gpt-2"));
  const Tokenizer llama3(toy_bpe(extra, merges, "llama-bpe"));
  EXPECT_EQ(gpt2.encode("abc"), (Ids{256, 'c'}));
  EXPECT_EQ(llama3.encode("abc"), (Ids{257}));
  EXPECT_EQ(llama3.encode("abcd"), (Ids{256, 'c', 'd'}));
}

TEST(TokenizerBpe, ControlTokensDecodeToNothing) {
  TokenizerData d = toy_bpe({"<|endoftext|>"}, {});
  d.token_types.assign(d.tokens.size(), static_cast<int32_t>(TokenType::NORMAL));
  d.token_types[256] = static_cast<int32_t>(TokenType::CONTROL);
  d.bos_id = d.eos_id = 256;
  const Tokenizer tok(std::move(d));
  EXPECT_EQ(tok.token_to_piece(256), "");
  EXPECT_EQ(tok.decode(Ids{'h', 256, 'i'}), "hi");
  // Special tokens in the text are text.
  EXPECT_EQ(tok.encode("<|endoftext|>").size(), 13u);
  EXPECT_EQ(tok.encode("hi", {.add_bos = true}), (Ids{256, 'h', 'i'}));
}

TEST(TokenizerSpm, MergesByScoreThenLeftmost) {
  // ids: 259 "▁", 260 "a", 261 "b", 262 "ab", 263 "▁a", 264 "aa", 265 "bb"
  const Tokenizer tok(toy_spm({{SPACE_MARK, -1}, {"a", -1}, {"b", -1}, {"ab", -2}, {SPACE_MARK + "a", -3},
                               {"aa", -2}, {"bb", -1.5f}}));
  EXPECT_EQ(tok.encode("ab", {.add_space_prefix = false}), (Ids{262}));
  EXPECT_EQ(tok.encode("ab"), (Ids{259, 262}));            // "ab" (-2) beats "▁a" (-3)
  EXPECT_EQ(tok.encode("a"), (Ids{263}));
  EXPECT_EQ(tok.encode("aaa", {.add_space_prefix = false}), (Ids{264, 260}));  // tie: leftmost
  EXPECT_EQ(tok.encode("abb", {.add_space_prefix = false}), (Ids{260, 265}));  // "bb" (-1.5) beats "ab" (-2)
  EXPECT_EQ(tok.encode("a b"), (Ids{263, 259, 261}));      // spaces become "▁"
  EXPECT_EQ(tok.encode("ab", {.add_bos = true}), (Ids{1, 259, 262}));
  EXPECT_TRUE(tok.encode("").empty());
  EXPECT_EQ(tok.encode("", {.add_bos = true}), (Ids{1}));
}

TEST(TokenizerSpm, ByteFallbackAndDecode) {
  const Tokenizer tok(toy_spm({{SPACE_MARK, -1}, {"a", -1}, {"\xC3\xA9", -1}}));  // "é" is a token, "ü" is not
  EXPECT_EQ(tok.encode("\xC3\xBC", {.add_space_prefix = false}), (Ids{3 + 0xC3, 3 + 0xBC}));
  EXPECT_EQ(tok.encode("\xC3\xA9", {.add_space_prefix = false}), (Ids{261}));
  EXPECT_EQ(tok.encode("\n"), (Ids{259, 3 + '\n'}));
  EXPECT_EQ(tok.token_to_piece(3 + 0x41), "A");
  EXPECT_EQ(tok.token_to_piece(259), " ");
  EXPECT_EQ(tok.token_to_piece(1), "");  // control
  for (const std::string text : {"a \xC3\xBC\n a", "  x", "\xFF\xC3(\xE2\x96", "a\xC3\xA9"}) {
    EXPECT_EQ(tok.decode(tok.encode(text), true), text);
    EXPECT_EQ(tok.decode(tok.encode(text, {.add_space_prefix = false})), text);
  }
  EXPECT_EQ(tok.decode(tok.encode("a", {.add_bos = true}), true), "a");
  EXPECT_EQ(tok.decode(tok.encode("a"), false), " a");
}

TEST(TokenizerSpm, UnknownTokenWithoutByteTokens) {
  TokenizerData d;
  d.kind = TokenizerKind::LLAMA_SPM;
  d.tokens = {"<unk>", "<s>", "</s>", SPACE_MARK, "a"};
  d.scores = {0, 0, 0, -1, -1};
  d.token_types = {2, 3, 3, 1, 1};
  d.unk_id = 0;
  const Tokenizer tok(std::move(d));
  EXPECT_EQ(tok.encode("a\xC3\xBC" "a"), (Ids{3, 4, 0, 4}));  // one <unk> for the whole character
}

TEST(TokenizerErrors, BadData) {
  EXPECT_EQ(error_code_of([] { Tokenizer t(toy_bpe({}, {}, "qwen2-nonsense")); }), ErrorCode::UNSUPPORTED);
  EXPECT_EQ(error_code_of([] { Tokenizer t(toy_bpe({"ab"}, {"ab"})); }), ErrorCode::CORRUPT_FILE);
  EXPECT_EQ(error_code_of([] { Tokenizer t(toy_bpe({"ab"}, {"a c"})); }), ErrorCode::CORRUPT_FILE);  // "ac" unknown
  EXPECT_EQ(error_code_of([] { Tokenizer t(toy_bpe({"ab"}, {"a x\xC4"})); }), ErrorCode::CORRUPT_FILE);
  EXPECT_EQ(error_code_of([] {
              TokenizerData d = toy_bpe({}, {});
              d.tokens.erase(d.tokens.begin() + 'q');  // a byte without a token
              Tokenizer t(std::move(d));
            }),
            ErrorCode::CORRUPT_FILE);
  EXPECT_EQ(error_code_of([] { Tokenizer t(TokenizerData{}); }), ErrorCode::CORRUPT_FILE);  // empty vocabulary
  EXPECT_EQ(error_code_of([] {
              TokenizerData d = toy_spm({});
              d.scores.pop_back();
              Tokenizer t(std::move(d));
            }),
            ErrorCode::CORRUPT_FILE);
  EXPECT_EQ(error_code_of([] {
              TokenizerData d = toy_spm({});
              d.token_types[5] = 9;
              Tokenizer t(std::move(d));
            }),
            ErrorCode::CORRUPT_FILE);
  EXPECT_EQ(error_code_of([] {
              TokenizerData d = toy_spm({});
              d.bos_id = static_cast<int32_t>(d.tokens.size());
              Tokenizer t(std::move(d));
            }),
            ErrorCode::CORRUPT_FILE);
  const Tokenizer tok(toy_spm({}));
  EXPECT_EQ(error_code_of([&] { tok.token_to_piece(-1); }), ErrorCode::INVALID_ARGUMENT);
  EXPECT_EQ(error_code_of([&] { tok.decode(Ids{1, tok.n_vocab()}); }), ErrorCode::INVALID_ARGUMENT);
  const Tokenizer no_bos(toy_bpe({}, {}));
  EXPECT_EQ(error_code_of([&] { no_bos.encode("x", {.add_bos = true}); }), ErrorCode::INVALID_ARGUMENT);
}

TEST(TokenizerFingerprint, CoversEverythingThatTokenizes) {
  const TokenizerData base = toy_spm({{SPACE_MARK, -1}, {"a", -1}, {"ab", -2}});
  const uint64_t fp = Tokenizer(base).fingerprint();
  EXPECT_EQ(Tokenizer(base).fingerprint(), fp);
  const auto differs = [&](auto change) {
    TokenizerData d = base;
    change(d);
    return Tokenizer(std::move(d)).fingerprint() != fp;
  };
  EXPECT_TRUE(differs([](TokenizerData& d) { d.scores.back() = -2.5f; }));
  EXPECT_TRUE(differs([](TokenizerData& d) { d.tokens.back() = "ba"; }));
  EXPECT_TRUE(differs([](TokenizerData& d) { d.token_types.back() = static_cast<int32_t>(TokenType::USER_DEFINED); }));
  EXPECT_TRUE(differs([](TokenizerData& d) { d.add_space_prefix = false; }));
  EXPECT_TRUE(differs([](TokenizerData& d) { d.add_bos = false; }));
  EXPECT_TRUE(differs([](TokenizerData& d) { d.eos_id = -1; }));
  EXPECT_TRUE(differs([](TokenizerData& d) { d.kind = TokenizerKind::GPT2_BPE, d.tokens = toy_bpe({}, {}).tokens,
                                                 d.scores.clear(), d.token_types.clear(); }));

  const TokenizerData bpe = toy_bpe({"ab", "bc"}, {"a b", "b c"});
  const uint64_t fp_bpe = Tokenizer(bpe).fingerprint();
  TokenizerData swapped = bpe;
  std::swap(swapped.merges[0], swapped.merges[1]);
  EXPECT_NE(Tokenizer(swapped).fingerprint(), fp_bpe);
  TokenizerData llama3 = bpe;
  llama3.pre = "llama-bpe";
  EXPECT_NE(Tokenizer(llama3).fingerprint(), fp_bpe);
  TokenizerData gpt2_default = bpe;
  gpt2_default.pre = "default";  // the same pre-tokenizer under another name
  EXPECT_EQ(Tokenizer(gpt2_default).fingerprint(), fp_bpe);
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizer regexes

std::vector<std::string> words_of(PreTokenizerKind kind, std::string_view text) {
  const PreTokenizer pre(kind);
  std::vector<std::string_view> words;
  pre.split(text, words);
  return {words.begin(), words.end()};
}

using Words = std::vector<std::string>;

TEST(TokenizerPre, Gpt2Words) {
  EXPECT_EQ(words_of(PreTokenizerKind::GPT2, "Hello world"), (Words{"Hello", " world"}));
  EXPECT_EQ(words_of(PreTokenizerKind::GPT2, "  Hello  world!!\n\n"),
            (Words{" ", " Hello", " ", " world", "!!", "\n\n"}));
  EXPECT_EQ(words_of(PreTokenizerKind::GPT2, "I'll've 'RE x1234"), (Words{"I", "'ll", "'ve", " '", "RE", " x", "1234"}));
  EXPECT_EQ(words_of(PreTokenizerKind::GPT2, "\xD0\xBD\xD0\xB5 42"), (Words{"\xD0\xBD\xD0\xB5", " 42"}));
  EXPECT_TRUE(words_of(PreTokenizerKind::GPT2, "").empty());
}

TEST(TokenizerPre, Llama3Words) {
  EXPECT_EQ(words_of(PreTokenizerKind::LLAMA3, "Hello 1234567"), (Words{"Hello", " ", "123", "456", "7"}));
  EXPECT_EQ(words_of(PreTokenizerKind::LLAMA3, "I'M here"), (Words{"I", "'M", " here"}));
  EXPECT_EQ(words_of(PreTokenizerKind::LLAMA3, "x!!\n\n  y"), (Words{"x", "!!\n\n", " ", " y"}));
  EXPECT_EQ(words_of(PreTokenizerKind::LLAMA3, "a \n\nb"), (Words{"a", " \n\n", "b"}));
  EXPECT_EQ(words_of(PreTokenizerKind::LLAMA3, "(hi"), (Words{"(hi"}));
}

TEST(TokenizerPre, InvalidUtf8AndLongRuns) {
  const std::string bad = "ab\xFF\xFE cd\xC3";
  const Words words = words_of(PreTokenizerKind::GPT2, bad);
  std::string joined;
  for (const std::string& w : words) joined += w;
  EXPECT_EQ(joined, bad);
  EXPECT_EQ(words, (Words{"ab", "\xFF\xFE", " cd", "\xC3"}));

  for (PreTokenizerKind kind : {PreTokenizerKind::GPT2, PreTokenizerKind::LLAMA3}) {
    const std::string spaces(300000, ' ');
    const Words w = words_of(kind, spaces + "x");
    ASSERT_EQ(w.size(), 2u);
    EXPECT_EQ(w[0].size(), spaces.size() - 1);
    EXPECT_EQ(w[1], " x");
  }
  EXPECT_FALSE(pre_tokenizer_from_name("bert").has_value());
  EXPECT_EQ(pre_tokenizer_from_name("default"), PreTokenizerKind::GPT2);
  EXPECT_EQ(pre_tokenizer_from_name("llama3"), PreTokenizerKind::LLAMA3);
}

// ---------------------------------------------------------------------------------------------
// Real vocabularies

#define REQUIRE_DATA(path, rel)                                                          \
  const std::string path = testing::test_data_file(rel);                                 \
  if (path.empty()) GTEST_SKIP() << "test data " << rel << " not found (set BACKPROMPT_TEST_DATA)"

std::unique_ptr<Tokenizer> load(const std::string& path) {
  const auto file = gguf::File::open(path);
  return load_tokenizer(*file);
}

struct Fixture {
  std::vector<std::string> inputs;
  std::vector<Ids> expected;
};

// llama.cpp's test vectors: inputs separated by "\n__ggml_vocab_test__\n", one line of ids each.
Fixture read_fixture(const std::string& gguf_path) {
  Fixture f;
  f.inputs = split(read_file(gguf_path + ".inp"), "\n__ggml_vocab_test__\n");
  for (const std::string& line : split(read_file(gguf_path + ".out"), "\n")) f.expected.push_back(parse_ids(line));
  return f;
}

// Every fixture line is its own assertion; returns how many matched.
void check_fixture(const Tokenizer& tok, const std::string& gguf_path, const char* name) {
  const Fixture f = read_fixture(gguf_path);
  ASSERT_EQ(f.inputs.size(), 47u);
  ASSERT_EQ(f.expected.size(), f.inputs.size());
  size_t n_match = 0;
  for (size_t i = 0; i < f.inputs.size(); ++i) {
    const Ids got = tok.encode(f.inputs[i]);
    EXPECT_EQ(got, f.expected[i]) << name << " line " << i + 1 << ": '" << f.inputs[i] << "'";
    n_match += got == f.expected[i];
  }
  std::cout << "[ fixture  ] " << name << ": " << n_match << "/" << f.inputs.size() << " lines match\n";
}

void check_round_trip(const Tokenizer& tok, const std::string& gguf_path) {
  const Fixture f = read_fixture(gguf_path);
  const bool spm = tok.kind() == TokenizerKind::LLAMA_SPM;
  for (size_t i = 0; i < f.inputs.size(); ++i) {
    EXPECT_EQ(tok.decode(tok.encode(f.inputs[i]), spm), f.inputs[i]) << "input " << i + 1;
    EXPECT_EQ(tok.decode(tok.encode(f.inputs[i], {.add_bos = true}), spm), f.inputs[i]) << "input " << i + 1;
  }
}

TEST(TokenizerGpt2, FixtureFromGguf) {
  REQUIRE_DATA(path, "ggml-vocab/ggml-vocab-gpt-2.gguf");
  const auto tok = load(path);
  EXPECT_EQ(tok->kind(), TokenizerKind::GPT2_BPE);
  EXPECT_EQ(tok->n_vocab(), 50257);
  EXPECT_EQ(tok->bos(), 50256);
  EXPECT_EQ(tok->eos(), 50256);
  EXPECT_FALSE(tok->add_bos());
  check_fixture(*tok, path, "gpt-2");
}

TEST(TokenizerGpt2, FixtureFromOpenAiFiles) {
  // The same vocabulary built from OpenAI's encoder.json and vocab.bpe, not through GGUF.
  REQUIRE_DATA(encoder, "gpt2-tokenizer/encoder.json");
  REQUIRE_DATA(vocab, "gpt2-tokenizer/vocab.bpe");
  REQUIRE_DATA(path, "ggml-vocab/ggml-vocab-gpt-2.gguf");
  const nlohmann::json j = nlohmann::json::parse(read_file(encoder));
  TokenizerData d;
  d.kind = TokenizerKind::GPT2_BPE;
  d.tokens.resize(j.size());
  for (const auto& [text, id] : j.items()) d.tokens.at(id.get<size_t>()) = text;
  const std::vector<std::string> lines = split(read_file(vocab), "\n");
  ASSERT_EQ(lines.at(0).rfind("#version", 0), 0u);
  for (size_t i = 1; i < lines.size(); ++i) {
    if (!lines[i].empty()) d.merges.push_back(lines[i]);
  }
  ASSERT_EQ(d.merges.size(), 50000u);
  const Tokenizer tok(std::move(d));
  check_fixture(tok, path, "gpt-2 (encoder.json)");
}

TEST(TokenizerGpt2, RoundTripAndHandCases) {
  REQUIRE_DATA(path, "ggml-vocab/ggml-vocab-gpt-2.gguf");
  const auto tok = load(path);
  check_round_trip(*tok, path);
  EXPECT_EQ(tok->encode("\n"), (Ids{198}));
  EXPECT_EQ(tok->encode("\n\n"), (Ids{628}));
  EXPECT_TRUE(tok->encode("").empty());
  EXPECT_EQ(tok->encode("Hello", {.add_bos = true}), (Ids{50256, 15496}));
  const Ids eot = tok->encode("<|endoftext|>");  // text, never the special token
  EXPECT_GT(eot.size(), 1u);
  EXPECT_EQ(std::count(eot.begin(), eot.end(), 50256), 0);
  EXPECT_EQ(tok->decode(eot), "<|endoftext|>");
  EXPECT_EQ(tok->token_to_piece(50256), "");             // control
  EXPECT_EQ(tok->token_to_piece(18435), " Hello");
  EXPECT_EQ(tok->token_to_piece(628), "\n\n");
  EXPECT_EQ(tok->decode(Ids{15496, 11, 995, 0}), "Hello, world!");
  for (const std::string& text : std::vector<std::string>{"\xFF", "\xC3", "ab\xFF\xFE cd\xC3", "\xE2\x82", "x \xF0\x9F\x98 \xED\xA0\x80 z",
                                  std::string("a\0b", 3)}) {
    const Ids ids = tok->encode(text);
    EXPECT_FALSE(ids.empty());
    EXPECT_EQ(tok->decode(ids), text);
  }
  for (int b = 0; b < 256; ++b) {
    const std::string text(1, static_cast<char>(b));
    EXPECT_EQ(tok->decode(tok->encode(text)), text) << "byte " << b;
  }
}

TEST(TokenizerLlamaSpm, Fixture) {
  REQUIRE_DATA(path, "ggml-vocab/ggml-vocab-llama-spm.gguf");
  const auto tok = load(path);
  EXPECT_EQ(tok->kind(), TokenizerKind::LLAMA_SPM);
  EXPECT_EQ(tok->n_vocab(), 32000);
  EXPECT_EQ(tok->bos(), 1);
  EXPECT_EQ(tok->eos(), 2);
  EXPECT_TRUE(tok->add_bos());
  check_fixture(*tok, path, "llama-spm");
  check_round_trip(*tok, path);
  EXPECT_EQ(tok->encode("Hello world", {.add_bos = true}), (Ids{1, 15043, 3186}));
  EXPECT_EQ(tok->encode("Hello world", {.add_space_prefix = false}), (Ids{10994, 3186}));
  const Ids bos_text = tok->encode("<s>");  // text, never the special token
  EXPECT_GT(bos_text.size(), 1u);
  EXPECT_EQ(std::count(bos_text.begin(), bos_text.end(), 1), 0);
  EXPECT_EQ(tok->token_to_piece(13), "\n");   // <0x0A>
  EXPECT_EQ(tok->token_to_piece(1), "");
  EXPECT_EQ(tok->decode(Ids{1, 15043, 3186}), " Hello world");
  EXPECT_EQ(tok->decode(Ids{1, 15043, 3186}, true), "Hello world");
}

TEST(TokenizerPhi3, Fixture) {
  REQUIRE_DATA(path, "ggml-vocab/ggml-vocab-phi-3.gguf");
  const auto tok = load(path);
  EXPECT_EQ(tok->n_vocab(), 32064);
  EXPECT_EQ(tok->eos(), 32000);
  check_fixture(*tok, path, "phi-3");
  check_round_trip(*tok, path);
  const Ids user = tok->encode("<|user|>");  // text, never the added token 32010
  EXPECT_GT(user.size(), 1u);
  for (int32_t id : user) EXPECT_LT(id, 32000);
  EXPECT_EQ(tok->decode(user, true), "<|user|>");
  EXPECT_EQ(tok->token_to_piece(32010), "");       // control
}

TEST(TokenizerGguf, LoaderErrors) {
  const std::string dir = testing::temp_dir();
  const auto write = [&](const std::string& name, const std::function<void(gguf::Writer&)>& fill) {
    gguf::Writer w;
    fill(w);
    const std::string path = dir + "/tok-" + name + ".gguf";
    w.write(path);
    return path;
  };
  const std::vector<std::string> tokens = {"<unk>", "<s>", "</s>", SPACE_MARK, "a"};
  const auto code = [&](const std::string& path) { return error_code_of([&] { load(path); }); };

  EXPECT_EQ(code(write("bert", [&](gguf::Writer& w) {
              w.set_string("tokenizer.ggml.model", "bert");
              w.set_string_array("tokenizer.ggml.tokens", tokens);
            })),
            ErrorCode::UNSUPPORTED);
  EXPECT_EQ(code(write("no-model", [&](gguf::Writer& w) { w.set_string_array("tokenizer.ggml.tokens", tokens); })),
            ErrorCode::CORRUPT_FILE);
  EXPECT_EQ(code(write("no-tokens", [&](gguf::Writer& w) { w.set_string("tokenizer.ggml.model", "llama"); })),
            ErrorCode::CORRUPT_FILE);
  EXPECT_EQ(code(write("tokens-type", [&](gguf::Writer& w) {
              w.set_string("tokenizer.ggml.model", "llama");
              w.set_f32_array("tokenizer.ggml.tokens", {1, 2});
            })),
            ErrorCode::CORRUPT_FILE);
  EXPECT_EQ(code(write("scores-size", [&](gguf::Writer& w) {
              w.set_string("tokenizer.ggml.model", "llama");
              w.set_string_array("tokenizer.ggml.tokens", tokens);
              w.set_f32_array("tokenizer.ggml.scores", {0, 0});
            })),
            ErrorCode::CORRUPT_FILE);
  EXPECT_EQ(code(write("bos-range", [&](gguf::Writer& w) {
              w.set_string("tokenizer.ggml.model", "llama");
              w.set_string_array("tokenizer.ggml.tokens", tokens);
              w.set_u32("tokenizer.ggml.bos_token_id", 5);
            })),
            ErrorCode::CORRUPT_FILE);
  EXPECT_EQ(code(write("pre", [&](gguf::Writer& w) {
              w.set_string("tokenizer.ggml.model", "gpt2");
              w.set_string("tokenizer.ggml.pre", "no-such-pre");
              w.set_string_array("tokenizer.ggml.tokens", toy_bpe({}, {}).tokens);
            })),
            ErrorCode::UNSUPPORTED);

  // Defaults: llama ids 0/1/2 and add_bos; "none" written as UINT32_MAX; add_space_prefix read.
  const auto tok = load(write("defaults", [&](gguf::Writer& w) {
    w.set_string("tokenizer.ggml.model", "llama");
    w.set_string_array("tokenizer.ggml.tokens", tokens);
    w.set_u32("tokenizer.ggml.eos_token_id", 0xFFFFFFFFu);
    w.set_bool("tokenizer.ggml.add_space_prefix", false);
  }));
  EXPECT_EQ(tok->bos(), 1);
  EXPECT_EQ(tok->eos(), -1);
  EXPECT_TRUE(tok->add_bos());
  EXPECT_EQ(tok->encode("a a"), (Ids{4, 3, 4}));
  const auto gpt2 = load(write("gpt2-defaults", [&](gguf::Writer& w) {
    w.set_string("tokenizer.ggml.model", "gpt2");
    w.set_string_array("tokenizer.ggml.tokens", toy_bpe({}, {}).tokens);
  }));
  EXPECT_FALSE(gpt2->add_bos());
  EXPECT_EQ(gpt2->bos(), -1);
  EXPECT_EQ(gpt2->encode("hi"), (Ids{'h', 'i'}));
}

// llama2.c's encoder (run.c), written out plainly over its tokenizer file tok512.bin: BOS, a
// " " dummy prefix, one token per character (or its bytes + 3), then repeatedly merge the best
// scoring adjacent pair. Quadratic, but independent of the implementation under test.
Ids llama2c_encode(const std::string& tok512_path, const std::string& text) {
  const std::string bin = read_file(tok512_path);
  size_t pos = 4;
  std::vector<std::string> vocab;
  std::vector<float> scores;
  for (int i = 0; i < 512; ++i) {
    float score;
    int32_t len;
    std::memcpy(&score, bin.data() + pos, 4);
    std::memcpy(&len, bin.data() + pos + 4, 4);
    vocab.push_back(bin.substr(pos + 8, static_cast<size_t>(len)));
    scores.push_back(score);
    pos += 8 + static_cast<size_t>(len);
  }
  const auto lookup = [&](const std::string& s) -> int32_t {
    for (size_t i = 0; i < vocab.size(); ++i) if (vocab[i] == s) return static_cast<int32_t>(i);
    return -1;
  };
  Ids ids = {1};
  if (!text.empty()) ids.push_back(lookup(" "));
  for (size_t i = 0; i < text.size();) {
    size_t j = i + 1;
    while (j < text.size() && (static_cast<uint8_t>(text[j]) & 0xC0) == 0x80 && j - i < 4) ++j;
    const int32_t id = lookup(text.substr(i, j - i));
    if (id >= 0) ids.push_back(id);
    else for (size_t k = i; k < j; ++k) ids.push_back(static_cast<uint8_t>(text[k]) + 3);
    i = j;
  }
  for (;;) {
    float best = -1e10f;
    int32_t best_id = -1;
    size_t best_at = 0;
    for (size_t i = 0; i + 1 < ids.size(); ++i) {
      const int32_t id = lookup(vocab[static_cast<size_t>(ids[i])] + vocab[static_cast<size_t>(ids[i + 1])]);
      if (id >= 0 && scores[static_cast<size_t>(id)] > best) best = scores[static_cast<size_t>(id)], best_id = id, best_at = i;
    }
    if (best_id < 0) break;
    ids[best_at] = best_id;
    ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(best_at) + 1);
  }
  return ids;
}

TEST(TokenizerStories260k, MatchesLlama2c) {
  REQUIRE_DATA(path, "stories260k/stories260K.gguf");
  REQUIRE_DATA(tok512, "stories260k/tok512.bin");
  const auto tok = load(path);
  EXPECT_EQ(tok->kind(), TokenizerKind::LLAMA_SPM);
  EXPECT_EQ(tok->n_vocab(), 512);
  EXPECT_TRUE(tok->add_bos());  // no add_bos_token key: llama's default
  // " The" "re" " was" " a" " big", as llama2.c prints them.
  EXPECT_EQ(tok->encode("There was a big", {.add_bos = true}), (Ids{1, 291, 276, 286, 261, 370}));
  for (const std::string text :
       {"There was a big", "Once upon a time, there was a little girl named Lily.",
        "Lily's mom said, \"Let's go to the park.\"\nThey went.", "  two  spaces, caf\xC3\xA9 \xE2\x9C\x85 x", ""}) {
    EXPECT_EQ(tok->encode(text, {.add_bos = true}), llama2c_encode(tok512, text)) << text;
    EXPECT_EQ(tok->decode(tok->encode(text, {.add_bos = true}), true), text);
  }
  EXPECT_EQ(tok->decode(Ids{1, 291, 276, 286, 261, 370}, true), "There was a big");
}

TEST(TokenizerSpeed, LongInputsAreNotQuadratic) {
  // 200k characters in one word: a quadratic merge loop would take minutes.
  const std::string word(200000, 'a');
  const auto start = std::chrono::steady_clock::now();
  const Tokenizer bpe(toy_bpe({"aa", "aaaa"}, {"a a", "aa aa"}));
  const Ids b = bpe.encode(word);
  EXPECT_EQ(b, Ids(50000, 257));
  const Tokenizer spm(toy_spm({{SPACE_MARK, -1}, {"a", -1}, {"aa", -1}, {"aaaa", -1}}));
  const Ids s = spm.encode(word, {.add_space_prefix = false});
  EXPECT_EQ(s, Ids(50000, 262));
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 10.0);
}

TEST(TokenizerThreads, ConcurrentEncodeAgrees) {
  REQUIRE_DATA(path, "ggml-vocab/ggml-vocab-gpt-2.gguf");
  const auto tok = load(path);
  const Fixture f = read_fixture(path);
  std::vector<std::vector<Ids>> results(4);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < results.size(); ++t) {
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 5; ++rep) {
        results[t].clear();
        for (const std::string& in : f.inputs) results[t].push_back(tok->encode(in));
      }
    });
  }
  for (std::thread& th : threads) th.join();
  for (const auto& r : results) EXPECT_EQ(r, f.expected);
}

}  // namespace
}  // namespace backprompt
