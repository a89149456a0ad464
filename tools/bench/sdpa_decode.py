#!/usr/bin/env python3
"""PyTorch SDPA peer of bench/bench_decode_attention.cu: one decode step's attention.

Shapes as the adakv benchmark's uniform rows (32 query heads over 8 kv heads, head dim 128 and
64, one query token per sequence, batch 1/8/32, contexts 4K..128K), on the layout that suits SDPA
best: contiguous K/V [batch][8][ctx][d] (no pages), q [batch][32][1][d], GQA through
enable_gqa=True. Every backend that accepts the call is timed (flash, efficient, cuDNN, math is
left out); the fastest counts. A dense kernel has no per-head lengths: with Ada-KV's skew it would
read every row padded to the longest (max/mean 4-8 in the adakv benchmark), so its ada rate is its
uniform rate divided by that factor; only uniform rows are timed here.

Bytes model (as the adakv benchmark): every K and V entry once, batch x 8 x ctx x d x 2 B x 2.
Ceiling: a device-to-device copy of 1 GiB (bytes read + written), measured in the same run.
Timing: per call, L2 flushed (a 1 GiB read) before each, CUDA events around the call, median of
--reps after 3 warm-ups; and per layer in a CUDA graph of N = min(32, fit) back-to-back layers
(own K/V each, L2 flushed before each replay), as the adakv benchmark's g% columns.

Prints one "SDPA_DECODE ..." line per shape and a table last; writes $OUT/sdpa_decode.csv.
"""
import argparse
import os
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HQ, HKV = 32, 8
BACKENDS = [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION)]


class Timer:
    def __init__(self):
        self.flush_buf = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
        self.sink = torch.empty((), dtype=torch.float32, device="cuda")
        self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def flush(self):
        torch.sum(self.flush_buf, dim=0, out=self.sink)

    def median_ms(self, fn, reps):
        t = []
        for i in range(reps + 3):
            self.flush()
            self.a.record()
            fn()
            self.b.record()
            self.b.synchronize()
            if i >= 3:
                t.append(self.a.elapsed_time(self.b))
        return statistics.median(t)


def copy_bandwidth(timer):
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = timer.median_ms(lambda: dst.copy_(src), 10)
    return 2 * src.numel() * 2 / (ms * 1e-3)


def attend(q, k, v, backend):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--small", action="store_true", help="steps up to 1.1 GB (as bench_decode_attention --small)")
    ap.add_argument("--graph-gb", type=float, default=24.0, help="memory for the graph's layers")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("skip: no CUDA device")
        return
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    timer = Timer()
    bw = copy_bandwidth(timer)
    print(f"device: {dev}; torch {torch.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s")
    rows = []
    for d in (128, 64):
        for batch in (1, 8, 32):
            for ctx in (4096, 16384, 32768, 131072):
                step = batch * HKV * ctx * d * 2 * 2
                if args.small and step > 1.1e9:
                    continue
                if step > 20e9:
                    continue
                q = torch.randn(batch, HQ, 1, d, dtype=torch.bfloat16, device="cuda")
                k = torch.randn(batch, HKV, ctx, d, dtype=torch.bfloat16, device="cuda")
                v = torch.randn(batch, HKV, ctx, d, dtype=torch.bfloat16, device="cuda")
                ref = None
                best = None
                per_backend = []
                for name, be in BACKENDS:
                    try:
                        out = attend(q, k, v, be)
                        torch.cuda.synchronize()
                    except Exception as e:  # the backend refuses this shape or GQA
                        print(f"  d {d} batch {batch} ctx {ctx}: {name} refused ({str(e).splitlines()[0][:80]})")
                        continue
                    if ref is None:
                        ref = out.float()
                    diff = (out.float() - ref).abs().max().item()
                    ms = timer.median_ms(lambda: attend(q, k, v, be), args.reps)
                    per_backend.append(f"{name}_us={ms * 1e3:.1f}")
                    if best is None or ms < best[1]:
                        best = (name, ms, be, diff)
                if best is None:
                    print(f"SDPA_DECODE d={d} batch={batch} ctx={ctx} no backend")
                    continue
                name, ms, be, diff = best
                # Graph of N layers with their own K/V (the first layer reuses k, v).
                n = int(min(32, args.graph_gb * 1e9 // step))
                g_us = 0.0
                if n >= 2:
                    ks = [k] + [torch.randn_like(k) for _ in range(n - 1)]
                    vs = [v] + [torch.randn_like(v) for _ in range(n - 1)]
                    s = torch.cuda.Stream()
                    s.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(s):
                        for i in range(2):
                            attend(q, ks[i], vs[i], be)
                    torch.cuda.current_stream().wait_stream(s)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        for i in range(n):
                            attend(q, ks[i], vs[i], be)
                    g_us = timer.median_ms(graph.replay, max(3, args.reps // 2)) * 1e3 / n
                    del ks, vs, graph
                us = ms * 1e3
                pct = 100 * step / (us * 1e-6) / bw
                gpct = 100 * step / (g_us * 1e-6) / bw if g_us > 0 else 0.0
                print(f"SDPA_DECODE d={d} batch={batch} ctx={ctx} backend={name} us={us:.1f} pct={pct:.1f} "
                      f"graph_layers={n} graph_us={g_us:.1f} graph_pct={gpct:.1f} max_diff_vs_first={diff:.3g} "
                      f"per_call: {' '.join(per_backend)}",
                      flush=True)
                rows.append((d, batch, ctx, step, name, us, pct, n, g_us, gpct))
                del q, k, v
                torch.cuda.empty_cache()
    if "OUT" in os.environ:
        with open(os.path.join(os.environ["OUT"], "sdpa_decode.csv"), "w") as f:
            f.write(f"# {dev}, torch {torch.__version__}, copy_GBps {bw / 1e9:.1f}\n")
            f.write("head_dim,batch,context,kv_bytes,backend,us,pct_copy,graph_layers,graph_us_per_layer,graph_pct_copy\n")
            for r in rows:
                f.write(",".join(str(x) if not isinstance(x, float) else f"{x:.2f}" for x in r) + "\n")
    print(f"\n== PyTorch SDPA decode ({dev}; copy {bw / 1e9:.0f} GB/s; uniform rows, contiguous K/V; % = of copy) ==")
    print(f"{'d':>3} {'batch':>5} {'ctx':>5} {'KV_MB':>7} {'backend':>9} {'us':>8} {'%':>6} {'N':>3} {'g_us':>8} {'g%':>6}")
    for d, batch, ctx, step, name, us, pct, n, g_us, gpct in rows:
        print(f"{d:>3} {batch:>5} {ctx // 1024:>4}K {step / 1e6:>7.0f} {name:>9} {us:>8.1f} {pct:>6.1f} {n:>3} "
              f"{g_us:>8.1f} {gpct:>6.1f}")


if __name__ == "__main__":
    main()
