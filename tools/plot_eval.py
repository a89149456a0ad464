#!/usr/bin/env python3
"""Plots of an `adakv eval needle|ruler|longbench|kvpress --out PREFIX` run, from PREFIX.csv.

Usage: tools/plot_eval.py PREFIX.csv --outdir docs/img [--name NAME]

Writes, for each protocol in the CSV:
  NAME_budget_<protocol>.png   mean score versus budget, one line per policy (full as a dashed
                               horizontal line), one panel per task when there are several;
  NAME_needle_<protocol>.png   (rows with a depth only) one heatmap per (policy, budget):
                               context length x needle depth, mean score per cell.
NAME defaults to the CSV's base name. Prints the paths written.
"""
import argparse
import csv
import math
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        sys.exit(f"plot_eval: {path}: no rows")
    for r in rows:
        r["budget"] = int(r["budget"])
        r["length"] = int(r["length"])
        r["score"] = float(r["score"])
        r["depth"] = float(r["depth"]) if r["depth"] != "" else None
    return rows


def ordered(values):
    seen = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def budget_plot(rows, protocol, out_png):
    rows = [r for r in rows if r["protocol"] == protocol]
    tasks = ordered(r["task"] for r in rows)
    policies = ordered(r["policy"] for r in rows)
    budgets = sorted({r["budget"] for r in rows if r["budget"] > 0})
    panels = tasks + (["all tasks"] if len(tasks) > 1 else [])
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(max(6.0, 5.2 * cols), 3.8 * nrows), squeeze=False)
    for i, task in enumerate(panels):
        ax = axes[i // cols][i % cols]
        sel = rows if task == "all tasks" else [r for r in rows if r["task"] == task]
        acc = defaultdict(list)
        for r in sel:
            acc[(r["policy"], r["budget"])].append(r["score"])
        for p in policies:
            if p == "full":
                if ("full", 0) in acc:
                    ax.axhline(np.mean(acc[("full", 0)]), color="black", ls="--", lw=1.2, label="full")
                continue
            xs = [b for b in budgets if (p, b) in acc]
            if not xs:
                continue
            ys = [np.mean(acc[(p, b)]) for b in xs]
            style = "-" if p.startswith("ada-") else "--" if p in ("snapkv", "pyramidkv", "criticalkv") else ":"
            ax.plot(xs, ys, marker="o", ls=style, label=p)
        n = len({(r["id"], r["length"], r["depth"], r["sample"]) for r in sel})
        ax.set_title(f"{task} ({n} samples)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets)
        ax.set_xticklabels([str(b) for b in budgets])
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("budget (entries per kv head)")
        ax.set_ylabel("mean score")
        ax.grid(alpha=0.3)
    for j in range(len(panels), nrows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend(fontsize=8, loc="best")  # lines that coincide overlap: see the table
    fig.suptitle("score vs budget: question inside the compressed prompt" if protocol == "inside"
                 else "score vs budget: question after compression", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def needle_plot(rows, protocol, out_png):
    rows = [r for r in rows if r["protocol"] == protocol and r["depth"] is not None]
    if not rows:
        return False
    configs = ordered((r["policy"], r["budget"]) for r in rows)
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    cols = min(4, len(configs))
    nrows = math.ceil(len(configs) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.3 * cols, 2.9 * nrows), squeeze=False)
    im = None
    for i, (policy, budget) in enumerate(configs):
        ax = axes[i // cols][i % cols]
        grid = np.full((len(depths), len(lengths)), np.nan)  # [depths][lengths] mean score
        for di, d in enumerate(depths):
            for li, length in enumerate(lengths):
                s = [r["score"] for r in rows if r["policy"] == policy and r["budget"] == budget
                     and r["depth"] == d and r["length"] == length]
                if s:
                    grid[di, li] = np.mean(s)
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for di in range(len(depths)):
            for li in range(len(lengths)):
                if not np.isnan(grid[di, li]):
                    ax.text(li, di, f"{grid[di, li]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)))
        ax.set_xticklabels([str(x) for x in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)))
        ax.set_yticklabels([f"{d:g}" for d in depths], fontsize=8)
        ax.set_title(policy if budget == 0 else f"{policy} B={budget}", fontsize=9)
        if i % cols == 0:
            ax.set_ylabel("needle depth")
        ax.set_xlabel("context tokens", fontsize=8)
    for j in range(len(configs), nrows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle(f"needle accuracy, question {'inside the compressed prompt' if protocol == 'inside' else 'after compression'}")
    fig.tight_layout()
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv_path")
    ap.add_argument("--outdir", default=".")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    rows = read_rows(args.csv_path)
    name = args.name or os.path.splitext(os.path.basename(args.csv_path))[0]
    os.makedirs(args.outdir, exist_ok=True)
    for protocol in ordered(r["protocol"] for r in rows):
        out = os.path.join(args.outdir, f"{name}_budget_{protocol}.png")
        budget_plot(rows, protocol, out)
        print(out)
        out = os.path.join(args.outdir, f"{name}_needle_{protocol}.png")
        if needle_plot(rows, protocol, out):
            print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
