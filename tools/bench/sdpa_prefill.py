#!/usr/bin/env python3
"""PyTorch SDPA (flash backend) peer of bench/bench_prefill_attention.cu.

Same shapes (causal, batch 1, 32 query heads over 8 kv heads, head dim 128 at 4K..64K tokens and
head dim 64 at 8K), same memory layout (q/out [L][H][d], k/v [L][Hkv][d]: SDPA gets [1][H][L][d]
views of them, which its flash kernel reads without a copy), same FLOP model:
    FLOPs = 4 * d * H * pairs,  pairs = Lq * (Lk - Lq + 1) + Lq * (Lq - 1) / 2  (= L (L + 1) / 2)
The flash backend is forced with torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION);
GQA through enable_gqa=True (the flash backend's native GQA); should this torch refuse that, the
kv heads are expanded to 32 first (same FLOPs) and the row says mode=expanded.
Timing: CUDA events around each call, median of as many calls as fit about 1.5 s (5..30) after
2 warm-ups. Also measures cuBLAS's bf16 GEMM (8192^3) as the device's matrix ceiling.

Prints one "SDPA d=.. hq=.. hkv=.. L=.. mode=.. ms=.. tflops=.." line per shape (read by
scripts/gpu_prefill_check.sh) and writes $OUT/sdpa_prefill.csv when OUT is set.
"""
import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HQ, HKV = 32, 8


def pairs(lq, lk, causal=True):
    if not causal:
        return lq * lk
    return lq * (lk - lq + 1) + lq * (lq - 1) / 2


def flops(lq, lk, h, d, causal=True):
    return 4.0 * d * h * pairs(lq, lk, causal)


def time_ms(fn, reps=None, budget_ms=1500.0):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def once():
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    last = [once() for _ in range(2)][-1]
    n = reps or max(5, min(30, int(budget_ms / max(last, 1e-3))))
    return statistics.median(once() for _ in range(n)), n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4K only (d 128 and 64)")
    ap.add_argument("--reps", type=int, default=0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("skip: no CUDA device")
        return 0
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")

    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ms, _ = time_ms(lambda: torch.matmul(a, b), reps=10)
    print(f"cuBLAS bf16 GEMM 8192^3: {2 * 8192**3 / (ms * 1e-3) / 1e12:.1f} TFLOP/s")
    del a, b

    shapes = [(128, 4096), (128, 8192), (128, 16384), (128, 32768), (128, 65536), (64, 8192)]
    if args.quick:
        shapes = [(128, 4096), (64, 4096)]
    rows = []
    for d, L in shapes:
        torch.cuda.empty_cache()
        # [1][L][H][d] storage, [1][H][L][d] views: the layout the adakv kernel reads.
        q = torch.randn(1, L, HQ, d, device=dev, dtype=torch.bfloat16).transpose(1, 2)
        k = torch.randn(1, L, HKV, d, device=dev, dtype=torch.bfloat16).transpose(1, 2)
        v = torch.randn(1, L, HKV, d, device=dev, dtype=torch.bfloat16).transpose(1, 2)
        mode = "gqa"
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            try:
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            except (RuntimeError, TypeError) as e:
                print(f"enable_gqa refused ({str(e).splitlines()[0]}); expanding kv heads")
                mode = "expanded"
                k = k.repeat_interleave(HQ // HKV, dim=1)
                v = v.repeat_interleave(HQ // HKV, dim=1)
                fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out = fn()
            torch.cuda.synchronize()
            if not torch.isfinite(out).all():
                print(f"SDPA output not finite at d={d} L={L}")
                return 1
            ms, n = time_ms(fn, reps=args.reps or None)
        tf = flops(L, L, HQ, d) / (ms * 1e-3) / 1e12
        rows.append((d, L, mode, ms, tf))
        print(f"SDPA d={d} hq={HQ} hkv={HKV} L={L} mode={mode} ms={ms:.4f} tflops={tf:.2f} reps={n}", flush=True)
        del q, k, v, out
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "sdpa_prefill.csv"), "w") as f:
            f.write("d,hq,hkv,L,mode,ms,tflops\n")
            for d, L, mode, ms, tf in rows:
                f.write(f"{d},{HQ},{HKV},{L},{mode},{ms:.5f},{tf:.3f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
