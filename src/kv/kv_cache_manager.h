// Host-side metadata of the per-head paged KV cache: one pool of pages, and for every
// (sequence, layer, kv head) -- a "row" -- its own list of pages and its own length.
// Heads of one layer may hold different numbers of entries; a page that compression empties
// returns to the free stack at once. The manager never touches K/V data: it tells the
// storage (CPU arrays or device memory) which slots to write and which moves to apply.
//
// Transactional: reserve() computes what a step needs and changes nothing; commit() is the
// only mutator on the hot path; release() returns every page of a sequence.
//
// Metadata is flat int32 arrays (see docs/kv_layout.md): per-head pages multiply the page
// count by layers x kv heads, so there are no per-row heap lists. Every row's page list is a
// contiguous run of one shared table (`table_`), so pages() is a plain span and the whole
// table can be mirrored to a device as-is.
#pragma once

#include <cstdint>
#include <span>
#include <string>
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

  const KvLayout& layout() const { return layout_; }
  int64_t num_pages() const { return num_pages_; }
  int64_t free_pages() const { return static_cast<int64_t>(free_stack_.size()); }
  int64_t used_pages() const { return num_pages_ - free_pages(); }  // == sum over rows of ceil(length / page_size)
  int32_t rows_per_sequence() const { return rows_per_seq_; }       // num_layers * num_kv_heads
  int32_t num_sequences() const { return num_active_seqs_; }

  // An empty sequence. Ids of released sequences are reused.
  SeqId add_sequence();
  void release(SeqId seq);  // frees all its pages; the id becomes invalid
  bool has_sequence(SeqId seq) const;
  // A number no other add_sequence() returns with, in any manager of the process: ids are reused,
  // serials are not. A mirror of a sequence's rows (the CUDA page table) keeps the serial it
  // mirrored and starts over when it changes.
  uint64_t sequence_serial(SeqId seq) const;
  // How often the sequence's rows have given pages back (keep_entries, evict_entries) since
  // add_sequence(). A mirror whose rows only grew since it last looked needs to read only their
  // new pages; after a shrink a row may have regrown with other pages.
  uint64_t sequence_shrinks(SeqId seq) const;

  // Pages needed to append growths; Ok / Later / Impossible. Changes nothing.
  //   Ok:         pages_needed <= free pages.
  //   Later:      the growing sequences' pages after growth fit the whole pool (they would fit
  //               if every other sequence were released), not the free pages now.
  //   Impossible: the growing sequences alone would need more than the whole pool.
  // A sequence may appear in several growths; they add up. `out` is filled in every case.
  Admission reserve(std::span<const KvGrowth> growths, KvReservation* out) const;
  // Allocates the reserved pages and extends every row of each sequence; the new entries'
  // contents are undefined until written through slot(). Does not move the logical length
  // (call advance_logical_length once the tokens are in). The reservation must be current
  // (no commit/release/keep/evict since reserve) and must have been Ok.
  void commit(const KvReservation& reservation);

  // Entries held by one row, and the tokens the sequence has seen (RoPE positions continue
  // from the logical length, never from a row's physical length).
  int32_t length(SeqId seq, int32_t layer, int32_t kv_head) const;
  int64_t logical_length(SeqId seq) const;
  void advance_logical_length(SeqId seq, int64_t n);
  // Pages held by all rows of one sequence.
  int64_t sequence_pages(SeqId seq) const;

  // Pool slot of entry `index` of a row.
  KvSlot slot(SeqId seq, int32_t layer, int32_t kv_head, int32_t index) const;
  // The row's pages in order: entry i lives in pages[i / page_size] at offset i % page_size.
  // The span is invalidated by the next mutation of the manager.
  std::span<const int32_t> pages(SeqId seq, int32_t layer, int32_t kv_head) const;

  // Keeps exactly the entries at `keep` (strictly ascending indices) of one row, in order;
  // returns the moves that pack them to the front. Trailing pages are freed immediately, so
  // the caller must apply the moves to the storage before the next commit.
  std::vector<KvMove> keep_entries(SeqId seq, int32_t layer, int32_t kv_head,
                                   std::span<const int32_t> keep);
  // KV-Compress compaction: removes the entries at `evict` (any order, unique) by moving
  // surviving tail entries into the holes (order not preserved); returns the moves. The
  // lowest hole receives the lowest-indexed tail survivor, and so on. Trailing pages are
  // freed immediately, as in keep_entries.
  std::vector<KvMove> evict_entries(SeqId seq, int32_t layer, int32_t kv_head,
                                    std::span<const int32_t> evict);

  // Full consistency check (page ownership, free stack, page counts); O(pool). Returns an
  // empty string when consistent, else the first problem found. For tests and debug builds.
  std::string check_consistency() const;

 private:
  int64_t row_id(SeqId seq, int32_t layer, int32_t kv_head) const;
  int32_t pages_for(int64_t entries) const {
    // A shift where the page size is a power of two (every real layout): the step's host loops
    // call this for every row, and a 64-bit division costs tens of cycles.
    if (page_shift_ >= 0) return static_cast<int32_t>((entries + layout_.page_size - 1) >> page_shift_);
    return static_cast<int32_t>((entries + layout_.page_size - 1) / layout_.page_size);
  }
  // Makes room in `table_` for `pages` page ids of row `row`, relocating its run if needed.
  void ensure_table_capacity(int64_t row, int32_t pages);
  void compact_table();
  // Frees the row's pages beyond what `new_length` entries need and sets its length.
  void shrink_row(int64_t row, int32_t new_length);

  KvLayout layout_;
  int64_t num_pages_;
  int32_t rows_per_seq_;
  int32_t page_shift_ = -1;  // log2(page_size) when a power of two, else -1
  uint64_t epoch_ = 0;

  std::vector<int32_t> free_stack_;  // [<= num_pages] free page ids; the top is back()
  std::vector<int32_t> page_row_;    // [num_pages] owning row of each page, -1 when free (int32
                                     // row ids bound seqs * rows_per_seq below 2^31)

  // Sequences, indexed by SeqId.
  std::vector<uint8_t> seq_active_;          // [seq slots]
  std::vector<int64_t> seq_logical_length_;  // [seq slots]
  std::vector<uint64_t> seq_serial_;         // [seq slots] see sequence_serial()
  std::vector<uint64_t> seq_shrinks_;        // [seq slots] see sequence_shrinks()
  std::vector<int32_t> free_seq_ids_;        // released ids, reused first
  int32_t num_active_seqs_ = 0;

  // Rows, indexed by seq * rows_per_seq + layer * num_kv_heads + kv_head.
  std::vector<int32_t> row_length_;        // [rows] entries held
  std::vector<int64_t> row_table_offset_;  // [rows] start of the row's page run in table_
  std::vector<int32_t> row_table_cap_;     // [rows] page ids the run can hold

  std::vector<int32_t> table_;  // [table_end_ + spare] concatenated runs of page ids
  int64_t table_end_ = 0;       // first unused index of table_
  int64_t table_garbage_ = 0;   // abandoned run capacity below table_end_
};

}  // namespace adakv
