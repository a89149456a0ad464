// libFuzzer target: arbitrary bytes as tokenizer.json (and, after the first NUL byte, as
// tokenizer_config.json) through Tokenizer::from_json. A refusal must be one line naming the
// file; a tokenizer that loads must encode a fixed text, decode and stream-decode the ids
// without crashing, and return only ids inside its vocabulary.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "core/check.h"
#include "io/tokenizer.h"
#include "io/unicode_text.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string kSource = "fuzz/tokenizer.json";
  static const std::string kText = "Hello, w\xC3\xB6rld! 12345 <s> \xF0\x9F\x98\x80\n\t  it's \xE4\xB8\xAD x";
  std::string input(reinterpret_cast<const char*>(data), size);
  std::string config;
  if (size_t nul = input.find('\0'); nul != std::string::npos) {
    config = input.substr(nul + 1);
    input.resize(nul);
  }
  auto loaded = adakv::Tokenizer::from_json(input, config, kSource);
  if (!loaded) {
    const std::string& m = loaded.status().message();
    ADAKV_CHECK(m.rfind(kSource + ": ", 0) == 0, "refusal does not name the file");
    ADAKV_CHECK(m.find('\n') == std::string::npos, "refusal spans several lines");
    return 0;
  }
  const auto& tok = *loaded;
  for (bool special : {true, false}) {
    std::vector<int32_t> ids = tok->encode(kText, special);
    for (int32_t id : ids) ADAKV_CHECK(id >= 0 && id < tok->vocab_size(), "id outside the vocabulary");
    std::string text = tok->decode(ids, !special);
    ADAKV_CHECK(adakv::unicode::is_valid_utf8(text), "decode gave invalid UTF-8");
    adakv::StreamDecoder stream(tok, special);
    for (int32_t id : ids) ADAKV_CHECK(adakv::unicode::is_valid_utf8(stream.push(id)), "stream piece invalid");
    stream.finish();
  }
  // Ids the tokenizer never produced, including out-of-range ones.
  tok->decode({-1, 0, 1, 2, tok->vocab_size(), tok->vocab_size() - 1}, false);
  return 0;
}
