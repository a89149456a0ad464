// KV-Compress block costs and cross-layer selection (method.md 2.4), worked by hand.
#include <gtest/gtest.h>

#include <algorithm>
#include <limits>

#include "compress/kvcompress.h"

namespace adakv {
namespace {

std::vector<int32_t> sorted(std::vector<int32_t> v) {
  std::sort(v.begin(), v.end());
  return v;
}

// Row A: 10 entries, positions 0..9, logical length 10, protected window 2 (positions 8, 9).
const std::vector<float> kMetricA = {5, 1, 9, 3, 7, 2, 8, 6, 4, 0};
const std::vector<int32_t> kPosA = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
// Row B: 8 entries, ties: metric 1 at positions 4..7, 4 at 0..3.
const std::vector<float> kMetricB = {4, 4, 4, 4, 1, 1, 1, 1};
const std::vector<int32_t> kPosB = {0, 1, 2, 3, 4, 5, 6, 7};

TEST(CompressKvCompress, EvictionOrderSkipsProtectedAndBreaksTiesByLaterPosition) {
  const KvCompressRow a{kMetricA, kPosA};
  // Unprotected metrics by position: 5 1 9 3 7 2 8 6 -> ascending 1(p1) 2(p5) 3(p3) 5(p0) 6(p7) 7(p4) 8(p6) 9(p2).
  EXPECT_EQ(kvcompress_eviction_order(a, 10, 2), (std::vector<int32_t>{1, 5, 3, 0, 7, 4, 6, 2}));
  const KvCompressRow b{kMetricB, kPosB};
  EXPECT_EQ(kvcompress_eviction_order(b, 10, 2), (std::vector<int32_t>{7, 6, 5, 4, 3, 2, 1, 0}));
}

TEST(CompressKvCompress, BlockCostsAtHangingOffsets) {
  // Block size 4. Row A: hanging = 10 % 4 = 2; cost_1 = sorted[1] = 2, cost_2 = sorted[5] = 7,
  // cost_3 would be sorted[9] but only 8 entries are unprotected.
  EXPECT_EQ(kvcompress_block_costs({kMetricA, kPosA}, 4, 10, 2), (std::vector<float>{2, 7}));
  // Row B: 8 entries, the last block is full: hanging = 4; costs sorted[3] = 1, sorted[7] = 4.
  EXPECT_EQ(kvcompress_block_costs({kMetricB, kPosB}, 4, 10, 2), (std::vector<float>{1, 4}));
  // Everything protected: nothing can be freed.
  EXPECT_TRUE(kvcompress_block_costs({kMetricA, kPosA}, 4, 10, 10).empty());
  // Block size 1: every unprotected entry is its own block, costs ascending.
  EXPECT_EQ(kvcompress_block_costs({kMetricA, kPosA}, 1, 10, 2), (std::vector<float>{1, 2, 3, 5, 6, 7, 8, 9}));
}

TEST(CompressKvCompress, CheapestBlocksAcrossRowsUntilWithinBudget) {
  const KvCompressRow rows[2] = {{kMetricA, kPosA}, {kMetricB, kPosB}};
  // 18 entries. Blocks by cost: B1 (1, frees 4), A1 (2, frees 2), B2 (4, frees 4), A2 (7, frees 4).
  auto e = kvcompress_select(rows, 18, 4, 10, 2);
  EXPECT_TRUE(e[0].empty() && e[1].empty());
  e = kvcompress_select(rows, 14, 4, 10, 2);  // B1: 18 -> 14
  EXPECT_TRUE(e[0].empty());
  EXPECT_EQ(sorted(e[1]), (std::vector<int32_t>{4, 5, 6, 7}));
  e = kvcompress_select(rows, 13, 4, 10, 2);  // B1, A1: -> 12
  EXPECT_EQ(sorted(e[0]), (std::vector<int32_t>{1, 5}));
  EXPECT_EQ(sorted(e[1]), (std::vector<int32_t>{4, 5, 6, 7}));
  e = kvcompress_select(rows, 5, 4, 10, 2);  // all four blocks: -> 4
  EXPECT_EQ(sorted(e[0]), (std::vector<int32_t>{0, 1, 3, 4, 5, 7}));
  EXPECT_EQ(sorted(e[1]), (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  // Nothing more can go (protected entries, and a partial block never): the same at budget 0.
  auto z = kvcompress_select(rows, 0, 4, 10, 2);
  EXPECT_EQ(sorted(z[0]), sorted(e[0]));
  EXPECT_EQ(sorted(z[1]), sorted(e[1]));
  // Every row that lost entries ends on a block boundary: 10 - 6 = 4, 8 - 8 = 0.
}

TEST(CompressKvCompress, TiedCostsFreeTheHigherRowFirst) {
  const std::vector<float> m = {1, 1, 1, 1};
  const std::vector<int32_t> pos = {0, 1, 2, 3};
  const KvCompressRow rows[3] = {{m, pos}, {m, pos}, {m, pos}};
  // Block size 2, no protection: each row has two blocks of cost 1. Budget 10 of 12: one block,
  // from the highest row.
  auto e = kvcompress_select(rows, 10, 2, 4, 0);
  EXPECT_TRUE(e[0].empty());
  EXPECT_TRUE(e[1].empty());
  EXPECT_EQ(sorted(e[2]), (std::vector<int32_t>{2, 3}));  // ties: the later positions first
  e = kvcompress_select(rows, 7, 2, 4, 0);  // three blocks: row 2 both, then row 1 first
  EXPECT_TRUE(e[0].empty());
  EXPECT_EQ(sorted(e[1]), (std::vector<int32_t>{2, 3}));
  EXPECT_EQ(sorted(e[2]), (std::vector<int32_t>{0, 1, 2, 3}));
}

}  // namespace
}  // namespace adakv
