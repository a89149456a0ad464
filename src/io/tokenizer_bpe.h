// The BPE model of tokenizer.json: a word (one pre-tokenized piece) becomes its characters,
// then the adjacent pair of lowest merge rank is merged until none is left (leftmost first on
// ties), as the `tokenizers` library does; byte_fallback, unk/fuse_unk and ignore_merges.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/status.h"

namespace adakv::tok {

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using Vocab = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

struct BpeOptions {
  bool byte_fallback = false;
  bool fuse_unk = false;
  bool ignore_merges = false;
  std::string unk_token;  // empty: none (unknown characters are dropped)
};

class BpeModel {
 public:
  // `merges`: pairs of tokens in rank order; both halves and their concatenation must be in
  // the vocabulary (the error names the offending merge).
  static Expected<std::unique_ptr<BpeModel>> create(Vocab vocab,
                                                    const std::vector<std::pair<std::string, std::string>>& merges,
                                                    BpeOptions options);

  // Appends the ids of one word.
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;

  const Vocab& vocab() const { return vocab_; }
  int32_t token_to_id(std::string_view token) const;  // -1 when absent

 private:
  BpeModel() = default;
  void merge_word(std::string_view word, std::vector<int32_t>& out) const;

  struct MergeResult {
    int32_t rank;
    int32_t new_id;
  };
  Vocab vocab_;
  std::unordered_map<uint64_t, MergeResult> merges_;  // (left id << 32 | right id) -> merge
  BpeOptions options_;
  int32_t unk_id_ = -1;
  int32_t byte_ids_[256];  // <0xNN> ids for byte_fallback, -1 when absent

  // Word -> ids for short words; shared between threads.
  static constexpr size_t kCacheMaxWordBytes = 256;
  static constexpr size_t kCacheMaxEntries = 1 << 16;
  mutable std::shared_mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>> cache_;
};

}  // namespace adakv::tok
