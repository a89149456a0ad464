// Decode attention over per-head pages: one query token per sequence against every cached entry
// of its rows, where each (sequence, kv head) row has its own length.
//
// Why a plan: with Ada-KV's skew (longest head 3-20x the mean) a kernel that walks each row in
// one thread-block chain leaves most SMs idle while the long rows finish. Here the host splits
// the total work (pages of all rows) into equal shares, one per resident warp of the device (v2)
// or one per resident 4-warp block (v3 block items, the default: the block's warps interleave
// the pages and combine in shared memory); by default a long row is cut into whole shares and
// short rows are packed (DecodeSplit::kRowAligned), else a share may end in the middle of a row
// and cover several rows (kBalanced). Each (warp or block, row piece) is a work item; a piece
// that is a whole row writes the output directly, the others write a partial result (normalised
// o and its log-sum-exp) merged through the softmax state, either by a second kernel or, fused,
// by the warp that finishes the row's last piece (a per-row arrival counter).
//
// Computation, per row (seq s, kv head k) and each of its g = H / Hkv query heads h:
//   out[s][h] = softmax_j(scale * q[s][h] . K[j]) V[j]      over the row's valid entries j
//   lse[s][h] = ln sum_j exp(scale * q[s][h] . K[j])        (optional output)
// bf16 K/V/out, q bf16 or fp32 (rounded to bf16 for the tensor cores), fp32 accumulation and
// softmax. A row of length 0 yields out = 0 and lse = -inf (an empty softmax has no value; zeros
// keep the following projection finite, and a decode step never attends to an empty row anyway).
//
// Use: create() once (allocates every device buffer: no allocation per step), then each step
// plan(row lengths on the host) and run() on the same stream. plan() does the host work and one
// small asynchronous upload, or nothing while every row keeps its page count (the plan holds
// pages; the kernels read exact lengths from the view); run() reads only plain device parameters (CUDA-graph friendly: the
// grid of the attention kernel depends only on the device and the split mode, the merge grid only
// on the number of rows; with DecodeMerge::kAuto a graph keeps the merge chosen when captured:
// both merge any plan correctly, the other may just be faster for a later plan).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "backends/cuda/paged_kv_view.h"
#include "core/dtype.h"
#include "core/status.h"

