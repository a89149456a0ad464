// prefill_attention(): argument checks and dispatch (host code; the kernel is in
// prefill_attention.cuh, instantiated per head dim in prefill_attention_d{64,128}.cu).
#include "backends/cuda/prefill_attention.h"

#include <cmath>
#include <cstdint>
#include <string>

namespace adakv::cuda {
namespace {

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Checks one row stride (0 = dense) against the row's width; returns the stride to use or -1.
int64_t row_stride(int64_t stride, int64_t width) {
  if (stride == 0) return width;
  if (stride < width || stride % 8 != 0) return -1;
  return stride;
}

// Whether the current device runs sm_90a code (the wgmma kernel): compute capability 9.0.
bool wgmma_device() {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess)
    return false;
  return major == 9 && minor == 0 && prefill_detail::prefill_attention_wgmma_built();
}

}  // namespace

Status prefill_attention(const PrefillAttentionArgs& a, cudaStream_t stream, const PrefillAttentionOptions& options) {
  const std::string where = "prefill attention: ";
  if (a.head_dim != 64 && a.head_dim != 128)
    return unimplemented(where + "head_dim " + std::to_string(a.head_dim) + " (supported: 64, 128)");
  if (a.num_kv_heads < 1 || a.num_qo_heads < a.num_kv_heads || a.num_qo_heads % a.num_kv_heads != 0)
    return invalid_argument(where + std::to_string(a.num_qo_heads) + " query heads do not split over " +
                            std::to_string(a.num_kv_heads) + " kv heads");
  if (a.num_q < 0) return invalid_argument(where + "negative query count");
  if (a.num_q == 0) return Status::ok();
  if (a.num_k < 1) return invalid_argument(where + "no keys");
  if (a.causal && a.num_k < a.num_q)
    return invalid_argument(where + "causal with " + std::to_string(a.num_q) + " queries but only " +
                            std::to_string(a.num_k) + " keys (the queries are the last positions of the keys)");
  if (!(a.softmax_scale > 0.f) || !std::isfinite(a.softmax_scale))
    return invalid_argument(where + "softmax_scale must be positive and finite");
  if (a.q == nullptr || a.k == nullptr || a.v == nullptr || a.out == nullptr)
    return invalid_argument(where + "null q, k, v or out");
  if (!aligned16(a.q) || !aligned16(a.k) || !aligned16(a.v) || !aligned16(a.out))
    return invalid_argument(where + "q, k, v and out must be 16-byte aligned");
  const int64_t d = a.head_dim;
  const int64_t qs = row_stride(a.q_row_stride, int64_t{a.num_qo_heads} * d);
  const int64_t ks = row_stride(a.k_row_stride, int64_t{a.num_kv_heads} * d);
  const int64_t vs = row_stride(a.v_row_stride, int64_t{a.num_kv_heads} * d);
  const int64_t os = row_stride(a.out_row_stride, int64_t{a.num_qo_heads} * d);
  if (qs < 0 || ks < 0 || vs < 0 || os < 0)
    return invalid_argument(where + "row strides must be 0 (dense) or multiples of 8 no smaller than heads * head_dim");

  if (options.kernel == PrefillKernel::kWgmma) {
    if (a.head_dim != 128) return unimplemented(where + "the wgmma kernel takes head_dim 128 only");
    if (!wgmma_device()) return unimplemented(where + "the wgmma kernel needs a compute capability 9.0 device");
  }
  // kAuto: the wgmma kernel with 128-key tiles where it runs (head dim 128 on an H100 / H200),
  // 10-13 % faster than mma.sync from 8K on (H200, 2026-11-28); mma.sync elsewhere.
  const bool wgmma = options.kernel == PrefillKernel::kWgmma ||
                     (options.kernel == PrefillKernel::kAuto && options.block_n == 0 && a.head_dim == 128 &&
                      wgmma_device());
  int block_n = options.block_n;
  if (block_n == 0 && wgmma) block_n = 128;
  if (block_n == 0) block_n = 64;
  const bool block_ok = wgmma                ? (block_n == 64 || block_n == 128)
                        : a.head_dim == 128 ? (block_n == 32 || block_n == 64)
                                            : (block_n == 64 || block_n == 128);
  if (!block_ok)
    return invalid_argument(where + "block_n " + std::to_string(block_n) + " at head_dim " +
                            std::to_string(a.head_dim) + (wgmma ? " with the wgmma kernel (supported: 64, 128)"
                                                                : " (supported: 32/64 at 128, 64/128 at 64)"));

  prefill_detail::PrefillParams p;
  p.q = a.q;
  p.k = a.k;
  p.v = a.v;
  p.out = a.out;
  p.lse = a.lse;
  p.q_row_stride = qs;
  p.k_row_stride = ks;
  p.v_row_stride = vs;
  p.out_row_stride = os;
  p.num_q = a.num_q;
  p.num_k = a.num_k;
  p.num_qo_heads = a.num_qo_heads;
  p.group_size = a.num_qo_heads / a.num_kv_heads;
  p.q_offset = a.num_k - a.num_q;
  p.causal = a.causal ? 1 : 0;
  p.num_q_tiles = (a.num_q + prefill_detail::kBlockM - 1) / prefill_detail::kBlockM;
  p.scale_log2 = a.softmax_scale * 1.4426950408889634f;
  if (int64_t{p.num_q_tiles} * a.num_qo_heads >= (int64_t{1} << 31))
    return invalid_argument(where + "too many query tiles for one launch");

  const cudaError_t err = wgmma               ? prefill_detail::prefill_attention_wgmma_launch(p, block_n, stream)
                          : a.head_dim == 128 ? prefill_detail::prefill_attention_launch<128>(p, block_n, stream)
                                              : prefill_detail::prefill_attention_launch<64>(p, block_n, stream);
  if (err != cudaSuccess)
    return internal_error(where + "launch failed: " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  return Status::ok();
}

}  // namespace adakv::cuda
