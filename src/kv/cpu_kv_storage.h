// The CPU backend's KV pool: fp32 keys and values and int32 token positions, indexed by slot
// (page * page_size + offset). Sized once; the manager decides which slots are in use.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "core/check.h"
#include "kv/kv_layout.h"

namespace adakv {

class CpuKvStorage {
 public:
  CpuKvStorage(const KvLayout& layout, int64_t num_pages)
      : head_dim_(layout.head_dim),
        num_slots_(num_pages * layout.page_size),
        keys_(static_cast<size_t>(num_slots_ * head_dim_)),
        values_(static_cast<size_t>(num_slots_ * head_dim_)),
        positions_(static_cast<size_t>(num_slots_), -1) {}

  int32_t head_dim() const { return head_dim_; }
  int64_t num_slots() const { return num_slots_; }

  float* key(KvSlot s) { return keys_.data() + checked(s) * head_dim_; }
  float* value(KvSlot s) { return values_.data() + checked(s) * head_dim_; }
  const float* key(KvSlot s) const { return keys_.data() + checked(s) * head_dim_; }
  const float* value(KvSlot s) const { return values_.data() + checked(s) * head_dim_; }
  int32_t& position(KvSlot s) { return positions_[checked(s)]; }
  int32_t position(KvSlot s) const { return positions_[checked(s)]; }

  // Applies compaction moves in order (a move may read a slot an earlier move wrote).
  void apply(std::span<const KvMove> moves) {
    for (const KvMove& m : moves) {
      if (m.src == m.dst) continue;
      std::copy_n(key(m.src), head_dim_, key(m.dst));
      std::copy_n(value(m.src), head_dim_, value(m.dst));
      position(m.dst) = position(m.src);
    }
  }

 private:
  size_t checked(KvSlot s) const {
    ADAKV_CHECK(s >= 0 && s < num_slots_, "KV slot out of range");
    return static_cast<size_t>(s);
  }

  int32_t head_dim_;
  int64_t num_slots_;
  std::vector<float> keys_;       // [num_slots][head_dim]
  std::vector<float> values_;     // [num_slots][head_dim]
  std::vector<int32_t> positions_;  // [num_slots] token position of each entry
};

}  // namespace adakv
