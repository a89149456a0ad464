// Host-visible declarations of the decode attention kernels (bodies in decode_attention.cuh,
// instantiated per head dim in decode_attention_d{64,128}.cu so the two compile in parallel).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backends/cuda/paged_kv_view.h"

namespace adakv::cuda::decode_detail {

// Everything both kernels read; passed by value (__grid_constant__).
struct DecodeParams {
  PagedKvView kv;
  const void* q = nullptr;          // [num_seqs][num_qo_heads][head_dim] bf16 or fp32
  int64_t q_seq_stride = 0;         // elements
  __nv_bfloat16* out = nullptr;     // [num_seqs][num_qo_heads][head_dim]
  int64_t out_seq_stride = 0;       // elements
  float* lse = nullptr;             // [num_seqs][num_qo_heads] natural log, optional
  int32_t num_qo_heads = 0;
  int32_t group_size = 0;           // query heads per kv head, 1..8
  float scale_log2 = 0.f;           // softmax scale * log2(e)
  // The plan (device copies of DecodePlan's arrays).
  const int4* items = nullptr;              // [items] {row, page_begin, page_end, partial}
  const int32_t* warp_item_offsets = nullptr;  // [num_warps + 1]
  const int2* row_merge = nullptr;          // [num_rows] {partial_begin, partial_count}
  int32_t num_warps = 0;
  float* partial_o = nullptr;               // [partials][group_size][head_dim] normalised o
  float* partial_lse = nullptr;             // [partials][group_size] log2-sum-exp2 of scaled scores
  // Fused merge (nullptr: the merge kernel does it, or nobody when merge_kernel is false): one
  // arrival counter per row, zero between launches. The warp that writes a row's last partial
  // merges the row and resets its counter; empty rows are zeroed by the attention kernel.
  int32_t* row_counters = nullptr;          // [num_rows]
  // Block items (DecodeAttentionOptions::block_items): num_warps counts blocks, and block b's
  // first item is block_items[b]; each item is two int4:
  //   {page_off, num_pages, page_begin, row}  page_off: into page_ids (relative to the row's
  //                                      row_page_offsets entry unless items_absolute)
  //   {partial, next, 0, 0}              next: index of the block's next item, -1: none
  // page_begin: the item's first page within its row; the kernel takes the row's length from
  // kv.row_lengths (the plan holds page counts only, see DecodeAttention::plan).
  const int4* block_items = nullptr;
  int32_t items_absolute = 0;
  // Block items launched as a programmatic dependent (overlap_prologue): each warp asks for its
  // first prefetch_pages K/V pages in L2 before it waits for the preceding kernel, so the
  // layer's first DRAM reads overlap that kernel's tail. 0: no prefetch.
  int32_t prefetch_pages = 0;
  // Diagnostic (DecodeAttentionOptions::diagnostic_no_math): the block kernel loads every K/V word
  // and XORs it, with no other arithmetic; outputs are meaningless. Timing only.
  int32_t no_math = 0;
  // Diagnostic (DecodeAttentionOptions::diagnostic_merge_floor): the merge kernel (4 warps, 1
  // slice) or the fused merge loads one partial instead of all, so its chain is one L2 round
  // trip; the output is wrong. Timing only.
  int32_t merge_floor = 0;
  // Diagnostics (nullptr: off): %globaltimer stamps in ns, written by thread 0 of each block.
  // Attention block b: trace_attn[3b + {0: start, 1: past the wait, 2: done}]; merge block
  // (row, h): trace_merge[3 (row * group_size + h) + {0: past its wait, 1: partials folded,
  // 2: done}] (none for a row written directly: its block returns before the wait; with slices,
  // slice 0 stamps the wait and the latest slice the other two).
  unsigned long long* trace_attn = nullptr;
  unsigned long long* trace_merge = nullptr;
};

// How the partials of split rows are combined.
enum class MergeMode : int {
  kKernel = 0,  // a second (programmatically dependent) kernel
  kFused = 1,   // the last-arriving warp of each row, inside the attention kernel
  kNone = 2,    // nobody: split rows stay unmerged (timing of the attention kernel alone)
};

// The merge kernel's block width (warps) for a plan whose longest split row has `most` partials.
// A 4-warp block (64 registers per thread) fits beside two attention blocks and is resident
// before they finish; wider blocks wait for an SM to empty, which costs more than a second batch
// of loads (4 warps fold 36 partials per batch, 9 each). So 4 warps up to 64 partials, 16 above
// (144 per batch) where merge_shape_for's slices do not fit: Ada-KV's longest row at batch 1 has
// about 100-260. H200, 2026-11-28: 16 warps gained 1-4 points of copy bandwidth on those steps, 8 or more lost up to 3 on rows of 33
// and up to 8 at batch 32 (docs/benchmarks.md, "The merge's width").
inline int merge_warps_for(int most) { return most <= 64 ? 4 : 16; }

// The merge kernel's shape: warps per block and slices of head_dim per (row, head).
struct MergeShape {
  int warps = 4;
  int slices = 1;
};

// The shape for a plan whose longest split row has `most` partials, with `heads` = rows x group
// size (row, head) pairs, on `sms` SMs. A row of more than 72 partials (Ada-KV's longest row at
// batch 1: about 130 at d 128, 260 at d 64) is folded by 4 slices of 4-warp blocks, 144 partials
// per batch of loads, where all rows x group size x 4 blocks fit one per SM: at d 128 each is
// resident beside the two attention blocks before they finish, where a 16-warp block folds a
// quarter of the bytes per SM later (H200, 2026-11-28: batch 1 / 16K Ada 72.4-73.2 -> 76.9-77.2 %
// of copy, 32K Ada +2.3-2.6, d 64 Ada +0.3-1.8). Elsewhere merge_warps_for's width, one block per
// (row, head): 2 slices on d 64 batch 1's uniform rows of 66 partials lost 3-3.5 points to the
// 16-warp block (no merge block fits beside d 64's four attention blocks per SM).
inline MergeShape merge_shape_for(int most, int64_t heads, int sms) {
  if (most > 72 && heads * 4 <= sms) return {4, 4};
  return {merge_warps_for(most), 1};
}

// Launches the attention kernel (grid: num_warps / 4 blocks of 128 threads) and the merge kernel
// (grid: num_rows x group_size x merge_slices blocks of merge_warps = 4, 8, 16 or 32 warps;
// merge_slices 1, or 4 with 4 warps) on `stream`.
// pages_per_iter is 1, 2 or 4 (4 at head dim 64 only).
// dependent_launch (sm_90 only): the merge kernel is a programmatic dependent launch, so its
// launch overlaps the attention kernel's tail.
// merge kFused needs p.row_counters; kKernel and kNone need it null.
// block_items: p.block_items is set, p.num_warps counts blocks; overlap_prologue (sm_90): the
// attention kernel is itself a programmatic dependent of the preceding kernel.
template <int kHeadDim>
cudaError_t decode_attention_launch(const DecodeParams& p, bool q_f32, int pages_per_iter, bool dependent_launch,
                                    MergeMode merge, cudaStream_t stream, bool overlap_prologue = false,
                                    int merge_warps = 4, int merge_slices = 1);

// Resident 128-thread blocks per SM of the attention kernel variant.
template <int kHeadDim>
cudaError_t decode_attention_occupancy(bool q_f32, int pages_per_iter, int* blocks_per_sm, bool block_items = false);

extern template cudaError_t decode_attention_launch<64>(const DecodeParams&, bool, int, bool, MergeMode, cudaStream_t, bool, int, int);
extern template cudaError_t decode_attention_launch<128>(const DecodeParams&, bool, int, bool, MergeMode, cudaStream_t, bool, int, int);
extern template cudaError_t decode_attention_occupancy<64>(bool, int, int*, bool);
extern template cudaError_t decode_attention_occupancy<128>(bool, int, int*, bool);

}  // namespace adakv::cuda::decode_detail
