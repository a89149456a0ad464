// Test-only safetensors writer: builds file images byte by byte (independently of the parser
// under test) and a scratch directory that removes itself.
#pragma once

#include <stdlib.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace adakv::testing {

struct TestTensor {
  std::string name;
  std::string dtype;  // as written in the header, e.g. "BF16"
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;  // raw little-endian data
};

template <typename T>
std::vector<uint8_t> le_bytes(const std::vector<T>& values) {
  std::vector<uint8_t> out(values.size() * sizeof(T));
  if (!out.empty()) std::memcpy(out.data(), values.data(), out.size());  // x86: host order is little-endian
  return out;
}

// Length prefix + header text + data, exactly as given (for headers that lie).
inline std::vector<uint8_t> raw_image(const std::string& header, const std::vector<uint8_t>& data) {
  // Sized once and filled with memcpy: GCC 12 warns falsely (-Warray-bounds) on vector::insert here.
  std::vector<uint8_t> out(8 + header.size() + data.size());
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(n >> (8 * i));
  if (!header.empty()) std::memcpy(out.data() + 8, header.data(), header.size());
  if (!data.empty()) std::memcpy(out.data() + 8 + header.size(), data.data(), data.size());
  return out;
}

inline std::string shape_json(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ',';
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

// A well-formed image: tensors laid out back to back in the given order, header padded with
// spaces to a multiple of 8 bytes as the reference writer does.
inline std::vector<uint8_t> safetensors_image(const std::vector<TestTensor>& tensors,
                                              const std::string& metadata_json = "") {
  std::string header = "{";
  bool first = true;
  if (!metadata_json.empty()) {
    header += "\"__metadata__\":" + metadata_json;
    first = false;
  }
  std::vector<uint8_t> data;
  for (const TestTensor& t : tensors) {
    const size_t begin = data.size();
    data.insert(data.end(), t.bytes.begin(), t.bytes.end());
    header += std::string(first ? "" : ",") + "\"" + t.name + "\":{\"dtype\":\"" + t.dtype +
              "\",\"shape\":" + shape_json(t.shape) + ",\"data_offsets\":[" + std::to_string(begin) + "," +
              std::to_string(data.size()) + "]}";
    first = false;
  }
  header += "}";
  while (header.size() % 8 != 0) header += ' ';
  return raw_image(header, data);
}

inline void write_file(const std::filesystem::path& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

inline void write_file(const std::filesystem::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "adakv_test_XXXXXX").string();
    if (mkdtemp(tmpl.data()) != nullptr) path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

}  // namespace adakv::testing
