#!/usr/bin/env python3
"""Markdown tables from one or more `adakv eval ... --out PREFIX` CSVs (e.g. the shards of a sweep).

Usage: tools/eval_table.py A.csv [B.csv ...] [--merged OUT.csv]

Prints, for each protocol, a table with one row per (policy, budget) and one column per task
(mean score, in percent) plus the mean over tasks and the mean kept fraction; n is the number of
samples per cell. With --merged, also writes all rows into one CSV (header once), which
tools/plot_eval.py reads.
"""
import argparse
import csv
import sys
from collections import defaultdict

POLICY_ORDER = ["full", "streamingllm", "h2o", "snapkv", "ada-snapkv", "pyramidkv", "ada-pyramidkv",
                "criticalkv", "ada-criticalkv", "kvcompress", "random"]


def read(paths):
    rows, header = [], None
    for p in paths:
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if header is None:
                header = reader.fieldnames
            elif reader.fieldnames != header:
                sys.exit(f"eval_table: {p}: header differs from {paths[0]}")
            rows.extend(reader)
    if not rows:
        sys.exit("eval_table: no rows")
    return header, rows


def policy_key(name):
    return (POLICY_ORDER.index(name) if name in POLICY_ORDER else len(POLICY_ORDER), name)


def table(rows, protocol):
    rows = [r for r in rows if r["protocol"] == protocol]
    tasks = sorted({r["task"] for r in rows})
    cell = defaultdict(list)  # (policy, budget, task) -> scores
    kept = defaultdict(list)  # (policy, budget) -> kept fractions
    for r in rows:
        key = (r["policy"], int(r["budget"]))
        cell[key + (r["task"],)].append(float(r["score"]))
        kept[key].append(float(r["kept_fraction"]))
    configs = sorted(kept, key=lambda k: (policy_key(k[0]), k[1]))
    out = [f"**protocol {protocol}** (mean score in %, n = samples per cell)", ""]
    head = ["policy", "budget", "kept"] + [f"{t}" for t in tasks] + (["mean"] if len(tasks) > 1 else [])
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * 3 + "---:|" * (len(head) - 3))
    for pol, bud in configs:
        vals, means = [], []
        for t in tasks:
            s = cell.get((pol, bud, t))
            if s:
                m = 100.0 * sum(s) / len(s)
                means.append(m)
                vals.append(f"{m:.1f} ({len(s)})")
            else:
                vals.append("")
        k = kept[(pol, bud)]
        line = [pol, str(bud) if bud > 0 else "-", f"{sum(k) / len(k):.3f}"] + vals
        if len(tasks) > 1:
            line.append(f"{sum(means) / len(means):.1f}" if means else "")
        out.append("| " + " | ".join(line) + " |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--merged")
    args = ap.parse_args()
    header, rows = read(args.csv)
    if args.merged:
        with open(args.merged, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=header)
            w.writeheader()
            w.writerows(rows)
    for protocol in ("inside", "after"):
        if any(r["protocol"] == protocol for r in rows):
            print(table(rows, protocol))
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
