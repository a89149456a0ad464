// libFuzzer target: a chat template from a checkpoint (chat_template.jinja / tokenizer_config.json
// come from wherever the user downloaded the model) compiled and rendered. Input: the template
// text, optionally a NUL and the messages as OpenAI-style JSON (else two default messages).
// Checks what `adakv serve` relies on: compile and render either succeed or return an error with
// a message; rendering stays within its output bound; the same render twice gives the same text.
// Seeds: the real templates of tests/fixtures/chat_templates/cases.json with four messages.
#include <cstddef>
#include <cstdint>
#include <ctime>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "core/check.h"
#include "io/chat_template.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view input(reinterpret_cast<const char*>(data), size);
  std::string_view messages_text;
  if (size_t nul = input.find('\0'); nul != std::string_view::npos) {
    messages_text = input.substr(nul + 1);
    input = input.substr(0, nul);
  }
  auto tmpl = adakv::ChatTemplate::compile(input, "fuzz/chat_template.jinja");
  if (!tmpl) {
    ADAKV_CHECK(!tmpl.status().message().empty(), "a refusal without a message");
    return 0;
  }
  nlohmann::ordered_json messages = nlohmann::ordered_json::parse(messages_text, nullptr, false);
  if (messages.is_discarded() || !messages.is_array())
    messages = nlohmann::ordered_json::parse(R"([{"role": "user", "content": "Hello!"},
                                                 {"role": "assistant", "content": "Hi."}])");
  adakv::ChatRenderOptions opt;
  opt.add_generation_prompt = true;
  opt.bos_token = "<s>";
  opt.eos_token = "</s>";
  opt.max_output_bytes = size_t{1} << 20;  // small bounds: a fuzz input must not run for long
  opt.max_steps = 200'000;
  std::tm now{};
  now.tm_year = 124;
  now.tm_mon = 6;
  now.tm_mday = 26;
  opt.now = now;
  auto out = tmpl->render_json(messages, opt);
  auto again = tmpl->render_json(messages, opt);
  ADAKV_CHECK(out.has_value() == again.has_value(), "a second render disagrees");
  if (!out) {
    ADAKV_CHECK(!out.status().message().empty(), "a render error without a message");
    return 0;
  }
  ADAKV_CHECK(out->size() <= opt.max_output_bytes, "the output exceeds its bound");
  ADAKV_CHECK(*out == *again, "a second render gives other text");
  return 0;
}
