#include "io/safetensors.h"

#include <algorithm>
#include <filesystem>
#include <set>
#include <string_view>
#include <system_error>

#include <nlohmann/json.hpp>

#include "core/printable.h"

namespace adakv {
namespace {

using Json = nlohmann::json;

// The reference implementation (Rust safetensors) refuses headers above 100 MB; so do we, so that
// a corrupt length cannot make us parse gigabytes of JSON.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

Status fail(StatusCode code, const std::string& source, const std::string& message) {
  return Status(code, source + ": " + message);
}

// Names come from files we did not write: keep messages on one line and of bounded length.
std::string printable(std::string_view s) { return adakv::printable(s, 200); }

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

std::string range_string(uint64_t begin, uint64_t end) {
  std::string s = "[";  // appended piecewise: GCC 12 warns (-Wrestrict) falsely on "[" + string&&
  s += std::to_string(begin);
  s += ",";
  s += std::to_string(end);
  return s + ")";
}

bool dtype_from_name(std::string_view name, DType* out) {
  static constexpr std::pair<std::string_view, DType> kSupported[] = {
      {"F32", DType::kF32}, {"F16", DType::kF16}, {"BF16", DType::kBF16}, {"I32", DType::kI32}, {"I64", DType::kI64}};
  for (const auto& [n, t] : kSupported) {
    if (n == name) {
      *out = t;
      return true;
    }
  }
  return false;
}

enum class IntParse { kOk, kNegative, kNotInteger, kTooLarge };

// A JSON value as a non-negative integer no larger than `max`.
IntParse json_to_u64(const Json& j, uint64_t max, uint64_t* out) {
  if (j.is_number_unsigned()) {
    const uint64_t v = j.get<uint64_t>();
    if (v > max) return IntParse::kTooLarge;
    *out = v;
    return IntParse::kOk;
  }
  if (j.is_number_integer()) {  // signed, so negative (the parser stores non-negatives as unsigned)
    const int64_t v = j.get<int64_t>();
    if (v < 0) return IntParse::kNegative;
    if (static_cast<uint64_t>(v) > max) return IntParse::kTooLarge;
    *out = static_cast<uint64_t>(v);
    return IntParse::kOk;
  }
  return IntParse::kNotInteger;
}

std::string json_kind(const Json& j) { return j.type_name(); }

Status parse_tensor_entry(const std::string& name, const Json& entry, uint64_t data_size, const std::string& source,
                          TensorInfo* t) {
  const std::string what = "tensor '" + printable(name) + "'";
  if (!entry.is_object()) return fail(StatusCode::kDataLoss, source, what + " is a " + json_kind(entry) + ", not an object");
  t->name = name;

  const auto dtype_it = entry.find("dtype");
  if (dtype_it == entry.end()) return fail(StatusCode::kDataLoss, source, what + " has no dtype");
  if (!dtype_it->is_string()) return fail(StatusCode::kDataLoss, source, what + ": dtype is not a string");
  const std::string& dtype_name_str = dtype_it->get_ref<const std::string&>();
  if (!dtype_from_name(dtype_name_str, &t->dtype)) {
    return fail(StatusCode::kUnimplemented, source,
                what + ": dtype " + printable(dtype_name_str) + " not supported (supported: F32, F16, BF16, I32, I64)");
  }

  const auto shape_it = entry.find("shape");
  if (shape_it == entry.end()) return fail(StatusCode::kDataLoss, source, what + " has no shape");
  if (!shape_it->is_array()) return fail(StatusCode::kDataLoss, source, what + ": shape is not an array");
  t->shape.clear();
  t->shape.reserve(shape_it->size());
  for (const Json& d : *shape_it) {
    uint64_t v = 0;
    switch (json_to_u64(d, static_cast<uint64_t>(INT64_MAX), &v)) {
      case IntParse::kOk: break;
      case IntParse::kNegative:
        return fail(StatusCode::kDataLoss, source, what + ": negative shape entry " + d.dump());
      case IntParse::kNotInteger:
        return fail(StatusCode::kDataLoss, source, what + ": non-integer shape entry " + d.dump());
      case IntParse::kTooLarge:
        return fail(StatusCode::kDataLoss, source, what + ": shape entry " + d.dump() + " overflows int64");
    }
    t->shape.push_back(static_cast<int64_t>(v));
  }

  const auto off_it = entry.find("data_offsets");
  if (off_it == entry.end()) return fail(StatusCode::kDataLoss, source, what + " has no data_offsets");
  uint64_t off[2] = {0, 0};
  bool pair_ok = off_it->is_array() && off_it->size() == 2;
  for (size_t i = 0; pair_ok && i < 2; ++i) {
    pair_ok = json_to_u64((*off_it)[i], UINT64_MAX, &off[i]) == IntParse::kOk;
  }
  if (!pair_ok || off[0] > off[1]) {
    return fail(StatusCode::kDataLoss, source,
                what + ": data_offsets " + off_it->dump() + " is not a pair of non-decreasing non-negative integers");
  }
  t->begin = off[0];
  t->end = off[1];
  if (t->end > data_size) {
    return fail(StatusCode::kDataLoss, source,
                "truncated: tensor " + printable(name) + " needs bytes " + range_string(t->begin, t->end) +
                    " but the data section has " + std::to_string(data_size) + " bytes");
  }

  // numel * dtype size, refusing overflow; a zero dimension makes the tensor empty whatever the
  // other dimensions are.
  uint64_t numel = 1;
  bool overflow = false;
  if (std::find(t->shape.begin(), t->shape.end(), 0) != t->shape.end()) {
    numel = 0;
  } else {
    for (int64_t d : t->shape) overflow = overflow || __builtin_mul_overflow(numel, static_cast<uint64_t>(d), &numel);
  }
  uint64_t bytes = 0;
  overflow = overflow || numel > static_cast<uint64_t>(INT64_MAX) ||
             __builtin_mul_overflow(numel, static_cast<uint64_t>(dtype_size(t->dtype)), &bytes);
  if (overflow) {
    return fail(StatusCode::kDataLoss, source,
                what + ": shape " + shape_string(t->shape) + " overflows a 64-bit element or byte count");
  }
  if (bytes != t->end - t->begin) {
    return fail(StatusCode::kDataLoss, source,
                what + ": shape " + shape_string(t->shape) + " of " + dtype_name(t->dtype) + " needs " +
                    std::to_string(bytes) + " bytes but data_offsets " + range_string(t->begin, t->end) + " hold " +
                    std::to_string(t->end - t->begin));
  }
  return Status::ok();
}

}  // namespace

Expected<std::map<std::string, TensorInfo>> parse_safetensors_header(const uint8_t* header, size_t header_size,
                                                                     uint64_t data_size, const std::string& source) {
  // nlohmann keeps the last of duplicate keys; a duplicate tensor name would hide a second byte
  // range from the overlap check, so catch it while parsing.
  std::string duplicate;
  std::set<std::string> top_keys;
  const Json::parser_callback_t track_keys = [&](int depth, Json::parse_event_t event, Json& parsed) {
    if (depth == 1 && event == Json::parse_event_t::key && parsed.is_string()) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (!top_keys.insert(key).second && duplicate.empty()) duplicate = key;
    }
    return true;
  };

