#!/usr/bin/env python3
"""Writes tests/fixtures/compress/: random Q/K/V/o_proj for a few shapes, and for every policy
and a grid of budgets (edge cases included) the keep sets and scores computed by compress_ref.py.
The C++ test tests/unit/test_compress_fixtures.cc must reproduce the keep sets exactly.

Format of one input set NAME (see docs/compression.md, "Fixtures"):
  NAME.inputs.f32    raw little-endian float32 arrays, concatenated
  NAME.expected.f32  float32 scores the reference selected from
  NAME.json          {"format": "adakv-compress-fixture-1", "shape": {...},
                      "inputs": {"file", "arrays": {name: {"offset", "shape"}}}  (offsets in floats),
                      "expected_file", "cases": [{"name", "config", "layers": [...]}]}
  per layer: "selection_budget", "budgets", "counts"/"rounded" (Ada), "keep_mask" (one hex string
  per kv head: char i holds entries 4i..4i+3, bit b = entry 4i+b kept), and "scores"/"crit"/
  "metric" {"offset", "shape"} into the expected file.
Input arrays: queries [N, L, H, d] (all prompt positions, after RoPE), keys/values [N, L, Hkv, d],
o_proj [N, hidden, H*d]. To build fixtures from a real checkpoint, call write_set() with arrays
captured from its forward pass.

Usage: gen_compress_fixtures.py [OUT_DIR]   (default: tests/fixtures/compress next to this repo)
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compress_ref  # noqa: E402

FORMAT = "adakv-compress-fixture-1"


def keep_mask(keep: list[int], L: int) -> str:
    bits = np.zeros(((L + 3) // 4) * 4, dtype=np.int64)
    bits[np.asarray(keep, dtype=np.int64)] = 1
    nib = bits.reshape(-1, 4) @ np.array([1, 2, 4, 8])
    return "".join("%x" % int(x) for x in nib)


class Blob:
    """Concatenated float32 arrays with de-duplication of identical contents."""

    def __init__(self):
        self.parts, self.size, self.seen = [], 0, {}

    def add(self, a: np.ndarray) -> dict:
        a = np.ascontiguousarray(a, dtype=np.float32)
        key = (a.shape, a.tobytes())
        if key not in self.seen:
            self.seen[key] = self.size
            self.parts.append(a.ravel())
            self.size += a.size
        return {"offset": self.seen[key], "shape": list(a.shape)}

    def write(self, path: str):
        data = np.concatenate(self.parts) if self.parts else np.zeros(0, np.float32)
        data.astype("<f4").tofile(path)


def write_set(out_dir: str, name: str, q, k, v, o_proj, cases: list[dict]):
    N, L, H, d = q.shape
    hkv = k.shape[2]
    inputs = Blob()
    arrays = {"queries": inputs.add(q), "keys": inputs.add(k), "values": inputs.add(v), "o_proj": inputs.add(o_proj)}
    expected = Blob()
    out_cases = []
    for case in cases:
        cfg = case["config"]
        plan = compress_ref.plan_sequence(cfg, q, k, v, o_proj)
        layers = []
        for lp in plan["layers"]:
            e = {"keep_mask": [keep_mask(kp, L) for kp in lp["keep"]]}
            for key in ("selection_budget", "budgets", "counts", "rounded"):
                if key in lp:
                    e[key] = [int(x) for x in lp[key]] if isinstance(lp[key], list) else int(lp[key])
            for key in ("scores", "crit", "metric"):
                if key in lp:
                    e[key] = expected.add(np.asarray(lp[key]))
            layers.append(e)
        out_cases.append({"name": case["name"], "config": cfg, "layers": layers})
    inputs.write(os.path.join(out_dir, name + ".inputs.f32"))
    expected.write(os.path.join(out_dir, name + ".expected.f32"))
    header = {
        "format": FORMAT,
        "shape": {"num_layers": N, "length": L, "num_heads": H, "num_kv_heads": hkv, "head_dim": d,
                  "hidden_size": int(o_proj.shape[1])},
        "inputs": {"file": name + ".inputs.f32", "arrays": arrays},
        "expected_file": name + ".expected.f32",
        "cases": out_cases,
    }
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump(header, f, separators=(",", ":"))
        f.write("\n")


def random_set(seed, N, L, H, hkv, d, hidden, qscale=2.0):
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((N, L, H, d)) * qscale).astype(np.float32)
    k = rng.standard_normal((N, L, hkv, d)).astype(np.float32)
    v = rng.standard_normal((N, L, hkv, d)).astype(np.float32)
    o = (rng.standard_normal((N, hidden, H * d)) / np.sqrt(H * d)).astype(np.float32)
    return q, k, v, o


def cases_for(L: int, w: int, budgets: list[int], block: int) -> list[dict]:
    cases = []

    def add(name, **cfg):
        cases.append({"name": name, "config": cfg})

    add("full", policy="full")
    for B in budgets:
        for p in ("snapkv", "ada-snapkv", "pyramidkv", "ada-pyramidkv", "criticalkv", "ada-criticalkv", "h2o"):
            add(f"{p}_B{B}", policy=p, budget=B, window=w)
        add(f"random_B{B}", policy="random", budget=B, window=w, seed=1234)
        add(f"streamingllm_B{B}", policy="streamingllm", budget=B, window=w, sink=4 if B > 4 else 0)
    mid = budgets[len(budgets) // 2]
    # Knob variants at one budget.
    add(f"snapkv_avg5_B{mid}", policy="snapkv", budget=mid, window=w, pool="avg", pool_kernel=5)
    add(f"snapkv_k1_B{mid}", policy="snapkv", budget=mid, window=w, pool_kernel=1)
    add(f"ada-snapkv_gqamax_B{mid}", policy="ada-snapkv", budget=mid, window=w, gqa="max")
    add(f"h2o_gqamax_B{mid}", policy="h2o", budget=mid, window=w, gqa="max")
    for a in (0.0, 0.5, 1.0):
        add(f"ada-snapkv_alpha{a}_B{mid}", policy="ada-snapkv", budget=mid, window=w, alpha=a)
    add(f"ada-pyramidkv_alpha0.5_avg3_B{mid}", policy="ada-pyramidkv", budget=mid, window=w, alpha=0.5,
        pool="avg", pool_kernel=3)
    add(f"pyramidkv_refround_B{mid}", policy="pyramidkv", budget=mid, window=w, pyramid_reference_rounding=True)
    add(f"ada-pyramidkv_beta5_B{mid}", policy="ada-pyramidkv", budget=mid, window=w, beta=5)
    add(f"streamingllm_sink0_B{mid}", policy="streamingllm", budget=mid, window=w, sink=0)
    add(f"random_seed7_B{mid}", policy="random", budget=mid, window=w, seed=7)
    # KV-Compress: budgets in tokens per (layer, head), protected windows, block sizes.
    for T in sorted({max(1, L // 4), max(1, L // 2), L - 1, L}):
        for pw in (0, w):
            add(f"kvcompress_T{T}_pw{pw}_bs{block}", policy="kvcompress", window=w, max_cache_tokens=T,
                protected_window=pw, block_size=block)
    add(f"kvcompress_T{max(1, L // 3)}_pw{w}_bs1_k1", policy="kvcompress", window=w, max_cache_tokens=max(1, L // 3),
        protected_window=w, block_size=1, pool_kernel=1)
    return cases


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "..", "tests", "fixtures", "compress")
    os.makedirs(out_dir, exist_ok=True)
    sets = [
        # name, seed, layers, L, H, Hkv, d, hidden, [(window, budgets, kv-compress block size)]
        ("gqa2_L20", 1, 3, 20, 4, 2, 8, 16, [(4, [5, 8, 12, 19, 20, 24], 4),
                                             (32, [33, 40], 16)]),  # L <= w: nothing scored
        ("gqa2_L100", 3, 3, 100, 4, 2, 4, 16, [(8, [9, 16, 40, 99, 100, 128], 16)]),
        ("gqa4_L100", 4, 3, 100, 8, 2, 4, 16, [(8, [9, 24, 60, 100], 16)]),
        ("mqa_L100", 5, 2, 100, 4, 1, 4, 16, [(8, [12, 50], 4)]),
        ("mha_L333", 6, 2, 333, 2, 2, 4, 8, [(32, [33, 64, 128, 332, 333], 16)]),
    ]
    for name, seed, N, L, H, hkv, d, hidden, groups in sets:
        q, k, v, o = random_set(seed, N, L, H, hkv, d, hidden)
        cases = []
        for w, budgets, block in groups:
            for c in cases_for(L, w, budgets, block):
                if len(groups) > 1:
                    c["name"] = f"w{w}_" + c["name"]
                cases.append(c)
        write_set(out_dir, name, q, k, v, o, cases)
        print(f"{name}: {len(cases)} cases")


if __name__ == "__main__":
    main()
