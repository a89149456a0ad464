#!/usr/bin/env python3
"""Heatmap (layers x kv heads) of the tokens each head kept, from `adakv inspect --json`.

Usage: tools/plot_budgets.py inspect.json out.png [--title TEXT]
Each cell shows the kept count; the title gives the policy, budget and prompt length.
"""
import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json_path")
    ap.add_argument("png_path")
    ap.add_argument("--title", default=None)
    args = ap.parse_args()
    with open(args.json_path, encoding="utf-8") as f:
        j = json.load(f)
    layers, heads = j["num_layers"], j["num_kv_heads"]
    kept = np.zeros((layers, heads), dtype=np.int64)  # [layers][kv_heads]
    for jl in j["layers"]:
        for jh in jl["heads"]:
            kept[jl["layer"], jh["kv_head"]] = jh["kept"]

    fig, ax = plt.subplots(figsize=(2.2 + 1.1 * heads, 1.2 + 0.45 * layers))
    im = ax.imshow(kept, aspect="auto", cmap="viridis", origin="upper")
    ax.set_xlabel("kv head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers))
    hi = kept.max() if kept.size else 0
    for l in range(layers):
        for h in range(heads):
            v = kept[l, h]
            ax.text(h, l, str(v), ha="center", va="center", fontsize=9,
                    color="black" if v > 0.6 * hi else "white")
    fig.colorbar(im, ax=ax, label="tokens kept")
    title = args.title or (f"{j['policy']}  B={j['budget']}  w={j['window']}  "
                           f"prompt {j['prompt_tokens']} tokens")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(args.png_path, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
