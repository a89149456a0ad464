#include "kv/kv_cache_manager.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <limits>

#include "core/check.h"

namespace adakv {

namespace {
constexpr int32_t kMinRunCapacity = 4;      // page ids reserved for a row's first run
constexpr int64_t kCompactThreshold = 4096;  // abandoned table entries before compaction pays
}  // namespace

KvCacheManager::KvCacheManager(const KvLayout& layout, int64_t num_pages)
    : layout_(layout), num_pages_(num_pages), rows_per_seq_(layout.num_layers * layout.num_kv_heads) {
  ADAKV_CHECK(layout.num_layers > 0 && layout.num_kv_heads > 0 && layout.head_dim > 0,
              "KvLayout needs layers, kv heads and head_dim > 0");
  ADAKV_CHECK(layout.page_size > 0, "KvLayout page_size must be > 0");
  if (std::has_single_bit(static_cast<uint32_t>(layout.page_size)))
    page_shift_ = std::countr_zero(static_cast<uint32_t>(layout.page_size));
  ADAKV_CHECK(num_pages >= 0 && num_pages <= std::numeric_limits<int32_t>::max(),
              "page ids are int32");
  free_stack_.resize(static_cast<size_t>(num_pages));
  // Page 0 on top, so a fresh pool hands out pages in ascending order (readable tests).
  for (int64_t i = 0; i < num_pages; ++i) free_stack_[static_cast<size_t>(i)] = static_cast<int32_t>(num_pages - 1 - i);
  page_row_.assign(static_cast<size_t>(num_pages), -1);
}

int64_t KvCacheManager::row_id(SeqId seq, int32_t layer, int32_t kv_head) const {
  ADAKV_CHECK(has_sequence(seq), "unknown sequence id");
  ADAKV_CHECK(layer >= 0 && layer < layout_.num_layers, "layer out of range");
  ADAKV_CHECK(kv_head >= 0 && kv_head < layout_.num_kv_heads, "kv head out of range");
  return static_cast<int64_t>(seq) * rows_per_seq_ + static_cast<int64_t>(layer) * layout_.num_kv_heads + kv_head;
}

SeqId KvCacheManager::add_sequence() {
  SeqId id;
  if (!free_seq_ids_.empty()) {
    id = free_seq_ids_.back();
    free_seq_ids_.pop_back();
  } else {
    id = static_cast<SeqId>(seq_active_.size());
    ADAKV_CHECK((static_cast<int64_t>(id) + 1) * rows_per_seq_ <= std::numeric_limits<int32_t>::max(),
                "row ids are int32: too many sequences for this layout");
    seq_active_.push_back(0);
    seq_logical_length_.push_back(0);
    seq_serial_.push_back(0);
    seq_shrinks_.push_back(0);
    const size_t rows = seq_active_.size() * static_cast<size_t>(rows_per_seq_);
    row_length_.resize(rows, 0);
    row_table_offset_.resize(rows, 0);
    row_table_cap_.resize(rows, 0);
  }
  static std::atomic<uint64_t> next_serial{1};
  seq_active_[static_cast<size_t>(id)] = 1;
  seq_logical_length_[static_cast<size_t>(id)] = 0;
  seq_serial_[static_cast<size_t>(id)] = next_serial.fetch_add(1, std::memory_order_relaxed);
  seq_shrinks_[static_cast<size_t>(id)] = 0;
  ++num_active_seqs_;
  return id;
}

bool KvCacheManager::has_sequence(SeqId seq) const {
  return seq >= 0 && static_cast<size_t>(seq) < seq_active_.size() && seq_active_[static_cast<size_t>(seq)] != 0;
}

uint64_t KvCacheManager::sequence_serial(SeqId seq) const {
  ADAKV_CHECK(has_sequence(seq), "unknown sequence id");
  return seq_serial_[static_cast<size_t>(seq)];
}

uint64_t KvCacheManager::sequence_shrinks(SeqId seq) const {
  ADAKV_CHECK(has_sequence(seq), "unknown sequence id");
  return seq_shrinks_[static_cast<size_t>(seq)];
}

void KvCacheManager::release(SeqId seq) {
  ADAKV_CHECK(has_sequence(seq), "release of an unknown sequence id");
  const int64_t first = static_cast<int64_t>(seq) * rows_per_seq_;
  for (int64_t row = first; row < first + rows_per_seq_; ++row) {
    shrink_row(row, 0);
    table_garbage_ += row_table_cap_[static_cast<size_t>(row)];
    row_table_cap_[static_cast<size_t>(row)] = 0;
    row_table_offset_[static_cast<size_t>(row)] = 0;
  }
  seq_active_[static_cast<size_t>(seq)] = 0;
  seq_logical_length_[static_cast<size_t>(seq)] = 0;
  free_seq_ids_.push_back(seq);
  --num_active_seqs_;
  ++epoch_;
}

int32_t KvCacheManager::length(SeqId seq, int32_t layer, int32_t kv_head) const {
  return row_length_[static_cast<size_t>(row_id(seq, layer, kv_head))];
}

int64_t KvCacheManager::logical_length(SeqId seq) const {
  ADAKV_CHECK(has_sequence(seq), "unknown sequence id");
  return seq_logical_length_[static_cast<size_t>(seq)];
}

void KvCacheManager::advance_logical_length(SeqId seq, int64_t n) {
  ADAKV_CHECK(has_sequence(seq), "unknown sequence id");
  ADAKV_CHECK(n >= 0, "logical length only grows");
  seq_logical_length_[static_cast<size_t>(seq)] += n;
}

int64_t KvCacheManager::sequence_pages(SeqId seq) const {
  ADAKV_CHECK(has_sequence(seq), "unknown sequence id");
  const int64_t first = static_cast<int64_t>(seq) * rows_per_seq_;
  int64_t pages = 0;
  for (int64_t row = first; row < first + rows_per_seq_; ++row) pages += pages_for(row_length_[static_cast<size_t>(row)]);
  return pages;
}

Admission KvCacheManager::reserve(std::span<const KvGrowth> growths, KvReservation* out) const {
  ADAKV_CHECK(out != nullptr, "reserve needs an output reservation");
  out->growths.assign(growths.begin(), growths.end());
  out->epoch = epoch_;
  out->pages_needed = 0;

  // Growths of the same sequence add up: merge them on a sorted copy.
  std::vector<KvGrowth> merged(growths.begin(), growths.end());
  std::sort(merged.begin(), merged.end(), [](const KvGrowth& a, const KvGrowth& b) { return a.seq < b.seq; });
  int64_t pages_needed = 0;
  int64_t pages_after = 0;  // pages of the growing sequences once grown
  bool overflow = false;
  for (size_t i = 0; i < merged.size();) {
    const SeqId seq = merged[i].seq;
    ADAKV_CHECK(has_sequence(seq), "reserve for an unknown sequence id");
    int64_t extra = 0;
    for (; i < merged.size() && merged[i].seq == seq; ++i) {
      ADAKV_CHECK(merged[i].new_entries >= 0, "growth must be >= 0 entries");
      extra += merged[i].new_entries;
    }
    const int64_t first = static_cast<int64_t>(seq) * rows_per_seq_;
    for (int64_t row = first; row < first + rows_per_seq_; ++row) {
      const int64_t len = row_length_[static_cast<size_t>(row)];
      if (len + extra > std::numeric_limits<int32_t>::max()) overflow = true;
      const int64_t before = pages_for(len);
      const int64_t after = pages_for(len + extra);
      pages_needed += after - before;
      pages_after += after;
    }
  }
  out->pages_needed = pages_needed;
  if (overflow || pages_after > num_pages_) return Admission::kImpossible;
  if (pages_needed > free_pages()) return Admission::kLater;
  return Admission::kOk;
}

void KvCacheManager::commit(const KvReservation& reservation) {
  ADAKV_CHECK(reservation.epoch == epoch_, "stale reservation: the manager changed since reserve()");
  ADAKV_CHECK(reservation.pages_needed <= free_pages(), "commit of a reservation that was not Ok");
  for (const KvGrowth& g : reservation.growths) {
    if (g.new_entries == 0) continue;
    const int64_t first = static_cast<int64_t>(g.seq) * rows_per_seq_;
    for (int64_t row = first; row < first + rows_per_seq_; ++row) {
      const size_t r = static_cast<size_t>(row);
      const int32_t old_pages = pages_for(row_length_[r]);
      const int32_t new_length = row_length_[r] + g.new_entries;
      const int32_t new_pages = pages_for(new_length);
      if (new_pages > old_pages) {
        ensure_table_capacity(row, new_pages);
        int32_t* run = table_.data() + row_table_offset_[r];
        for (int32_t p = old_pages; p < new_pages; ++p) {
          ADAKV_CHECK(!free_stack_.empty(), "page pool exhausted during commit");
          const int32_t page = free_stack_.back();
          free_stack_.pop_back();
          page_row_[static_cast<size_t>(page)] = static_cast<int32_t>(row);
          run[p] = page;
        }
      }
      row_length_[r] = new_length;
    }
  }
  ++epoch_;
}

KvSlot KvCacheManager::slot(SeqId seq, int32_t layer, int32_t kv_head, int32_t index) const {
  const size_t r = static_cast<size_t>(row_id(seq, layer, kv_head));
  ADAKV_CHECK(index >= 0 && index < row_length_[r], "entry index beyond the row's length");
  const int32_t ps = layout_.page_size;
  const int32_t page_index = page_shift_ >= 0 ? index >> page_shift_ : index / ps;
  const int32_t page = table_[static_cast<size_t>(row_table_offset_[r] + page_index)];
  return static_cast<KvSlot>(page) * ps + (index - page_index * ps);
}

std::span<const int32_t> KvCacheManager::pages(SeqId seq, int32_t layer, int32_t kv_head) const {
  const size_t r = static_cast<size_t>(row_id(seq, layer, kv_head));
  const int32_t n = pages_for(row_length_[r]);
  if (n == 0) return {};
  return {table_.data() + row_table_offset_[r], static_cast<size_t>(n)};
}

std::vector<KvMove> KvCacheManager::keep_entries(SeqId seq, int32_t layer, int32_t kv_head,
                                                 std::span<const int32_t> keep) {
  const int64_t row = row_id(seq, layer, kv_head);
  const int32_t len = row_length_[static_cast<size_t>(row)];
  std::vector<KvMove> moves;
  for (size_t i = 0; i < keep.size(); ++i) {
    ADAKV_CHECK(keep[i] >= 0 && keep[i] < len, "keep index beyond the row's length");
    ADAKV_CHECK(i == 0 || keep[i] > keep[i - 1], "keep indices must be strictly ascending");
    // keep[i] >= i, so the source has not been overwritten by an earlier move.
    if (keep[i] != static_cast<int32_t>(i)) {
      moves.push_back({slot(seq, layer, kv_head, keep[i]), slot(seq, layer, kv_head, static_cast<int32_t>(i))});
    }
  }
  shrink_row(row, static_cast<int32_t>(keep.size()));
  ++epoch_;
  return moves;
}

std::vector<KvMove> KvCacheManager::evict_entries(SeqId seq, int32_t layer, int32_t kv_head,
                                                  std::span<const int32_t> evict) {
  const int64_t row = row_id(seq, layer, kv_head);
  const int32_t len = row_length_[static_cast<size_t>(row)];
  std::vector<uint8_t> evicted(static_cast<size_t>(len), 0);  // [len]
  for (int32_t e : evict) {
    ADAKV_CHECK(e >= 0 && e < len, "evict index beyond the row's length");
    ADAKV_CHECK(!evicted[static_cast<size_t>(e)], "evict indices must be unique");
    evicted[static_cast<size_t>(e)] = 1;
  }
  const int32_t new_length = len - static_cast<int32_t>(evict.size());
  // Holes below new_length and survivors at or above it come in equal numbers.
  std::vector<KvMove> moves;
  int32_t src = new_length;
  for (int32_t dst = 0; dst < new_length; ++dst) {
    if (!evicted[static_cast<size_t>(dst)]) continue;
    while (evicted[static_cast<size_t>(src)]) ++src;
    moves.push_back({slot(seq, layer, kv_head, src), slot(seq, layer, kv_head, dst)});
    ++src;
  }
  shrink_row(row, new_length);
  ++epoch_;
  return moves;
}

void KvCacheManager::shrink_row(int64_t row, int32_t new_length) {
  const size_t r = static_cast<size_t>(row);
  ADAKV_CHECK(new_length >= 0 && new_length <= row_length_[r], "shrink_row grows the row");
  const int32_t old_pages = pages_for(row_length_[r]);
  const int32_t new_pages = pages_for(new_length);
  const int32_t* run = table_.data() + row_table_offset_[r];
  // Push the last page first so that the row's lowest freed page is reused first.
  for (int32_t p = old_pages - 1; p >= new_pages; --p) {
    page_row_[static_cast<size_t>(run[p])] = -1;
    free_stack_.push_back(run[p]);
  }
  if (new_pages < old_pages) ++seq_shrinks_[r / static_cast<size_t>(rows_per_seq_)];
  row_length_[r] = new_length;
}

void KvCacheManager::ensure_table_capacity(int64_t row, int32_t pages) {
  const size_t r = static_cast<size_t>(row);
  const int32_t cap = row_table_cap_[r];
  if (pages <= cap) return;
  const int32_t new_cap = std::max({pages, cap * 2, kMinRunCapacity});
  if (cap > 0 && row_table_offset_[r] + cap == table_end_) {
    // The run is last in the table: extend it in place.
    table_end_ = row_table_offset_[r] + new_cap;
  } else {
    if (table_garbage_ > kCompactThreshold && table_garbage_ * 2 > table_end_) compact_table();
    const int64_t offset = table_end_;
    table_end_ += new_cap;
    if (static_cast<int64_t>(table_.size()) < table_end_) table_.resize(static_cast<size_t>(table_end_ + table_end_ / 2));
    const int32_t used = pages_for(row_length_[r]);
    std::copy_n(table_.data() + row_table_offset_[r], used, table_.data() + offset);
    table_garbage_ += cap;
    row_table_offset_[r] = offset;
  }
  if (static_cast<int64_t>(table_.size()) < table_end_) table_.resize(static_cast<size_t>(table_end_ + table_end_ / 2));
  row_table_cap_[r] = new_cap;
}

void KvCacheManager::compact_table() {
  std::vector<int32_t> packed(static_cast<size_t>(table_end_ - table_garbage_));
  int64_t end = 0;
  for (size_t r = 0; r < row_table_cap_.size(); ++r) {
    const int32_t cap = row_table_cap_[r];
    if (cap == 0) continue;
    std::copy_n(table_.data() + row_table_offset_[r], pages_for(row_length_[r]), packed.data() + end);
    row_table_offset_[r] = end;
    end += cap;
  }
  ADAKV_CHECK(end == static_cast<int64_t>(packed.size()), "page table garbage count out of sync");
  table_ = std::move(packed);
  table_end_ = end;
  table_garbage_ = 0;
}

std::string KvCacheManager::check_consistency() const {
  std::vector<uint8_t> seen(static_cast<size_t>(num_pages_), 0);  // [num_pages]
  int64_t owned = 0;
  for (size_t r = 0; r < row_length_.size(); ++r) {
    const size_t seq = r / static_cast<size_t>(rows_per_seq_);
    const int32_t n = pages_for(row_length_[r]);
    if (!seq_active_[seq] && (n != 0 || row_table_cap_[r] != 0)) return "released row still holds pages";
    if (n > row_table_cap_[r]) return "row holds more pages than its table run";
    if (row_table_cap_[r] > 0 && row_table_offset_[r] + row_table_cap_[r] > table_end_) return "table run past table end";
    for (int32_t p = 0; p < n; ++p) {
      const int32_t page = table_[static_cast<size_t>(row_table_offset_[r] + p)];
      if (page < 0 || page >= num_pages_) return "page id out of range";
      if (seen[static_cast<size_t>(page)]) return "page owned twice";
      seen[static_cast<size_t>(page)] = 1;
      if (page_row_[static_cast<size_t>(page)] != static_cast<int32_t>(r)) return "page owner out of sync";
      ++owned;
    }
  }
  for (int32_t page : free_stack_) {
    if (page < 0 || page >= num_pages_) return "free page id out of range";
    if (seen[static_cast<size_t>(page)]) return "page both free and owned (or free twice)";
    seen[static_cast<size_t>(page)] = 1;
    if (page_row_[static_cast<size_t>(page)] != -1) return "free page has an owner";
  }
  if (owned + free_pages() != num_pages_) return "pages lost: owned + free != pool";
  int32_t active = 0;
  for (uint8_t a : seq_active_) active += a;
  if (active != num_active_seqs_) return "active sequence count out of sync";
  return {};
}

}  // namespace adakv
