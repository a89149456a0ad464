#!/usr/bin/env python3
"""Compression fixtures from a real (tiny) checkpoint: reads the post-RoPE queries, keys, values
and o_proj that `adakv inspect --dump-qk DIR` wrote for one prompt, and writes the keep sets that
compress_ref.py computes from them, in the format of gen_compress_fixtures.py, so that
tests/unit/test_compress_fixtures.cc checks the C++ policies on a model's own attention.

Usage: gen_model_fixtures.py DUMP_DIR NAME [--window W] [--budgets B1,B2,...] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_compress_fixtures as gen  # noqa: E402


def load(dump_dir: str):
    with open(os.path.join(dump_dir, "qk_dump.json"), encoding="utf-8") as f:
        meta = json.load(f)
    arrays = {}
    for name in ("queries", "keys", "values", "o_proj"):
        a = np.fromfile(os.path.join(dump_dir, name + ".f32"), dtype="<f4")
        arrays[name] = a.reshape(meta[name])
    return meta, arrays


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dump_dir")
    ap.add_argument("name")
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--budgets", default="12,20,40")
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(here, "..", "..", "tests", "fixtures", "compress"))
    args = ap.parse_args()
    meta, a = load(args.dump_dir)
    q, k, v, o = a["queries"], a["keys"], a["values"], a["o_proj"]  # [N,L,H,d], [N,L,Hkv,d] x2, [N,hidden,H d]
    L = q.shape[1]
    budgets = [int(b) for b in args.budgets.split(",")]
    cases = gen.cases_for(L, args.window, budgets, args.block)
    gen.write_set(args.out, args.name, q, k, v, o, cases)
    print(f"{args.name}: {len(cases)} cases from {meta['model']} ({L} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
