// libFuzzer target: arbitrary bytes through the whole-file safetensors parse (length prefix,
// JSON header, validation, data pointers), the same function SafetensorsFile::open runs on a
// mapping. Beyond the sanitizers, it checks what a caller relies on: a refusal is one line that
// names the file, and an accepted file's tensors lie inside the buffer, match dtype x shape and
// do not overlap.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "core/check.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string kSource = "fuzz.safetensors";
  auto parsed = adakv::parse_safetensors_buffer(data, size, kSource);
  if (!parsed) {
    const std::string& m = parsed.status().message();
    ADAKV_CHECK(m.rfind(kSource + ": ", 0) == 0, "refusal does not name the file");
    ADAKV_CHECK(m.find('\n') == std::string::npos, "refusal spans several lines");
    return 0;
  }
  ADAKV_CHECK(size >= 8, "accepted a file without a length prefix");
  uint64_t header_size = 0;
  std::memcpy(&header_size, data, 8);  // little-endian host
  const uint8_t* section = data + 8 + header_size;
  const uint64_t data_size = size - 8 - header_size;

  std::vector<std::pair<uint64_t, uint64_t>> ranges;  // [non-empty tensors] -> [begin, end)
  volatile uint8_t sink = 0;
  for (const auto& [name, t] : *parsed) {
    ADAKV_CHECK(t.name == name, "name mismatch");
    ADAKV_CHECK(t.begin <= t.end && t.end <= data_size, "range outside the data section");
    ADAKV_CHECK(t.data == section + t.begin, "data pointer not at the header's offset");
    ADAKV_CHECK(t.numel() >= 0, "negative numel");
    ADAKV_CHECK(static_cast<uint64_t>(t.numel()) * adakv::dtype_size(t.dtype) == t.nbytes(), "dtype x shape != bytes");
    if (t.nbytes() > 0) {
      sink = sink + t.data[0] + t.data[t.nbytes() - 1];  // ASan flags any read outside the input
      ranges.emplace_back(t.begin, t.end);
    }
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) ADAKV_CHECK(ranges[i].first >= ranges[i - 1].second, "overlap accepted");
  return 0;
}
