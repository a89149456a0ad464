// safetensors files: an 8-byte little-endian header length, a JSON header naming every tensor's
// dtype, shape and byte range, then the data. Files are memory-mapped, never copied.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
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
  // Into the mapping (or the parsed buffer); set by the parse. Not necessarily aligned to the
  // element size: the format only aligns when the writer pads the header (torch's writer does).
  const uint8_t* data = nullptr;

  // Cannot overflow for a parsed tensor: the parser refuses shapes whose byte size overflows,
  // except when a dimension is 0 (the tensor is empty however large the others are), which is
  // answered before multiplying.
  int64_t numel() const {
    for (int64_t d : shape)
      if (d == 0) return 0;
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  uint64_t nbytes() const { return end - begin; }
};

// Parses and validates a header against the size of the data section that follows it: known
// dtypes, non-negative shapes, offsets inside the data and consistent with dtype x shape, no
// overlap. `data` of each tensor is left null. `source` names the file in errors.
Expected<std::map<std::string, TensorInfo>> parse_safetensors_header(const uint8_t* header, size_t header_size,
                                                                     uint64_t data_size, const std::string& source);

// Parses a whole safetensors image held in memory (a mapped file, or the fuzzer's input):
// length prefix, header, and data pointers into `data`, which must outlive the result.
// SafetensorsFile::open is this plus the mapping.
Expected<std::map<std::string, TensorInfo>> parse_safetensors_buffer(const uint8_t* data, size_t size,
                                                                     const std::string& source);

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

// All tensors of a checkpoint folder: model.safetensors when present (as transformers prefers),
// else the shards listed in model.safetensors.index.json. Cheap to move; TensorInfo pointers stay
// valid for the Checkpoint's lifetime.
class Checkpoint {
 public:
  static Expected<Checkpoint> open(const std::string& model_dir);

  const TensorInfo* find(const std::string& name) const;
  // The tensor, checked to exist and to have exactly `shape`; errors name the file and tensor.
  Expected<const TensorInfo*> get(const std::string& name, const std::vector<int64_t>& shape) const;
  // Path of the file holding `name` ("" when absent), for error messages of callers.
  std::string file_of(const std::string& name) const;
  const std::string& dir() const { return dir_; }
  std::vector<std::string> names() const;  // sorted

 private:
  std::string dir_;
  std::string source_;  // model.safetensors or the index file: what a missing tensor is reported against
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::pair<const SafetensorsFile*, const TensorInfo*>> index_;
};

}  // namespace adakv
