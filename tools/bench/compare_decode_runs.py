#!/usr/bin/env python3
"""Side by side: the last table of several bench_decode_attention logs (one column per log).

The decode benchmark's lean modes print one table last: a row per step (head dim, batch,
context, distribution, KV MB) and one % of copy per variant. An A/B of two builds runs each a few
times, alternating, inside one device call (the same binary moves by up to 2 points between
calls); this lines the runs up by step so the rounds can be read together.

Usage: compare_decode_runs.py [--col N] [--max-mb MB] LOG [LOG ...]
  --col N     which variant column of each log (0: the first one the log prints; default 0)
  --max-mb MB only steps up to this many MB of K/V (default: all)
A step missing from a log prints "-". Exits 1 when no log holds the table.
"""
import argparse
import os
import re
import sys

ROW = re.compile(r"^\s*(64|128)\s+(\d+)\s+(\d+K)\s+(uniform|ada)\s+(\d+)\s+\|((?:\s+[\d.]+c?)+)\s*$")
HEADER = re.compile(r"^\s*d\s+batch\s+ctx\s+dist\s+KV_MB\s+\|(.*)$")


def last_table(path, col):
    """({(d, batch, ctx, dist, mb): value}, steps in order, the column's variant name) from the
    log's rows (a later row of a step wins)."""
    out = {}
    order = []
    name = "?"
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            h = HEADER.match(line)
            if h:
                names = h.group(1).split()
                name = names[col] if col < len(names) else "?"
                continue
            m = ROW.match(line)
            if not m:
                continue
            values = m.group(6).split()
            if col >= len(values):
                continue
            key = m.groups()[:5]
            if key not in out:
                order.append(key)
            out[key] = float(values[col].rstrip("c"))
    return out, order, name


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--col", type=int, default=0)
    ap.add_argument("--max-mb", type=float, default=None)
    ap.add_argument("logs", nargs="+")
    args = ap.parse_args()
    tables, steps, variants = [], [], []
    for path in args.logs:
        table, order, variant = last_table(path, args.col)
        tables.append(table)
        variants.append(variant)
        steps += [k for k in order if k not in steps]
    if not steps:
        print("no decode-attention table in " + ", ".join(args.logs), file=sys.stderr)
        return 1
    names = [os.path.splitext(os.path.basename(p))[0][-10:] for p in args.logs]
    print("%-30s" % "d batch ctx dist MB" + "".join("%11s" % n for n in names))
    print("%-30s" % "(variant)" + "".join("%11s" % v[:10] for v in variants))
    for key in steps:
        if args.max_mb is not None and float(key[4]) > args.max_mb:
            continue
        cells = ["%11s" % ("%.1f" % t[key] if key in t else "-") for t in tables]
        print("%-30s" % " ".join(key) + "".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
