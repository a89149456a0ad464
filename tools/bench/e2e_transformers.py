#!/usr/bin/env python3
"""Peer of bench/bench_e2e.cc: the same Llama-3.1-8B-shaped model in transformers (sdpa, random
init, bf16) on the same card in the same device call.

  prefill: one prompt of --ctx tokens (logits of the last position only), tokens/s.
  decode:  batch 1, 8, 32 with --ctx-token contexts: a DynamicCache (transformers' default) holding
           random K/V of that length, then greedy one-token steps; tokens/s. A batch whose cache does
           not fit the card is reported as OOM.
Timing: CUDA events around each call, median of the timed calls after warm-ups.
"""
import argparse
import sys
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--profile", action="store_true",
                    help="also one prefill under torch.profiler: the kernels by total device time")
    args = ap.parse_args()
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM, DynamicCache

    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                      max_position_embeddings=131072, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    t0 = time.time()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    model.eval()
    torch.set_default_dtype(torch.float32)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}; "
          f"model built in {time.time() - t0:.1f} s, {torch.cuda.memory_allocated() / 2**30:.1f} GiB", flush=True)

    def timed(fn, reps, warm):
        for _ in range(warm):
            fn()
        ms = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ms.append(a.elapsed_time(b))
        ms.sort()
        return ms[len(ms) // 2]

    gen = torch.Generator(device="cuda").manual_seed(0)
    results = []
    with torch.inference_mode():
        ids = torch.randint(0, cfg.vocab_size, (1, args.ctx), device="cuda", generator=gen)
        try:
            small = ids[:, :2048]
            timed(lambda: model(small, use_cache=False, logits_to_keep=1), 1, 1)
            ms = timed(lambda: model(ids, use_cache=False, logits_to_keep=1), 2, 0)
            print(f"prefill {args.ctx}: {ms:.1f} ms, {args.ctx / ms * 1e3:.0f} tokens/s", flush=True)
            results.append(("prefill", args.ctx, f"{args.ctx / ms * 1e3:.0f} tokens/s ({ms / 1e3:.3f} s)"))
            if args.profile:
                from torch.profiler import profile, ProfilerActivity
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    model(ids, use_cache=False, logits_to_keep=1)
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70),
                      flush=True)
        except torch.OutOfMemoryError as e:
            results.append(("prefill", args.ctx, "OOM"))
            print("prefill OOM:", str(e).splitlines()[0], flush=True)
        torch.cuda.empty_cache()

        for B in [int(x) for x in args.batches.split(",")]:
            cache = None
            try:
                try:
                    cache = DynamicCache(config=cfg)
                except TypeError:
                    cache = DynamicCache()
                shape = (B, cfg.num_key_value_heads, args.ctx, cfg.head_dim)
                for layer in range(cfg.num_hidden_layers):
                    k = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
                    v = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
                    cache.update(k, v, layer)
                    del k, v
                tok = torch.full((B, 1), 7, device="cuda", dtype=torch.long)
                pos = [args.ctx]

                def step():
                    p = torch.full((B, 1), pos[0], device="cuda", dtype=torch.long)
                    out = model(tok, past_key_values=cache, position_ids=p, cache_position=p[0], use_cache=True)
                    tok.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
                    pos[0] += 1

                ms = timed(step, args.steps, 2)
                print(f"decode batch {B}: {ms:.1f} ms/step, {B / ms * 1e3:.1f} tokens/s", flush=True)
                results.append(("decode", B, f"{B / ms * 1e3:.1f} tokens/s ({ms:.1f} ms/step)"))
            except torch.OutOfMemoryError as e:
                print(f"decode batch {B}: OOM ({str(e).splitlines()[0][:160]})", flush=True)
                results.append(("decode", B, "OOM (full cache does not fit)"))
            del cache
            torch.cuda.empty_cache()

    print("\n== transformers peer (sdpa, bf16, random init, DynamicCache)")
    for kind, n, r in results:
        print(f"| {kind} | {n} | {r} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
