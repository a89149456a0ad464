// safetensors files: an 8-byte little-endian header length, a JSON header naming every tensor's
// dtype, shape and byte range, then the data. Files are memory-mapped, never copied.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/mapped_file.h"
#include "core/status.h"

namespace adakv {

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets relative to the start of the data section
  uint64_t end = 0;
  const uint8_t* data = nullptr;  // into the mapping; set once the file is mapped

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

// Parses and validates a header against the size of the data section that follows it: known
// dtypes, non-negative shapes, offsets inside the data and consistent with dtype x shape, no
// overlap. Exposed separately so the fuzzer can drive it. `source` names the file in errors.
Expected<std::map<std::string, TensorInfo>> parse_safetensors_header(const uint8_t* header, size_t header_size,
                                                                     uint64_t data_size, const std::string& source);

class SafetensorsFile {
 public:
  static Expected<std::shared_ptr<SafetensorsFile>> open(const std::string& path);

  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(const std::string& name) const;
  const std::string& path() const { return file_->path(); }

 private:
  std::shared_ptr<MappedFile> file_;
  std::map<std::string, TensorInfo> tensors_;
};

// All tensors of a checkpoint folder: model.safetensors, or the shards listed in
// model.safetensors.index.json.
class Checkpoint {
 public:
  static Expected<Checkpoint> open(const std::string& model_dir);

  const TensorInfo* find(const std::string& name) const;
  // The tensor, checked to exist and to have exactly `shape`; errors name the file and tensor.
  Expected<const TensorInfo*> get(const std::string& name, const std::vector<int64_t>& shape) const;
  const std::string& dir() const { return dir_; }
  std::vector<std::string> names() const;

 private:
  std::string dir_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::pair<const SafetensorsFile*, const TensorInfo*>> index_;
};

}  // namespace adakv