namespace adakv::cuda {

// --- the plan (host side; pure functions, testable without a GPU) -----------------------------

// One contiguous run of pages of one row, processed by one warp.
struct DecodeWorkItem {
  int32_t row = 0;
  int32_t page_begin = 0;  // first page of the piece, relative to the row
  int32_t page_end = 0;    // one past the last page
  int32_t partial = -1;    // index of its partial result; -1: the piece is the whole row
};

// How a row's output is produced: partial_count -1 = written directly by its single work item,
// 0 = empty row (zeros), >= 2 = merged from partials [partial_begin, partial_begin + count).
struct DecodeRowMerge {
  int32_t partial_begin = 0;
  int32_t partial_count = 0;
};

enum class DecodeSplit {
  kBalanced,        // equal shares of pages over all warp slots (the fast path)
  kOneBlockPerRow,  // baseline: one 4-warp block per row, each warp a quarter of the row
  // The default: like kBalanced, but no slot holds a piece of a split row beside another item: a
  // long row gets a whole number of slots (near-equal pieces), short rows are packed whole. Under
  // kBalanced a slot whose share ends inside a row runs two items one after the other (the second
  // one's loads start only when the first is done), and those slots finish the layer last.
  // Rounding rows to whole slots raises the share where many rows are about a share long (large
  // batches with skewed rows), so the planner aligns only with at least 4 slots per non-empty row
  // and keeps the balanced split wherever the aligned one's busiest slot would cost more (pages,
  // plus item_cost_pages per item and again per item after a slot's first). Where every row fits
  // a slot of its own, rows stay whole (no partials, no merge) unless that costs more than
  // merge_cost_pages on the busiest slot.
  kRowAligned,
};

struct DecodePlanOptions {
  DecodeSplit split = DecodeSplit::kRowAligned;
  // A warp's share is at least this many pages, so small steps use fewer warps and fewer partials.
  int32_t min_pages_per_warp = 4;
  // The two costs below are times, counted in pages of 16 x 128 K and V entries (8 KB of bf16, about
  // 0.5 us of a slot's reading on an H200, 8 warps per SM); effective_plan_options() scales them by
  // a slot's own time per page (x2 at head_dim 64 with 8 warps per SM, x1 with the engine's 16).
  //
  // Fixed cost of starting a work item (loads of the item, the row's page-table offset, q; the
  // epilogue's stores), in page-equivalents; keeps warps given many short rows from finishing last.
  // A slot's second item starts its loads only when the first is done, which costs more than the
  // 1 us that 2 pages model: with 6 the balanced split gives two-item slots fewer pages (H200,
  // 2026-11-28: batch 8 / 4K Ada 82.0-82.5 -> 83.8-84.6 % of copy, d 64 Ada and batch 32-64 steps
  // +0.6-1.6, none lower; 8 tips batch 8 Ada into the aligned split and loses).
  int32_t item_cost_pages = 6;
  // The merge of split rows (its kernel, the partials' writes and reads), in page-equivalents of
  // a slot's work: kRowAligned keeps every row whole, with no merge, where that makes its busiest
  // slot at most this much busier than the split's. About 2.5 us on an H200, where a slot reads a
  // page of 16 x 128 K and V in about 0.5 us at the copy rate.
  int32_t merge_cost_pages = 8;
  // kRowAligned searches the aligned split only with at least this many slots per non-empty row
  // (below, many rows are about a share long and rounding them to whole slots rarely pays; the
  // search costs host time on every re-plan). 4 takes in batch 8 of 8 kv heads: on an H200 its
  // 4K uniform step gained 2-3 points of copy bandwidth at d 128 and 4.5 at d 64 (2026-11-28).
  int32_t align_min_slots_per_row = 4;
};

struct DecodePlan {
  int32_t num_rows = 0;
  int32_t num_warps = 0;     // warp slots of the attention launch (warp_item_offsets has +1)
  int32_t num_partials = 0;
  int64_t total_pages = 0;
  std::vector<DecodeWorkItem> items;       // [items] grouped by warp, in warp order
  std::vector<int32_t> warp_item_offsets;  // [num_warps + 1] CSR: items of warp w
  std::vector<DecodeRowMerge> row_merge;   // [num_rows]
};

inline constexpr int kDecodeWarpsPerBlock = 4;

// Splits rows of the given lengths (entries, >= 0) over `num_warp_slots` warps (balanced split)
// or over one block per row. Fails on a negative length or a row count above 2^31 / 4.
Expected<DecodePlan> decode_attention_plan(std::span<const int32_t> row_lengths,
                                           int32_t num_warp_slots, const DecodePlanOptions& options);

// --- the runner (device side) -----------------------------------------------------------------

// Who combines the partials of split rows.
enum class DecodeMerge {
  // kFused when no row of the plan has more than fused_max_partials pieces (or, where the merge
  // kernel's grid of rows x group size blocks exceeds the SMs, fused_max_partials_crowded), else
  // kKernel: one block merging a few partials costs less than a second launch; many partials (a
  // small batch split over every SM) are merged faster by the merge kernel's many blocks.
  kAuto,
  kKernel,  // a second kernel (programmatic dependent launch on sm_90) merges every split row
  kFused,   // no second launch: the warp that finishes a row's last piece merges the row
  kNone,    // timing only: split rows are left unmerged (their output is NOT written)
};

struct DecodeAttentionOptions {
  int32_t num_qo_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;          // 64 or 128
  DType q_dtype = DType::kBF16;  // kBF16 or kF32
  int32_t max_rows = 0;          // most rows (num_seqs * num_kv_heads) one step may have
  // Kernel variant: pages whose loads are issued together before any of them is used (1, 2; 4 at
  // head_dim 64 only).
  int32_t pages_per_iter = 2;
  // 0: as many warps per SM as the kernel's occupancy allows; else at most this many.
  int32_t max_warps_per_sm = 0;
  // sm_90+: launch the merge kernel as a programmatic dependent of the attention kernel.
  bool dependent_launch = true;
  // Default kKernel: on an H100 (2026-11-27) the fused merge was never faster: 1.8-3x slower at
  // batch 1 (64-500 partials per row merged by one warp from L2), within +-2 % from batch 8 x 16K
  // on; the merge kernel under PDL costs about 3 us at batch 1 / 4K and under 1 % from 500 MB on.
  // The engine uses kAuto: since the aligned split gives batch 8 rows about 4 pieces each, the
  // fused merge is 3-4.5 points of copy bandwidth ahead there (H200, 2026-11-28).
  DecodeMerge merge = DecodeMerge::kKernel;
  int32_t fused_max_partials = 16;  // kAuto: fuse the merge while no row has more pieces
  // kAuto where the merge kernel has more blocks (rows x group size) than the device has SMs: only
  // one merge block per SM is resident beside the attention blocks before they finish, so the
  // others start late, and the fused merge pays off up to this many pieces. H200, 2026-11-28
  // (session 14): batch 8 Ada, whose longest row has 34 pieces at d 128, +1.0-1.3 points of copy
  // bandwidth at 4K and 16K (batch 8 / 4K Ada 85.8-85.9 -> 87.1-87.3 %); d 64 batch 32 / 4K Ada
  // (17 pieces) +0.5-0.9; d 64 batch 8 / 4K Ada (66 pieces) lost 4.6 fused, so it keeps the kernel.
  int32_t fused_max_partials_crowded = 40;
  // Warps per block of the merge kernel (4, 8, 16 or 32); 0: from each plan's longest split row
  // (merge_shape_for: 4, or 16 above 64 partials, so that the long rows of Ada-KV's skew at small
  // batches are folded in one batch of L2 loads; at batch 1, 4 warps in 4 slices instead). A
  // captured graph keeps the width and slices of its capture (any shape merges correctly).
  int32_t merge_warps = 0;
  // Slices of head_dim per (row, head) in the merge kernel (1 or 4; 4 with 4-warp blocks only;
  // 2 lost, docs/benchmarks.md v14); 0: with merge_warps 0, both from each plan (merge_shape_for: 4 slices where
  // the longest split row has more than 72 partials and the blocks fit one per SM), else 1.
  int32_t merge_slices = 0;
  // Block items (v3, default): the plan splits the pages over thread blocks instead of warps; the
  // 4 warps of a block take every 4th page of the block's piece of a row and combine their softmax
  // states in shared memory, so a piece writes one partial (4x fewer partials and merge reads).
  // Each block's first item is found at index blockIdx.x and carries its page-table position and
  // valid length: one load before the page ids (the warp kernel's chain was four). false: the v2
  // kernel (one item chain per warp).
  bool block_items = true;
  // sm_90, block items only: launch the attention kernel as a programmatic dependent of whatever
  // kernel precedes it on the stream, so its launch and its plan and page-id loads overlap that
  // kernel's tail; it waits (griddepcontrol.wait) before reading q or K/V and before any write.
  // Only safe when the preceding kernel does not write the plan, the page table (row_page_offsets,
  // page_ids) or row lengths of this call; off by default for that reason.
  bool overlap_prologue = false;
  // With overlap_prologue: each warp requests its first this many K/V pages in L2 before the
  // wait, so the first DRAM reads of the step overlap the preceding kernel's tail (0: none; 0..32).
  // On an H100, 8 was best for back-to-back layers up to 134 MB per step, 4 above; on an H200 2
  // from 34 MB on, 8 only at 17 MB (docs/benchmarks.md, "The layer boundary overlapped", "v5").
  int32_t prefetch_pages = 0;
  // Diagnostic, timing only (outputs are meaningless): the block kernel reads every K/V byte of
  // the plan and uses each word once, with no attention arithmetic; plan, partial writes and
  // merge as usual. Separates what the split-and-merge structure costs from what the arithmetic
  // adds (bench_decode_attention's ap2rn, bpa2rn, ap2rnf, afnf).
  bool diagnostic_no_math = false;
  // Diagnostic, timing only (outputs are wrong): the merge kernel (where it runs with 4 warps and
  // 1 slice) or the fused merge loads one partial instead of folding all of them: the shortest
  // chain a merge can have (bench_decode_attention's ap2rf, ap2rnf, afnf).
  bool diagnostic_merge_floor = false;
  DecodePlanOptions plan;
};

// The plan options run() plans with, from the runner's and the attention kernel's resident warps
// per SM: block items make the slots blocks, whose share is at least twice a warp's minimum; the
// item and merge costs are times counted in pages of a d 128 step at 8 warps per SM (2 pages per
// iteration), so they scale by how much faster a slot reads one of its own pages: x2 at head dim
// 64 with 8 warps per SM (4 pages per iteration), x1 at 64 with 16 (2 pages per iteration, the
// engine's: twice the slots share the bandwidth). H200, 2026-11-28: at d 64 with 4 pages per
// iteration, 12 against 6 gave batch 8 / 4K Ada 67.0-67.4 -> 67.8-68.1 % of copy and batch 8-64 Ada
// from 268 MB +0.4-1.0; with 2 pages per iteration 12 and 6 were level (within 0.8 either way).
DecodePlanOptions effective_plan_options(const DecodeAttentionOptions& options, int32_t warps_per_sm);

// Partials of the plan's longest split row (0: no row is split).
int32_t longest_split_row(const DecodePlan& plan);

// The merge run() uses for `plan` on a device of `sms` SMs: options.merge, or for kAuto kFused
// while no row has more pieces than fused_max_partials (fused_max_partials_crowded where the
// merge kernel would have more blocks, rows x group size, than the device has SMs), else kKernel.
DecodeMerge auto_merge(const DecodeAttentionOptions& options, const DecodePlan& plan, int32_t sms);

class DecodeAttentionLayers;

class DecodeAttention {
 public:
  // Checks the shapes (g = H / Hkv in 1..8, head_dim 64/128) and allocates the workspace on the
  // current device; plan() and run() must be called with that device current.
  static Expected<std::unique_ptr<DecodeAttention>> create(const DecodeAttentionOptions& options);
  ~DecodeAttention();
  DecodeAttention(const DecodeAttention&) = delete;
  DecodeAttention& operator=(const DecodeAttention&) = delete;