  Json root;
  try {
    root = Json::parse(header, header + header_size, track_keys);
  } catch (const Json::exception& e) {
    return fail(StatusCode::kDataLoss, source, std::string("header is not valid JSON: ") + e.what());
  }
  if (!root.is_object()) {
    return fail(StatusCode::kDataLoss, source, "header is a JSON " + json_kind(root) + ", not an object");
  }
  if (!duplicate.empty()) {
    return fail(StatusCode::kDataLoss, source, "header names tensor '" + duplicate + "' twice");
  }

  std::map<std::string, TensorInfo> tensors;
  for (const auto& [name, entry] : root.items()) {
    if (name == "__metadata__") continue;  // free-form string map; nothing we need
    TensorInfo t;
    ADAKV_RETURN_IF_ERROR(parse_tensor_entry(name, entry, data_size, source, &t));
    tensors.emplace(name, std::move(t));
  }

  // Overlap: sort non-empty ranges by start; each must begin at or after every earlier end.
  std::vector<const TensorInfo*> by_begin;  // [non-empty tensors] sorted by begin
  for (const auto& [name, t] : tensors) {
    if (t.end > t.begin) by_begin.push_back(&t);
  }
  std::sort(by_begin.begin(), by_begin.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_begin.size(); ++i) {
    const TensorInfo* prev = by_begin[i - 1];
    const TensorInfo* cur = by_begin[i];
    if (cur->begin < prev->end) {
      return fail(StatusCode::kDataLoss, source,
                  "tensors '" + printable(prev->name) + "' " + range_string(prev->begin, prev->end) + " and '" + printable(cur->name) +
                      "' " + range_string(cur->begin, cur->end) + " overlap");
    }
  }
  return tensors;
}

Expected<std::map<std::string, TensorInfo>> parse_safetensors_buffer(const uint8_t* data, size_t size,
                                                                     const std::string& source) {
  if (size < 8) {
    return fail(StatusCode::kDataLoss, source,
                "file is " + std::to_string(size) + " bytes, shorter than the 8-byte header length");
  }
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | data[i];
  const uint64_t after_prefix = size - 8;
  if (header_size > after_prefix) {
    return fail(StatusCode::kDataLoss, source,
                "header length " + std::to_string(header_size) + " runs past the end of the file (" +
                    std::to_string(size) + " bytes)");
  }
  if (header_size > kMaxHeaderBytes) {
    return fail(StatusCode::kDataLoss, source,
                "header length " + std::to_string(header_size) + " exceeds the 100 MB limit");
  }
  const uint8_t* header = data + 8;
  const uint8_t* section = header + header_size;
  const uint64_t data_size = after_prefix - header_size;
  ADAKV_ASSIGN_OR_RETURN(auto tensors, parse_safetensors_header(header, header_size, data_size, source));
  for (auto& [name, t] : tensors) t.data = section + t.begin;
  return tensors;
}

