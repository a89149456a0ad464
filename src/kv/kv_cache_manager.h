// Host-side metadata of the per-head paged KV cache: one pool of pages, and for every
// (sequence, layer, kv head) -- a "row" -- its own list of pages and its own length.
// Heads of one layer may hold different numbers of entries; a page that compression empties
// returns to the free stack at once. The manager never touches K/V data: it tells the
// storage (CPU arrays or device memory) which slots to write and which moves to apply.
//
// Transactional: reserve() computes what a step needs and changes nothing; commit() is the
// only mutator on the hot path; release() returns every page of a sequence.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kv/kv_layout.h"

namespace adakv {

// Growth of one sequence in one step: `new_entries` appended to every (layer, kv head).
struct KvGrowth {
  SeqId seq = -1;
  int32_t new_entries = 0;
};

// What commit() will allocate; valid until the next mutation of the manager.
struct KvReservation {
  std::vector<KvGrowth> growths;
  int64_t pages_needed = 0;
  uint64_t epoch = 0;  // manager's mutation counter when reserved; commit checks it
};

class KvCacheManager {
 public:
  KvCacheManager(const KvLayout& layout, int64_t num_pages);

  const KvLayout& layout() const;
  int64_t num_pages() const;
  int64_t free_pages() const;
  int64_t used_pages() const;  // == sum over rows of ceil(length / page_size)

  SeqId add_sequence();          // an empty sequence
  void release(SeqId seq);       // frees all its pages; the id becomes invalid
  bool has_sequence(SeqId seq) const;

  // Pages needed to append growths; Ok / Later / Impossible. Changes nothing.
  Admission reserve(std::span<const KvGrowth> growths, KvReservation* out) const;
  // Allocates the reserved pages and extends every row of each sequence; the new entries'
  // contents are undefined until written through slot().
  void commit(const KvReservation& reservation);

  // Entries held by one row, and the tokens the sequence has seen (RoPE positions continue
  // from the logical length, never from a row's physical length).
  int32_t length(SeqId seq, int32_t layer, int32_t kv_head) const;
  int64_t logical_length(SeqId seq) const;
  void advance_logical_length(SeqId seq, int64_t n);

  // Pool slot of entry `index` of a row.
  KvSlot slot(SeqId seq, int32_t layer, int32_t kv_head, int32_t index) const;
  // The row's pages in order: entry i lives in pages[i / page_size] at offset i % page_size.
  std::span<const int32_t> pages(SeqId seq, int32_t layer, int32_t kv_head) const;

  // Keeps exactly the entries at `keep` (strictly ascending indices) of one row, in order;
  // returns the moves that pack them to the front. Trailing pages are freed immediately, so
  // the caller must apply the moves to the storage before the next commit.
  std::vector<KvMove> keep_entries(SeqId seq, int32_t layer, int32_t kv_head,
                                   std::span<const int32_t> keep);
  // KV-Compress compaction: removes the entries at `evict` (any order, unique) by moving
  // surviving tail entries into the holes (order not preserved); returns the moves.
  std::vector<KvMove> evict_entries(SeqId seq, int32_t layer, int32_t kv_head,
                                    std::span<const int32_t> evict);

 private:
  struct Impl;
  // implementation defined in kv_cache_manager.cc (flat int32 arrays, integer free stack)
};

}  // namespace adakv