  // Builds the plan for this step's row lengths (host copy, [num_rows], row = seq * Hkv + kv
  // head) and uploads it on `stream`. The next run() on the same stream uses it; run() takes the
  // exact lengths from the view's row_lengths (which must match these), the plan only page
  // counts. So while every row keeps its page count (and the page-table offsets and the stream
  // stay the same) plan() returns at once and the uploaded plan serves the next run() too: in a
  // decode step a row gains a page only every 16 tokens.
  Status plan(std::span<const int32_t> row_lengths, cudaStream_t stream) {
    return plan(row_lengths, {}, stream);
  }
  // The same with a host copy of the view's row_page_offsets ([num_rows], or [num_rows + 1] as a
  // CSR; as run() will see them): the plan then carries each item's absolute page-table position,
  // which saves the kernel one dependent load. Empty: the kernel reads row_page_offsets itself.
  Status plan(std::span<const int32_t> row_lengths, std::span<const int32_t> row_page_offsets, cudaStream_t stream);

  // q:   [num_seqs][num_qo_heads][head_dim] (bf16 or fp32 per options), sequences q_seq_stride
  //      elements apart; query head h belongs to kv head h / g.
  // out: [num_seqs][num_qo_heads][head_dim] bf16, sequences out_seq_stride elements apart.
  // lse: optional [num_seqs][num_qo_heads] fp32 (natural log), or nullptr.
  // kv.num_rows must equal the row count of the last plan(). Asynchronous on `stream`.
  Status run(const PagedKvView& kv, const void* q, int64_t q_seq_stride, __nv_bfloat16* out,
             int64_t out_seq_stride, float* lse, float softmax_scale, cudaStream_t stream);

