// CPU reference ops of the transformer forward, in fp32. These are the oracle every GPU kernel
// is tested against, so each one follows the arithmetic of transformers' PyTorch code (same
// formula, same order of the rounding-relevant steps) rather than a faster reformulation.
#pragma once

#include <cstdint>

namespace adakv::cpu {

// y[m][n] = x[m][k] . w[n][k]^T (+ bias[n]); w in the [out][in] layout of nn.Linear.
// One OpenBLAS sgemm; OpenBLAS threads it (the caller must not be inside parallel_for).
void linear(const float* x, const float* w, const float* bias, float* y, int64_t m, int64_t n, int64_t k);

// y[r] = weight * (x[r] * rsqrt(mean(x[r]^2) + eps)) for every row r of x [rows][dim]; y may
// alias x. As transformers' LlamaRMSNorm: normalise in fp32, then multiply by the weight.
void rms_norm(const float* x, const float* weight, float* y, int64_t rows, int64_t dim, float eps);

// out[r][i] = silu(gate_up[r][i]) * gate_up[r][inter + i]: gate_up is the fused [rows][2*inter]
// output of gate_proj and up_proj (gate first).
void swiglu(const float* gate_up, float* out, int64_t rows, int64_t inter);

// Rotary embedding in HF's rotate_half convention, in place on x [n][heads][head_dim]:
// angle[t][i] = float(inv_freq[i] * positions[t]) (as the fp32 matmul in transformers),
// x1 = x[:d/2], x2 = x[d/2:]  ->  [x1 cos - x2 sin, x2 cos + x1 sin].
// `row_stride` is the distance in floats between consecutive tokens (so q, k of a fused qkv row
// can be rotated in place).
void apply_rope(float* x, int64_t n, int64_t heads, int64_t head_dim, int64_t row_stride,
                const float* inv_freq, const int32_t* positions);

}  // namespace adakv::cpu
