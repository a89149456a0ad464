// KvCacheManager: page accounting, transactional admission, compaction moves applied to a
// CpuKvStorage, and randomised operation sequences checked against a plain reference model
// (one std::vector of entry ids per row).
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "kv/cpu_kv_storage.h"
#include "kv/kv_cache_manager.h"

namespace adakv {
namespace {

KvLayout small_layout(int32_t layers = 2, int32_t heads = 2, int32_t page = 4) {
  KvLayout l;
  l.num_layers = layers;
  l.num_kv_heads = heads;
  l.head_dim = 3;
  l.page_size = page;
  return l;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Sum over every row of every live sequence of ceil(length / page_size).
int64_t expected_used_pages(const KvCacheManager& m, const std::vector<SeqId>& seqs) {
  int64_t total = 0;
  for (SeqId s : seqs)
    for (int32_t l = 0; l < m.layout().num_layers; ++l)
      for (int32_t h = 0; h < m.layout().num_kv_heads; ++h) total += ceil_div(m.length(s, l, h), m.layout().page_size);
  return total;
}

Admission grow(KvCacheManager& m, SeqId seq, int32_t n) {
  KvReservation r;
  const KvGrowth g{seq, n};
  const Admission a = m.reserve(std::span<const KvGrowth>(&g, 1), &r);
  if (a == Admission::kOk) m.commit(r);
  return a;
}

// Writes a recognisable entry: key = (id, layer, head), value = (-id, ...), position = id.
void write_entry(CpuKvStorage& st, KvSlot s, int32_t id, int32_t layer, int32_t head) {
  float* k = st.key(s);
  float* v = st.value(s);
  k[0] = static_cast<float>(id); k[1] = static_cast<float>(layer); k[2] = static_cast<float>(head);
  v[0] = -static_cast<float>(id); v[1] = static_cast<float>(layer) + 0.5f; v[2] = static_cast<float>(head) + 0.25f;
  st.position(s) = id;
}

void expect_entry(const CpuKvStorage& st, KvSlot s, int32_t id, int32_t layer, int32_t head) {
  const float* k = st.key(s);
  const float* v = st.value(s);
  EXPECT_EQ(k[0], static_cast<float>(id));
  EXPECT_EQ(k[1], static_cast<float>(layer));
  EXPECT_EQ(k[2], static_cast<float>(head));
  EXPECT_EQ(v[0], -static_cast<float>(id));
  EXPECT_EQ(v[1], static_cast<float>(layer) + 0.5f);
  EXPECT_EQ(v[2], static_cast<float>(head) + 0.25f);
  EXPECT_EQ(st.position(s), id);
}

TEST(KvCacheManager, FreshPoolAndFirstCommit) {
  KvCacheManager m(small_layout(), 32);
  EXPECT_EQ(m.num_pages(), 32);
  EXPECT_EQ(m.free_pages(), 32);
  EXPECT_EQ(m.rows_per_sequence(), 4);
  const SeqId s = m.add_sequence();
  EXPECT_TRUE(m.has_sequence(s));
  EXPECT_EQ(m.length(s, 1, 1), 0);
  EXPECT_TRUE(m.pages(s, 0, 0).empty());

  // 9 entries per row, pages of 4 -> 3 pages per row, 4 rows -> 12 pages.
  KvReservation r;
  const KvGrowth g{s, 9};
  ASSERT_EQ(m.reserve(std::span<const KvGrowth>(&g, 1), &r), Admission::kOk);
  EXPECT_EQ(r.pages_needed, 12);
  m.commit(r);
  EXPECT_EQ(m.used_pages(), 12);
  EXPECT_EQ(m.free_pages(), 20);
  for (int l = 0; l < 2; ++l)
    for (int h = 0; h < 2; ++h) {
      EXPECT_EQ(m.length(s, l, h), 9);
      EXPECT_EQ(m.pages(s, l, h).size(), 3u);
    }
  // Appending 3 more fills the last page exactly: no new page.
  ASSERT_EQ(grow(m, s, 3), Admission::kOk);
  EXPECT_EQ(m.used_pages(), 12);
  // One more entry needs one page per row.
  KvReservation r2;
  const KvGrowth g2{s, 1};
  ASSERT_EQ(m.reserve(std::span<const KvGrowth>(&g2, 1), &r2), Admission::kOk);
  EXPECT_EQ(r2.pages_needed, 4);
  // Logical length is separate from the rows' physical lengths.
  EXPECT_EQ(m.logical_length(s), 0);
  m.advance_logical_length(s, 12);
  EXPECT_EQ(m.logical_length(s), 12);
  EXPECT_EQ(m.check_consistency(), "");
}

TEST(KvCacheManager, SlotsFollowPageTable) {
  KvCacheManager m(small_layout(1, 1, 4), 8);
  const SeqId s = m.add_sequence();
  ASSERT_EQ(grow(m, s, 10), Admission::kOk);
  const auto pages = m.pages(s, 0, 0);
  ASSERT_EQ(pages.size(), 3u);
  std::set<KvSlot> slots;
  for (int32_t i = 0; i < 10; ++i) {
    const KvSlot sl = m.slot(s, 0, 0, i);
    EXPECT_EQ(sl, static_cast<KvSlot>(pages[static_cast<size_t>(i / 4)]) * 4 + i % 4);
    slots.insert(sl);
  }
  EXPECT_EQ(slots.size(), 10u);
}

TEST(KvCacheManager, ReserveNeverMutates) {
  KvCacheManager m(small_layout(), 16);
  const SeqId a = m.add_sequence();
  ASSERT_EQ(grow(m, a, 5), Admission::kOk);  // 2 pages per row -> 8
  const int64_t free_before = m.free_pages();
  for (int32_t n : {0, 1, 3, 4, 8, 9, 100, 1 << 20}) {
    KvReservation r;
    const KvGrowth g{a, n};
    (void)m.reserve(std::span<const KvGrowth>(&g, 1), &r);
    EXPECT_EQ(m.free_pages(), free_before);
    for (int l = 0; l < 2; ++l)
      for (int h = 0; h < 2; ++h) EXPECT_EQ(m.length(a, l, h), 5);
  }
  // An earlier reservation stays committable after any number of reserve() calls.
  KvReservation r;
  const KvGrowth g{a, 3};
  ASSERT_EQ(m.reserve(std::span<const KvGrowth>(&g, 1), &r), Admission::kOk);
  KvReservation other;
  const KvGrowth g2{a, 50};
  (void)m.reserve(std::span<const KvGrowth>(&g2, 1), &other);
  m.commit(r);
  EXPECT_EQ(m.length(a, 0, 0), 8);
  EXPECT_EQ(m.check_consistency(), "");
}

TEST(KvCacheManager, AdmissionBoundaries) {
  // 2 layers x 2 heads = 4 rows per sequence, pages of 4 entries, 16 pages in the pool.
  KvCacheManager m(small_layout(), 16);
  const SeqId a = m.add_sequence();
  const SeqId b = m.add_sequence();
  auto admit = [&](SeqId s, int32_t n) {
    KvReservation r;
    const KvGrowth g{s, n};
    return m.reserve(std::span<const KvGrowth>(&g, 1), &r);
  };
  // Empty pool: 16 entries per row = 4 pages x 4 rows = the whole pool.
  EXPECT_EQ(admit(a, 16), Admission::kOk);
  EXPECT_EQ(admit(a, 17), Admission::kImpossible);
  ASSERT_EQ(grow(m, a, 8), Admission::kOk);  // a holds 8 pages, 8 free
  // b: 8 entries -> 8 pages = free -> Ok; 9 -> 12 pages > 8 free but <= 16 -> Later.
  EXPECT_EQ(admit(b, 8), Admission::kOk);
  EXPECT_EQ(admit(b, 9), Admission::kLater);
  EXPECT_EQ(admit(b, 16), Admission::kLater);
  EXPECT_EQ(admit(b, 17), Admission::kImpossible);
  // a's own growth counts its existing pages: 8 held + 8 needed = 16 -> Ok; +9 -> Impossible.
  EXPECT_EQ(admit(a, 8), Admission::kOk);
  EXPECT_EQ(admit(a, 9), Admission::kImpossible);
  // Two sequences in one reservation: their pages after growth add up.
  {
    KvReservation r;
    const KvGrowth gs[2] = {{a, 0}, {b, 4}};  // a keeps 8, b needs 4 -> 12 <= 16, 4 <= 8 free
    EXPECT_EQ(m.reserve(gs, &r), Admission::kOk);
    EXPECT_EQ(r.pages_needed, 4);
    const KvGrowth gs2[2] = {{a, 4}, {b, 4}};  // 16 after, 8 needed = 8 free -> Ok
    EXPECT_EQ(m.reserve(gs2, &r), Admission::kOk);
    // With every live sequence in the reservation, needing more than the free pages means
    // more than the pool: a 16 + b 4 = 20 > 16 -> Impossible, never Later.
    const KvGrowth gs3[2] = {{a, 5}, {b, 4}};
    EXPECT_EQ(m.reserve(gs3, &r), Admission::kImpossible);
    const KvGrowth gs4[2] = {{a, 1}, {b, 1}};  // 12 + 4 = 16 after, 8 needed = 8 free -> Ok
    EXPECT_EQ(m.reserve(gs4, &r), Admission::kOk);
    // The same sequence twice: growths add up (4 + 5 = 9 -> 12 pages).
    const KvGrowth gs5[2] = {{b, 4}, {b, 5}};
    EXPECT_EQ(m.reserve(gs5, &r), Admission::kLater);
    EXPECT_EQ(r.pages_needed, 12);
  }
  // Compression frees pages: after keeping 4 entries in every row of a, b's 9 fits.
  for (int l = 0; l < 2; ++l)
    for (int h = 0; h < 2; ++h) {
      const std::vector<int32_t> keep = {0, 1, 2, 3};
      (void)m.keep_entries(a, l, h, keep);
    }
  EXPECT_EQ(m.used_pages(), 4);
  EXPECT_EQ(admit(b, 9), Admission::kOk);
  // Releasing returns everything.
  m.release(a);
  EXPECT_EQ(m.free_pages(), 16);
  EXPECT_FALSE(m.has_sequence(a));
  EXPECT_EQ(m.check_consistency(), "");
}

TEST(KvCacheManagerDeathTest, StaleReservationIsRefused) {
  KvCacheManager m(small_layout(), 16);
  const SeqId a = m.add_sequence();
  KvReservation r;
  const KvGrowth g{a, 2};
  ASSERT_EQ(m.reserve(std::span<const KvGrowth>(&g, 1), &r), Admission::kOk);
  ASSERT_EQ(grow(m, a, 1), Admission::kOk);  // another commit moves the epoch
  EXPECT_DEATH(m.commit(r), "stale reservation");
}

TEST(KvCacheManagerDeathTest, NotOkReservationIsRefused) {
  KvCacheManager m(small_layout(), 4);
  const SeqId a = m.add_sequence();
  KvReservation r;
  const KvGrowth g{a, 5};
  ASSERT_EQ(m.reserve(std::span<const KvGrowth>(&g, 1), &r), Admission::kImpossible);
  EXPECT_DEATH(m.commit(r), "not Ok");
}

TEST(KvCacheManager, KeepEntriesMovesExactlyTheRequestedEntries) {
  const KvLayout layout = small_layout(2, 2, 4);
  KvCacheManager m(layout, 64);
  CpuKvStorage st(layout, 64);
  const SeqId s = m.add_sequence();
  ASSERT_EQ(grow(m, s, 23), Admission::kOk);
  for (int l = 0; l < 2; ++l)
    for (int h = 0; h < 2; ++h)
      for (int i = 0; i < 23; ++i) write_entry(st, m.slot(s, l, h, i), i, l, h);
  // Different keep sets per head: heads of a layer end with different lengths.
  const std::vector<std::vector<int32_t>> keeps = {
      {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22},  // all
      {3, 7, 8, 15, 16, 22},
      {},
      {22}};
  const int64_t free_before = m.free_pages();
  int k = 0;
  for (int l = 0; l < 2; ++l)
    for (int h = 0; h < 2; ++h, ++k) {
      const auto moves = m.keep_entries(s, l, h, keeps[static_cast<size_t>(k)]);
      st.apply(moves);
      ASSERT_EQ(m.length(s, l, h), static_cast<int32_t>(keeps[static_cast<size_t>(k)].size()));
      for (size_t i = 0; i < keeps[static_cast<size_t>(k)].size(); ++i)
        expect_entry(st, m.slot(s, l, h, static_cast<int32_t>(i)), keeps[static_cast<size_t>(k)][i], l, h);
    }
  EXPECT_EQ(m.keep_entries(s, 0, 0, keeps[0]).size(), 0u);  // identity keep: no moves
  // 6 pages per row before; after: 6 + 2 + 0 + 1 = 9 pages.
  EXPECT_EQ(m.used_pages(), 9);
  EXPECT_EQ(m.free_pages(), free_before + 24 - 9);
  EXPECT_EQ(m.used_pages(), expected_used_pages(m, {s}));
  EXPECT_EQ(m.check_consistency(), "");
}

TEST(KvCacheManager, EvictEntriesFillsHolesFromTheTail) {
  const KvLayout layout = small_layout(1, 1, 4);
  KvCacheManager m(layout, 8);
  CpuKvStorage st(layout, 8);
  const SeqId s = m.add_sequence();
  ASSERT_EQ(grow(m, s, 10), Admission::kOk);
  for (int i = 0; i < 10; ++i) write_entry(st, m.slot(s, 0, 0, i), i, 0, 0);
  // Evict {1, 4, 9, 8}: new length 6, holes {1, 4}, tail survivors {6, 7}.
  const std::vector<int32_t> evict = {1, 4, 9, 8};
  const auto moves = m.evict_entries(s, 0, 0, evict);
  ASSERT_EQ(moves.size(), 2u);
  st.apply(moves);
  ASSERT_EQ(m.length(s, 0, 0), 6);
  const std::vector<int32_t> expected = {0, 6, 2, 3, 7, 5};
  for (int i = 0; i < 6; ++i) expect_entry(st, m.slot(s, 0, 0, i), expected[static_cast<size_t>(i)], 0, 0);
  EXPECT_EQ(m.used_pages(), 2);
  EXPECT_EQ(m.check_consistency(), "");
}

// What a mirror of the page lists (the CUDA page table) relies on: a serial per add_sequence that
// no reused id or other manager repeats, and a shrink count that stays put while rows only grow,
// in which case every row's earlier page list is a prefix of its current one.
TEST(KvCacheManager, SerialsAndShrinksTellAMirrorWhatChanged) {
  const KvLayout layout = small_layout(2, 2, 4);
  KvCacheManager m(layout, 200), other(layout, 200);
  const SeqId a = m.add_sequence();
  const SeqId b = other.add_sequence();
  ASSERT_EQ(a, b);  // the same id in two managers...
  EXPECT_NE(m.sequence_serial(a), other.sequence_serial(b));  // ...is not the same sequence
  const uint64_t first = m.sequence_serial(a);
  m.release(a);
  const SeqId a2 = m.add_sequence();
  ASSERT_EQ(a2, a);  // the id is reused...
  EXPECT_NE(m.sequence_serial(a2), first);  // ...the serial is not
  EXPECT_EQ(m.sequence_shrinks(a2), 0u);

  ASSERT_EQ(grow(m, a2, 10), Admission::kOk);  // 3 pages per row
  EXPECT_EQ(m.sequence_shrinks(a2), 0u);
  std::vector<int32_t> all(10);
  std::iota(all.begin(), all.end(), 0);
  (void)m.keep_entries(a2, 0, 0, all);  // keeps every entry: no page given back
  EXPECT_EQ(m.sequence_shrinks(a2), 0u);
  (void)m.evict_entries(a2, 0, 1, std::vector<int32_t>{0});  // 10 -> 9 entries: still 3 pages
  EXPECT_EQ(m.sequence_shrinks(a2), 0u);
  (void)m.keep_entries(a2, 1, 0, std::vector<int32_t>{1, 5});  // 3 pages -> 1
  EXPECT_EQ(m.sequence_shrinks(a2), 1u);

  // Random grows, keeps and evicts on three sequences: between two looks at a sequence whose
  // shrink count did not move, each row's old pages are a prefix of its new ones.
  std::mt19937 rng(7);
  std::vector<SeqId> seqs = {a2, m.add_sequence(), m.add_sequence()};
  std::map<SeqId, std::vector<std::vector<int32_t>>> seen;
  std::map<SeqId, uint64_t> seen_shrinks;
  int prefix_checks = 0;
  for (int it = 0; it < 400; ++it) {
    const SeqId s = seqs[rng() % seqs.size()];
    const int op = static_cast<int>(rng() % 4);
    const int32_t l = static_cast<int32_t>(rng() % 2), h = static_cast<int32_t>(rng() % 2);
    const int32_t len = m.length(s, l, h);
    if (op <= 1) {
      if (grow(m, s, static_cast<int32_t>(1 + rng() % 5)) != Admission::kOk) continue;
    } else if (op == 2 && len > 0) {
      std::vector<int32_t> keep;
      for (int32_t i = 0; i < len; ++i)
        if (rng() % 3 != 0) keep.push_back(i);
      (void)m.keep_entries(s, l, h, keep);
    } else if (op == 3 && len > 0) {
      (void)m.evict_entries(s, l, h, std::vector<int32_t>{static_cast<int32_t>(rng() % len)});
    }
    // Look at one sequence, as a mirror would before a step.
    const SeqId look = seqs[rng() % seqs.size()];
    std::vector<std::vector<int32_t>> now;
    for (int32_t ll = 0; ll < 2; ++ll)
      for (int32_t hh = 0; hh < 2; ++hh) {
        const auto p = m.pages(look, ll, hh);
        now.emplace_back(p.begin(), p.end());
      }
    if (seen.count(look) && seen_shrinks[look] == m.sequence_shrinks(look)) {
      for (size_t r = 0; r < now.size(); ++r) {
        const auto& old = seen[look][r];
        ASSERT_LE(old.size(), now[r].size()) << "a row lost pages without a shrink being counted";
        EXPECT_TRUE(std::equal(old.begin(), old.end(), now[r].begin())) << "row " << r << " changed a mirrored page";
        ++prefix_checks;
      }
    }
    seen[look] = now;
    seen_shrinks[look] = m.sequence_shrinks(look);
  }
  EXPECT_GT(prefix_checks, 100);
  EXPECT_EQ(m.check_consistency(), "");
}

// Randomised sequences of add / grow / keep / evict / release, checked after every step against
// a reference model that keeps each row as a std::vector of entry ids.
TEST(KvCacheManager, RandomisedAgainstReferenceModel) {
  for (int32_t page_size : {1, 3, 16}) {
    const KvLayout layout = small_layout(3, 2, page_size);
    const int64_t pool = 60;
    KvCacheManager m(layout, pool);
    CpuKvStorage st(layout, pool);
    std::mt19937 rng(1234 + page_size);
    std::map<SeqId, std::vector<std::vector<int32_t>>> ref;  // seq -> [row] -> entry ids
    int32_t next_id = 0;
    auto rnd = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
    auto verify = [&]() {
      ASSERT_EQ(m.check_consistency(), "");
      std::vector<SeqId> seqs;
      int64_t used = 0;
      for (auto& [s, rows] : ref) {
        seqs.push_back(s);
        for (int l = 0; l < 3; ++l)
          for (int h = 0; h < 2; ++h) {
            const auto& row = rows[static_cast<size_t>(l * 2 + h)];
            ASSERT_EQ(m.length(s, l, h), static_cast<int32_t>(row.size()));
            used += ceil_div(static_cast<int64_t>(row.size()), page_size);
            for (size_t i = 0; i < row.size(); ++i) expect_entry(st, m.slot(s, l, h, static_cast<int32_t>(i)), row[i], l, h);
          }
      }
      ASSERT_EQ(m.used_pages(), used);
      ASSERT_EQ(m.used_pages(), expected_used_pages(m, seqs));
      ASSERT_EQ(m.free_pages() + used, pool);
    };
    for (int step = 0; step < 1500; ++step) {
      const int op = rnd(0, 9);
      if (op == 0 || ref.empty()) {
        if (ref.size() < 5) ref[m.add_sequence()] = std::vector<std::vector<int32_t>>(6);
      } else {
        auto it = ref.begin();
        std::advance(it, rnd(0, static_cast<int>(ref.size()) - 1));
        const SeqId s = it->first;
        auto& rows = it->second;
        if (op <= 4) {
          const int32_t n = rnd(0, 2 * page_size + 2);
          KvReservation r;
          const KvGrowth g{s, n};
          const int64_t free_before = m.free_pages();
          const Admission a = m.reserve(std::span<const KvGrowth>(&g, 1), &r);
          ASSERT_EQ(m.free_pages(), free_before);
          // Independent admission: pages needed, and this sequence's pages after growth.
          int64_t need = 0, after = 0;
          for (const auto& row : rows) {
            const int64_t len = static_cast<int64_t>(row.size());
            need += ceil_div(len + n, page_size) - ceil_div(len, page_size);
            after += ceil_div(len + n, page_size);
          }
          ASSERT_EQ(r.pages_needed, need);
          const Admission want = after > pool ? Admission::kImpossible
                                 : need > m.free_pages() ? Admission::kLater
                                                         : Admission::kOk;
          ASSERT_EQ(a, want);
          if (a == Admission::kOk) {
            m.commit(r);
            for (int l = 0; l < 3; ++l)
              for (int h = 0; h < 2; ++h) {
                auto& row = rows[static_cast<size_t>(l * 2 + h)];
                for (int i = 0; i < n; ++i) {
                  const int32_t id = next_id++;
                  write_entry(st, m.slot(s, l, h, static_cast<int32_t>(row.size())), id, l, h);
                  row.push_back(id);
                }
              }
          }
        } else if (op <= 6) {
          const int l = rnd(0, 2), h = rnd(0, 1);
          auto& row = rows[static_cast<size_t>(l * 2 + h)];
          std::vector<int32_t> keep;
          std::vector<int32_t> kept_ids;
          for (size_t i = 0; i < row.size(); ++i)
            if (rnd(0, 2) != 0) {
              keep.push_back(static_cast<int32_t>(i));
              kept_ids.push_back(row[i]);
            }
          st.apply(m.keep_entries(s, l, h, keep));
          row = kept_ids;
        } else if (op <= 8) {
          const int l = rnd(0, 2), h = rnd(0, 1);
          auto& row = rows[static_cast<size_t>(l * 2 + h)];
          std::vector<int32_t> idx(row.size());
          std::iota(idx.begin(), idx.end(), 0);
          std::shuffle(idx.begin(), idx.end(), rng);
          idx.resize(static_cast<size_t>(rnd(0, static_cast<int>(row.size()))));
          st.apply(m.evict_entries(s, l, h, idx));
          // Reference: the survivors as a set; the manager's order is checked against the
          // documented rule (lowest hole <- lowest tail survivor).
          std::vector<uint8_t> gone(row.size(), 0);
          for (int32_t e : idx) gone[static_cast<size_t>(e)] = 1;
          const size_t new_len = row.size() - idx.size();
          std::vector<int32_t> tail;
          for (size_t i = new_len; i < row.size(); ++i)
            if (!gone[i]) tail.push_back(row[i]);
          std::vector<int32_t> next(row.begin(), row.begin() + static_cast<std::ptrdiff_t>(new_len));
          size_t t = 0;
          for (size_t i = 0; i < new_len; ++i)
            if (gone[i]) next[i] = tail[t++];
          ASSERT_EQ(t, tail.size());
          std::multiset<int32_t> want_set;
          for (size_t i = 0; i < row.size(); ++i)
            if (!gone[i]) want_set.insert(row[i]);
          ASSERT_EQ(std::multiset<int32_t>(next.begin(), next.end()), want_set);
          row = next;
        } else {
          m.release(s);
          ref.erase(it);
        }
      }
      verify();
      if (HasFatalFailure()) return;
    }
    for (auto& [s, rows] : ref) m.release(s);
    EXPECT_EQ(m.free_pages(), pool);
    EXPECT_EQ(m.check_consistency(), "");
  }
}

// Many sequences that grow one entry at a time force page-table runs to relocate and the
// table to compact; the page lists must survive both.
TEST(KvCacheManager, PageTableRelocationAndCompaction) {
  const KvLayout layout = small_layout(4, 4, 1);
  const int64_t pool = 16000;
  KvCacheManager m(layout, pool);
  CpuKvStorage st(layout, pool);
  std::vector<SeqId> seqs;
  for (int i = 0; i < 6; ++i) seqs.push_back(m.add_sequence());
  int32_t id = 0;
  std::map<std::pair<SeqId, int>, std::vector<int32_t>> ref;
  for (int round = 0; round < 3; ++round) {
    for (int step = 0; step < 40; ++step)
      for (SeqId s : seqs) {
        ASSERT_EQ(grow(m, s, 1), Admission::kOk);
        for (int l = 0; l < 4; ++l)
          for (int h = 0; h < 4; ++h) {
            auto& row = ref[{s, l * 4 + h}];
            write_entry(st, m.slot(s, l, h, static_cast<int32_t>(row.size())), id, l, h);
            row.push_back(id++);
          }
      }
    // Release half, re-add them: their rows start over at the end of the table.
    for (int i = 0; i < 3; ++i) {
      const SeqId s = seqs[static_cast<size_t>(i * 2)];
      m.release(s);
      for (int r = 0; r < 16; ++r) ref.erase({s, r});
      seqs[static_cast<size_t>(i * 2)] = m.add_sequence();
    }
    ASSERT_EQ(m.check_consistency(), "");
  }
  for (SeqId s : seqs)
    for (int l = 0; l < 4; ++l)
      for (int h = 0; h < 4; ++h) {
        const auto& row = ref[{s, l * 4 + h}];
        ASSERT_EQ(m.length(s, l, h), static_cast<int32_t>(row.size()));
        for (size_t i = 0; i < row.size(); ++i) expect_entry(st, m.slot(s, l, h, static_cast<int32_t>(i)), row[i], l, h);
      }
  EXPECT_EQ(m.used_pages(), expected_used_pages(m, seqs));
}

}  // namespace
}  // namespace adakv