  // Diagnostics: the next run() calls stamp the global timer (ns) into these device buffers
  // (nullptr: off): per attention block (the plan's num_warps blocks) 3 stamps {start, past the
  // wait, done}, per merge block (row, query head of the group) {past its wait, partials folded,
  // done} (with slices: the first slice's wait, the last slice's fold and end); merge blocks of
  // rows written directly leave no stamps.
  void set_trace(unsigned long long* attn, unsigned long long* merge) {
    trace_attn_ = attn;
    trace_merge_ = merge;
  }

  const DecodePlan& last_plan() const { return plan_; }
  // The merge the last plan() chose (kAuto resolved to kKernel or kFused).
  DecodeMerge last_merge() const { return merge_; }
  // The merge kernel's block width (warps) the last plan() chose.
  int32_t last_merge_warps() const { return merge_warps_; }
  // The merge kernel's slices of head_dim per (row, head) the last plan() chose.
  int32_t last_merge_slices() const { return merge_slices_; }
  int32_t device_warp_slots() const { return device_warp_slots_; }
  // Plans built (not kept) by plan() so far.
  int64_t builds() const { return builds_; }
  const DecodeAttentionOptions& options() const { return options_; }

 private:
  friend class DecodeAttentionLayers;
  DecodeAttention() = default;
  // Checks the options, sizes the workspace and allocates all of it but the plan buffers, which
  // come from `owner` (set by it) or, without one, are allocated here too.
  static Expected<std::unique_ptr<DecodeAttention>> make(const DecodeAttentionOptions& options,
                                                         DecodeAttentionLayers* owner, int32_t index);