Expected<std::shared_ptr<SafetensorsFile>> SafetensorsFile::open(const std::string& path) {
  ADAKV_ASSIGN_OR_RETURN(auto mapped, MappedFile::open(path));
  ADAKV_ASSIGN_OR_RETURN(auto tensors, parse_safetensors_buffer(mapped->data(), mapped->size(), path));
  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->file_ = std::move(mapped);
  file->tensors_ = std::move(tensors);
  return file;
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  const auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

namespace {

namespace fs = std::filesystem;

bool is_file(const std::string& path) {
  std::error_code ec;
  return fs::exists(path, ec);
}

// Shard names come from a file we did not write: keep them inside the model directory, and
// free of control characters (they end up in error messages).
bool shard_name_ok(const std::string& name) {
  if (name.empty()) return false;
  const fs::path p(name);
  if (p.is_absolute()) return false;
  for (const char c : name) {
    if (static_cast<unsigned char>(c) < 0x20) return false;
  }
  for (const auto& part : p) {
    if (part == "..") return false;
  }
  return true;
}

}  // namespace

Expected<Checkpoint> Checkpoint::open(const std::string& model_dir) {
  Checkpoint ckpt;
  ckpt.dir_ = model_dir;
  const std::string single = (fs::path(model_dir) / "model.safetensors").string();
  const std::string index_path = (fs::path(model_dir) / "model.safetensors.index.json").string();

  // shard path -> tensors the index assigns to it
  std::map<std::string, std::vector<std::string>> shards;
  if (is_file(single)) {
    ckpt.source_ = single;
    shards[single];
  } else if (is_file(index_path)) {
    ckpt.source_ = index_path;
    ADAKV_ASSIGN_OR_RETURN(const std::string text, read_text_file(index_path));
    Json index;
    try {
      index = Json::parse(text);
    } catch (const Json::exception& e) {
      return fail(StatusCode::kDataLoss, index_path, std::string("malformed JSON: ") + e.what());
    }
    const Json* weight_map = nullptr;
    if (index.is_object()) {
      const auto it = index.find("weight_map");
      if (it != index.end() && it->is_object()) weight_map = &*it;
    }
    if (weight_map == nullptr) return fail(StatusCode::kDataLoss, index_path, "no \"weight_map\" object");
    if (weight_map->empty()) return fail(StatusCode::kDataLoss, index_path, "weight_map is empty");
    for (const auto& [tensor, shard] : weight_map->items()) {
      if (!shard.is_string()) {
        return fail(StatusCode::kDataLoss, index_path,
                    "weight_map entry '" + printable(tensor) + "' is a " + json_kind(shard) + ", not a file name");
      }
      const std::string& shard_name = shard.get_ref<const std::string&>();
      if (!shard_name_ok(shard_name)) {
        return fail(StatusCode::kDataLoss, index_path,
                    "shard name '" + printable(shard_name) + "' (tensor '" + printable(tensor) + "') points outside the model directory or has control characters");
      }
      shards[(fs::path(model_dir) / shard_name).string()].push_back(tensor);
    }
  } else {
    std::error_code ec;
    if (!fs::is_directory(model_dir, ec)) return not_found(model_dir + ": model directory does not exist");
    return not_found(model_dir + ": no model.safetensors or model.safetensors.index.json");
  }

  for (const auto& [path, listed] : shards) {
    if (path != single && !is_file(path)) {
      return not_found(printable(path) + ": shard listed in model.safetensors.index.json is missing");
    }
    ADAKV_ASSIGN_OR_RETURN(auto file, SafetensorsFile::open(path));
    for (const std::string& tensor : listed) {
      if (file->find(tensor) == nullptr) {
        return fail(StatusCode::kDataLoss, path,
                    "tensor '" + printable(tensor) + "' listed in model.safetensors.index.json is missing from this shard");
      }
    }
    for (const auto& [name, info] : file->tensors()) {
      const auto [it, inserted] = ckpt.index_.emplace(name, std::make_pair(file.get(), &info));
      if (!inserted) {
        return fail(StatusCode::kDataLoss, model_dir,
                    "tensor '" + printable(name) + "' is defined in both " + printable(it->second.first->path()) + " and " +
                        printable(path));
      }
    }
    ckpt.files_.push_back(std::move(file));
  }
  return ckpt;
}

const TensorInfo* Checkpoint::find(const std::string& name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second.second;
}

Expected<const TensorInfo*> Checkpoint::get(const std::string& name, const std::vector<int64_t>& shape) const {
  const auto it = index_.find(name);
  if (it == index_.end()) return not_found(source_ + ": tensor '" + printable(name) + "' not found in the checkpoint");
  const TensorInfo* info = it->second.second;
  if (info->shape != shape) {
    return data_loss(it->second.first->path() + ": tensor '" + printable(name) + "' has shape " + shape_string(info->shape) +
                     " but the model expects " + shape_string(shape));
  }
  return info;
}

std::string Checkpoint::file_of(const std::string& name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? std::string() : it->second.first->path();
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(index_.size());
  for (const auto& [name, entry] : index_) out.push_back(name);
  return out;
}

}  // namespace adakv
