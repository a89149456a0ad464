// The shape of a per-head paged KV cache: the only thing the kv module knows about a model.
#pragma once

#include <cstdint>

namespace adakv {

struct KvLayout {
  int32_t num_layers = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t page_size = 16;  // tokens per page; one page belongs to one (sequence, layer, kv head)
};

using SeqId = int32_t;

// A slot is one entry of the pool: page * page_size + offset.
using KvSlot = int64_t;

// One entry moving inside the pool during compaction; K, V, the token position and any
// per-entry metric move together.
struct KvMove {
  KvSlot src;
  KvSlot dst;
};

enum class Admission {
  kOk,          // enough free pages now
  kLater,       // would fit in an empty pool, not now
  kImpossible,  // more pages than the whole pool holds
};

inline const char* admission_name(Admission a) {
  switch (a) {
    case Admission::kOk: return "ok";
    case Admission::kLater: return "later";
    case Admission::kImpossible: return "impossible";
  }
  return "?";
}

}  // namespace adakv