  DecodeAttentionOptions options_;
  int32_t group_size_ = 0;
  bool dependent_launch_ = false;
  int32_t device_warp_slots_ = 0;  // resident warps of the attention kernel on the whole device
  int32_t sms_ = 1;                // the device's SMs
  int64_t max_warps_ = 0;          // warp slots the workspace holds (balanced or one-block-per-row)
  int64_t max_items_ = 0;          // == max partials
  bool items_absolute_ = false;    // the last plan's block items hold absolute page-table offsets

  DecodePlan plan_;
  DecodeMerge merge_ = DecodeMerge::kKernel;
  int32_t merge_warps_ = 4;
  int32_t merge_slices_ = 1;
  // What the uploaded plan was built from (plan() reuses it while these match).
  bool plan_cached_ = false;
  int64_t builds_ = 0;
  std::vector<int32_t> plan_pages_;    // [rows] pages of each row
  std::vector<int32_t> plan_offsets_;  // the row_page_offsets passed (empty: none)
  cudaStream_t plan_stream_ = nullptr;
  // Device workspace: one allocation, laid out as the staging buffer below (plan_layout in
  // decode_attention.cu); owned here, or a slice of the owner's.
  void* d_plan_ = nullptr;
  size_t plan_bytes_ = 0;
  void* h_plan_ = nullptr;         // pinned staging copy of the same layout
  cudaEvent_t upload_done_ = nullptr;  // (own buffers) the staging buffer may be rewritten once this fired
  DecodeAttentionLayers* owner_ = nullptr;  // plan buffers shared with other layers (plan() only stages)
  int32_t owner_index_ = 0;
  float* d_partial_o_ = nullptr;   // [max_items][g][head_dim]
  float* d_partial_lse_ = nullptr; // [max_items][g] log2 units
  int32_t* d_row_counters_ = nullptr;  // [max_rows] fused merge arrivals, zero between launches
  unsigned long long* trace_attn_ = nullptr;  // diagnostics (set_trace)
  unsigned long long* trace_merge_ = nullptr;
};

// The decode attention of a model's layers, whose plans share one device buffer and one pinned
// staging buffer (a slot per layer): each layer's plan() only stages its plan on the host, and
// upload() sends every plan staged since the last upload with one copy. A decode step that
// re-plans many layers (Ada-KV rows cross pages at different steps) then pays one copy instead of
// two driver calls per layer. Call upload() after the step's plan() calls and before the first
// run() on the same stream.
class DecodeAttentionLayers {
 public:
  static Expected<std::unique_ptr<DecodeAttentionLayers>> create(const DecodeAttentionOptions& options, int32_t layers);
  ~DecodeAttentionLayers();
  DecodeAttentionLayers(const DecodeAttentionLayers&) = delete;
  DecodeAttentionLayers& operator=(const DecodeAttentionLayers&) = delete;

  DecodeAttention& layer(int32_t l) { return *layers_[static_cast<size_t>(l)]; }
  int32_t size() const { return static_cast<int32_t>(layers_.size()); }
  // Uploads the slots staged since the last upload (one 2D copy of the bytes they use) on `stream`.
  Status upload(cudaStream_t stream);

 private:
  friend class DecodeAttention;
  DecodeAttentionLayers() = default;
  // The staging buffer may be rewritten once the last upload has left it.
  Status staging_free();
  // Layer `index` staged bytes [copy_begin_, end) of its slot.
  void staged(int32_t index, size_t end);

  std::vector<std::unique_ptr<DecodeAttention>> layers_;
  void* d_ = nullptr;  // [layers][pitch_]
  void* h_ = nullptr;  // pinned, same layout
  size_t pitch_ = 0;
  size_t copy_begin_ = 0;  // first byte of a slot that a plan uses
  cudaEvent_t uploaded_ = nullptr;
  bool in_flight_ = false;  // an upload may still read the staging buffer
  int32_t dirty_first_ = -1, dirty_last_ = -1;
  size_t dirty_end_ = 0;
};

}  // namespace adakv::cuda
