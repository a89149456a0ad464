#!/usr/bin/env python3
"""Evaluates an exported adakv test model with transformers and writes its model card.

    python3 tools/train/evaluate.py --model EXPORT_DIR --data DATA_DIR --out-json eval.json \
        --train-summary WORK/train_summary.json --card-out model_card.md

Measures, on the held-out validation books (never trained on):
  - perplexity (and bits per byte) at context 2048 and 8192: non-overlapping windows
    [BOS] + validation tokens, every position scored;
  - pass-key accuracy by context length x needle depth (synthetic.py, haystack = validation
    text, 5-digit keys, the same 20 haystacks and keys at every depth of a length);
  - accuracy of every synthetic task (random depths) by context length, raw and chat format.
Accuracy is greedy exact match of the answer: every answer token is the argmax given the prompt
and the answer tokens before it (teacher forcing). That is exactly "greedy decoding reproduces
the answer"; a few generate() calls check the two agree.

The model card is tools/train/model_card_template.md with its {{PLACEHOLDERS}} filled in.
`--card-only` renders it from an existing --out-json (or with "pending" values) without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import synthetic  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TEMPLATE = os.path.join(HERE, "model_card_template.md")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="exported Hugging Face folder")
    ap.add_argument("--data", help="folder with val.bin and meta.json")
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--train-summary", help="train_summary.json of train.py (goes into the card)")
    ap.add_argument("--card-template", default=DEFAULT_TEMPLATE)
    ap.add_argument("--card-out", help="where the filled model card goes")
    ap.add_argument("--card-only", action="store_true", help="only render the card from --out-json (no GPU)")
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--depths", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    ap.add_argument("--trials", type=int, default=20, help="pass keys per (length, depth)")
    ap.add_argument("--task-trials", type=int, default=20, help="samples per (task, length)")
    ap.add_argument("--ppl-lengths", default="2048,8192")
    ap.add_argument("--ppl-tokens", type=int, default=262144, help="validation tokens per perplexity length")
    ap.add_argument("--batch-tokens", type=int, default=65536)
    ap.add_argument("--time-budget-s", type=float, default=150.0, help="skip what is left after this")
    ap.add_argument("--smoke", action="store_true", help="tiny grids for a smoke test")
    args = ap.parse_args(argv)
    if args.smoke:
        args.lengths, args.depths, args.trials, args.task_trials = "256,512", "0.25,0.5,0.75", 2, 2
        args.ppl_lengths, args.ppl_tokens = "256,512", 8192
    return args


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


# ----------------------------------------------------------------------------- measuring

def hidden_states(model, x):
    return model.model(input_ids=x, use_cache=False).last_hidden_state  # [B, L, H]


def perplexity(model, tok, val: np.ndarray, length: int, max_tokens: int, batch_tokens: int, device) -> dict:
    import torch
    import torch.nn.functional as F
    bos = tok.token_to_id(synthetic.BOS)
    n_win = max(1, min(max_tokens // length, (len(val) - 1) // (length - 1)))
    rows = np.empty((n_win, length), dtype=np.int64)  # [windows, length]: BOS + length-1 tokens
    rows[:, 0] = bos
    for i in range(n_win):
        rows[i, 1:] = val[i * (length - 1):(i + 1) * (length - 1)]
    nll, n_tok, n_bytes = 0.0, 0, 0
    per_batch = max(1, batch_tokens // length)
    with torch.no_grad():
        for s in range(0, n_win, per_batch):
            x = torch.from_numpy(rows[s:s + per_batch]).to(device)
            h = hidden_states(model, x[:, :-1])
            logits = model.lm_head(h).float()  # [B, L-1, V]
            nll += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
            n_tok += x[:, 1:].numel()
    for i in range(n_win):
        n_bytes += len(tok.decode(rows[i, 1:].tolist(), skip_special_tokens=True).encode("utf-8"))
    return {"context": length, "windows": n_win, "tokens": n_tok, "ppl": round(math.exp(nll / n_tok), 3),
            "bits_per_byte": round(nll / math.log(2) / n_bytes, 4)}


def score(model, samples: list, eos_id: int, batch_tokens: int, device) -> list[bool]:
    """For each sample: is every one of its first score_len completion tokens the argmax?
    Right padding is harmless: attention is causal and only positions before it are read."""
    import torch
    verdicts: list[bool | None] = [None] * len(samples)
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]))
    i = 0
    with torch.no_grad():
        while i < len(order):
            j = i + 1
            while j < len(order) and (j - i + 1) * len(samples[order[j]]) <= batch_tokens:
                j += 1
            group = [samples[k] for k in order[i:j]]
            width = max(len(s) for s in group)
            x = torch.full((len(group), width), eos_id, dtype=torch.long)
            b_idx, p_idx, want = [], [], []
            for b, s in enumerate(group):
                ids = s.ids
                x[b, :len(ids)] = torch.tensor(ids)
                p = len(s.prompt_ids)
                for t in range(s.score_len):  # position p + t - 1 predicts token p + t
                    b_idx.append(b)
                    p_idx.append(p + t - 1)
                    want.append(ids[p + t])
            h = hidden_states(model, x.to(device))               # [B, W, H]
            sel = h[torch.tensor(b_idx, device=device), torch.tensor(p_idx, device=device)]  # [N, H]
            hit = (model.lm_head(sel).argmax(-1).cpu() == torch.tensor(want)).tolist()
            pos = 0
            for b, s in enumerate(group):
                verdicts[order[i + b]] = all(hit[pos:pos + s.score_len])
                pos += s.score_len
            i = j
    return verdicts  # type: ignore[return-value]


def generate_check(model, tok, samples: list, verdicts: list[bool], device) -> list[dict]:
    """generate() (greedy, with KV cache) on a few samples; must agree with the scoring."""
    import torch
    out = []
    for s, v in zip(samples, verdicts):
        x = torch.tensor([s.prompt_ids], device=device)
        with torch.no_grad():
            g = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=s.score_len + 3,
                               do_sample=False)
        new = g[0, x.shape[1]:].tolist()
        ok = new[:s.score_len] == s.completion_ids[:s.score_len]
        out.append({"task": s.task, "tokens": len(s.prompt_ids), "value": s.value,
                    "generated": tok.decode(new, skip_special_tokens=False), "correct": ok,
                    "agrees_with_scoring": ok == v})
    return out


def run_eval(args) -> dict:
    from tokenizers import Tokenizer

    t0 = time.time()
    deadline = t0 + args.time_budget_s
    tok_path = os.path.join(args.model, "tokenizer.json")
    val_path = os.path.join(args.data, "val.bin")
    tok = Tokenizer.from_file(tok_path)
    val = np.fromfile(val_path, dtype=np.uint16)
    lengths, depths = ints(args.lengths), floats(args.depths)

    # All samples first, in forked workers, before torch touches CUDA.
    jobs = [("passkey", trial, length, False, {"depth": d, "digits": 5})
            for length in lengths for d in depths for trial in range(args.trials)]
    n_passkey = len(jobs)
    task_keys = [(task, fmt, length) for fmt in ("raw", "chat") for task in synthetic.TASKS for length in lengths]
    for task, fmt, length in task_keys:
        jobs += [(task, 10_000 + trial, length, fmt == "chat", {}) for trial in range(args.task_trials)]
    samples = synthetic.make_samples(jobs, val_path, tok_path, min(16, os.cpu_count() or 1))
    t_samples = time.time() - t0
    print(f"evaluate: {len(samples)} synthetic samples made in {t_samples:.1f} s", flush=True)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hf_tok = AutoTokenizer.from_pretrained(args.model)
    probe_ids = hf_tok("The pass key is 48213.")["input_ids"]
    want_ids = tok.encode("The pass key is 48213.", add_special_tokens=True).ids
    hf_tok_ok = probe_ids == want_ids and want_ids[0] == hf_tok.bos_token_id
    if not hf_tok_ok:
        print(f"WARNING: AutoTokenizer gives {probe_ids}, tokenizer.json gives {want_ids}", flush=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    eos_id = tok.token_to_id(synthetic.EOS)
    res: dict = {"model": os.path.abspath(args.model), "parameters": n_params, "device": str(device),
                 "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                 "torch": torch.__version__, "transformers": transformers.__version__,
                 "val_tokens": int(len(val)), "autotokenizer_matches_tokenizer_json": hf_tok_ok, "skipped": [], "timing_s": {"samples": round(t_samples, 1)}}
    print(f"evaluate: {args.model}: {n_params:,} parameters on {res['gpu'] or device}; "
          f"{len(val):,} validation tokens", flush=True)

    t = time.time()
    res["perplexity"] = []
    for length in ints(args.ppl_lengths):
        r = perplexity(model, tok, val, length, args.ppl_tokens, args.batch_tokens, device)
        res["perplexity"].append(r)
        print(f"  perplexity @ {length}: {r['ppl']:.3f} ({r['bits_per_byte']:.4f} bits/byte, "
              f"{r['tokens']:,} tokens)", flush=True)
    res["timing_s"]["perplexity"] = round(time.time() - t, 1)

    t = time.time()
    grid: dict = {}
    gen_samples, gen_verdicts = [], []
    per_length = len(depths) * args.trials
    for li, length in enumerate(lengths):
        if time.time() > deadline:
            res["skipped"].append(f"passkey @ {length}")
            continue
        group = samples[li * per_length:(li + 1) * per_length]  # [depth][trial]
        verdicts = score(model, group, eos_id, args.batch_tokens, device)
        row = {}
        for di, d in enumerate(depths):
            v = verdicts[di * args.trials:(di + 1) * args.trials]
            row[f"{d:g}"] = round(sum(v) / len(v), 4)
        grid[str(length)] = {"by_depth": row, "mean": round(sum(verdicts) / len(verdicts), 4),
                             "mean_prompt_tokens": round(sum(len(s.prompt_ids) for s in group) / len(group))}
        mid = len(depths) // 2 * args.trials
        gen_samples.append(group[mid])
        gen_verdicts.append(verdicts[mid])
        print(f"  passkey @ {length}: {grid[str(length)]['mean'] * 100:.1f} % "
              + " ".join(f"{k}:{v * 100:.0f}" for k, v in row.items()), flush=True)
    res["passkey"] = {"trials": args.trials, "digits": 5, "grid": grid}
    res["timing_s"]["passkey"] = round(time.time() - t, 1)

    t = time.time()
    tasks: dict = {}
    for ki, (task, fmt, length) in enumerate(task_keys):
        name = f"{task} ({fmt})"
        tasks.setdefault(name, {})
        if time.time() > deadline:
            res["skipped"].append(f"{name} @ {length}")
            continue
        start = n_passkey + ki * args.task_trials
        verdicts = score(model, samples[start:start + args.task_trials], eos_id, args.batch_tokens, device)
        tasks[name][str(length)] = round(sum(verdicts) / len(verdicts), 4)
    for name, by_len in tasks.items():
        print(f"  {name}: " + " ".join(f"{k}:{v * 100:.0f}%" for k, v in by_len.items()), flush=True)
    res["tasks"] = {"trials": args.task_trials, "accuracy": tasks}
    res["timing_s"]["tasks"] = round(time.time() - t, 1)

    t = time.time()
    res["generate_check"] = generate_check(model, tok, gen_samples, gen_verdicts, device)
    for g in res["generate_check"]:
        print(f"  generate @ {g['tokens']} tokens: want {g['value']}, got {g['generated']!r}, "
              f"agrees with scoring: {g['agrees_with_scoring']}", flush=True)
    res["timing_s"]["generate_check"] = round(time.time() - t, 1)
    res["timing_s"]["total"] = round(time.time() - t0, 1)
    if res["skipped"]:
        print(f"  time budget ran out; skipped: {', '.join(res['skipped'])}", flush=True)
    return res


# ----------------------------------------------------------------------------- the model card

def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def card_fields(res: dict | None, summary: dict | None) -> dict[str, str]:
    pending = "_pending: produced by `tools/train/run_all.sh real` (see tools/train/README.md)_"
    f: dict[str, str] = {}
    s = summary or {}
    cfg = s.get("config", {})
    a = s.get("args", {})
    if cfg:
        rope = cfg.get("rope_parameters") or {"rope_theta": cfg.get("rope_theta")}
        f["ARCH"] = (f"LlamaForCausalLM: hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
                     f"{cfg['num_attention_heads']} query heads and {cfg['num_key_value_heads']} KV heads of "
                     f"dimension {cfg['head_dim']} (GQA), SwiGLU MLP {cfg['intermediate_size']}, RMSNorm "
                     f"eps {cfg['rms_norm_eps']}, RoPE theta {rope.get('rope_theta'):g}, "
                     f"{cfg['max_position_embeddings']} positions, vocabulary {cfg['vocab_size']}, "
                     f"tied input/output embeddings")
        f["PARAMS"] = (f"{s['parameters']:,} ({s['parameters_without_embeddings']:,} without the embedding "
                       f"matrix)")
    d = s.get("data", {})
    if d:
        f["DATA"] = (f"{d['train']['books']} books, {d['train']['tokens']:,} tokens "
                     f"({d['train']['bytes'] / 1e6:.1f} MB of text) for training; {d['val']['books']} books, "
                     f"{d['val']['tokens']:,} tokens held out for validation")
    if a:
        f["RECIPE"] = (f"seed {a['seed']}; AdamW (0.9, 0.95), weight decay {a['weight_decay']} on matrices, "
                       f"peak lr {a['lr']:g}, {a['warmup_steps']} warm-up steps, cosine to "
                       f"{a['min_lr_frac']:g} of peak, grad clip {a['grad_clip']}; {a['batch_tokens']:,} tokens a "
                       f"step; context curriculum `{a['curriculum']}` (length: from progress); "
                       f"{a['synthetic_frac']:.0%} of sequences synthetic retrieval samples (answer tokens "
                       f"weighted {a['answer_weight']:g}x, {a['chat_prob']:.0%} of them in chat format); bf16 "
                       f"autocast, fp32 master weights")
        f["TRAINING"] = (f"{s['steps']:,} steps, {s['tokens'] / 1e6:.0f} M tokens "
                         f"({s['tokens'] / max(d.get('train', {}).get('tokens', 1), 1):.1f} passes over the "
                         f"training text), {s['train_time_s']:.0f} s on one {s['gpu']} (torch {s['torch']}, "
                         f"transformers {s['transformers']})")
        if s.get("curve"):
            last = s["curve"][-1]
            f["TRAINING"] += f"; final training loss {last['loss']:.3f} (answer tokens {last['answer_loss']:.3f})"
    if res:
        rows = ["| context | windows | tokens | perplexity | bits/byte |", "|---|---|---|---|---|"]
        for r in res.get("perplexity", []):
            rows.append(f"| {r['context']} | {r['windows']} | {r['tokens']:,} | {r['ppl']:.2f} | "
                        f"{r['bits_per_byte']:.3f} |")
        f["PPL_TABLE"] = "\n".join(rows)
        grid = res.get("passkey", {}).get("grid", {})
        if grid:
            depths = list(next(iter(grid.values()))["by_depth"])
            rows = ["| context (prompt tokens) | " + " | ".join(f"depth {x}" for x in depths) + " | mean |",
                    "|---" * (len(depths) + 2) + "|"]
            for length, g in grid.items():
                rows.append(f"| {length} ({g['mean_prompt_tokens']}) | "
                            + " | ".join(_pct(g["by_depth"][x]) for x in depths) + f" | {_pct(g['mean'])} |")
            f["PASSKEY_TABLE"] = (f"{res['passkey']['trials']} trials a cell, 5-digit keys.\n\n" + "\n".join(rows))
        acc = res.get("tasks", {}).get("accuracy", {})
        if acc:
            lengths = sorted({int(k) for v in acc.values() for k in v})
            rows = ["| task | " + " | ".join(str(x) for x in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
            for name, by_len in acc.items():
                rows.append(f"| {name} | " + " | ".join(_pct(by_len.get(str(x))) for x in lengths) + " |")
            f["TASK_TABLE"] = f"{res['tasks']['trials']} samples a cell, random depths.\n\n" + "\n".join(rows)
        gc = res.get("generate_check", [])
        f["EVAL_NOTES"] = (f"Measured with transformers {res['transformers']} and torch {res['torch']} on "
                           f"{res['gpu']}, bf16 weights. generate() agreed with the scoring on "
                           f"{sum(g['agrees_with_scoring'] for g in gc)} of {len(gc)} checked prompts.")
        if res.get("skipped"):
            f["EVAL_NOTES"] += " Not measured (time budget): " + ", ".join(res["skipped"]) + "."
        f["DATE"] = res.get("date", "")
    for key in ("ARCH", "PARAMS", "DATA", "RECIPE", "TRAINING", "PPL_TABLE", "PASSKEY_TABLE", "TASK_TABLE",
                "EVAL_NOTES", "DATE"):
        f.setdefault(key, pending)
    return f


def render_card(template_path: str, out_path: str, res: dict | None, summary: dict | None) -> None:
    with open(template_path, encoding="utf-8") as fh:
        text = fh.read()
    for key, value in card_fields(res, summary).items():
        text = text.replace("{{" + key + "}}", value)
    with open(out_path, "w", encoding="utf-8") as fh:
        fh.write(text)
    print(f"model card -> {out_path}", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    summary = None
    if args.train_summary and os.path.exists(args.train_summary):
        with open(args.train_summary) as fh:
            summary = json.load(fh)
    if args.card_only:
        res = None
        if os.path.exists(args.out_json):
            with open(args.out_json) as fh:
                res = json.load(fh)
            summary = summary or res.get("train_summary")
        if args.card_out:
            render_card(args.card_template, args.card_out, res, summary)
        return
    if not args.model or not args.data:
        raise SystemExit("--model and --data are needed unless --card-only")
    res = run_eval(args)
    res["date"] = datetime.date.today().isoformat()
    if summary:
        res["train_summary"] = {k: v for k, v in summary.items() if k != "curve"}
        res["train_summary"]["curve"] = summary.get("curve", [])[-50:]
    os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)
    with open(args.out_json, "w") as fh:
        json.dump(res, fh, indent=2)
    print(f"evaluation -> {args.out_json}; seconds: {res['timing_s']}", flush=True)
    if args.card_out:
        render_card(args.card_template, args.card_out, res, summary)


if __name__ == "__main__":
    main()
