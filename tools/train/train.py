#!/usr/bin/env python3
"""Trains the adakv test model: a small long-context LlamaForCausalLM (transformers), on the
Gutenberg corpus mixed with synthetic retrieval tasks, then exports a Hugging Face folder.

    python3 tools/train/train.py --data DIR --tokenizer models/adakv-tiny-v1 --work WORK \
        --export EXPORT_DIR --time-budget-s 400

Recipe (defaults): hidden 384, 8 layers, 6 query heads and 2 KV heads of dim 64, SwiGLU 1024,
vocab 8192, tied embeddings, RoPE theta 500000, 8192 positions; AdamW (0.9, 0.95), wd 0.1 on
matrices, peak lr 2e-3, linear warmup then cosine to 10 %; 131072 tokens an optimizer step at
every context length; curriculum 1024 -> 2048 -> 4096 -> 8192 tokens over the run; a quarter of
the sequences are synthetic retrieval samples (synthetic.py) whose answer tokens count 5x in the
loss. bf16 autocast, fp32 master weights, SDPA (flash) attention.

Progress through the run (what the curriculum and the cosine follow) is training time over
--time-budget-s, or step over --max-steps when that is given (fully reproducible runs). The data
of step s is a function of (seed, s, context length) alone, so a resumed run sees what an
uninterrupted one would at the same progress.

Checkpoints (model, optimizer, step, tokens, training time) go to WORK/ckpt.pt every
--ckpt-every steps and at the end; --resume continues from it. --smoke trains a tiny model for
~10 s and checks checkpoint save/load; --probe times one step at each context length with the
real model (memory and tokens/s) first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from batches import Batcher, Prefetcher, lr_at, parse_curriculum, seq_len_at  # noqa: E402

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
EOT = "<|eot|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


# ----------------------------------------------------------------------------- arguments

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder with train.bin, val.bin, meta.json (prepare_data.py)")
    ap.add_argument("--tokenizer", required=True, help="folder with tokenizer.json and tokenizer_config.json")
    ap.add_argument("--work", required=True, help="checkpoints, train_summary.json")
    ap.add_argument("--export", help="Hugging Face output folder (written at the end)")
    ap.add_argument("--time-budget-s", type=float, default=420.0, help="training time (s), summed over resumes")
    ap.add_argument("--max-steps", type=int, default=0, help="if > 0: progress = step / max-steps, no time limit")
    ap.add_argument("--seed", type=int, default=1234)
    # model
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--rope-theta", type=float, default=500000.0)
    ap.add_argument("--max-pos", type=int, default=8192)
    # optimisation
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=150)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--batch-tokens", type=int, default=131072, help="tokens an optimizer step")
    ap.add_argument("--micro-tokens", type=int, default=65536, help="tokens a forward/backward (accumulation)")
    ap.add_argument("--curriculum", default="1024:0,2048:0.3,4096:0.5,8192:0.75",
                    help="LEN:START_PROGRESS,...: context length from each progress fraction on")
    ap.add_argument("--synthetic-frac", type=float, default=0.25)
    ap.add_argument("--answer-weight", type=float, default=5.0)
    ap.add_argument("--chat-prob", type=float, default=0.2)
    # running
    ap.add_argument("--ckpt-every", type=int, default=500)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--log-every-s", type=float, default=20.0)
    ap.add_argument("--data-workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 2)),
                    help="processes building batches ahead (0: in the training process)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decoder (recompiles per length)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, ~10 s of training, checks checkpoint round trip")
    ap.add_argument("--probe", action="store_true", help="time one step per context length with the real model first")
    args = ap.parse_args(argv)
    if args.smoke:
        args.real_arch = {k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "head_dim",
                                                          "intermediate")}
        args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate = 128, 2, 2, 1, 256
        args.batch_tokens, args.micro_tokens = 16384, 8192
        args.curriculum = "256:0,512:0.5"
        args.warmup_steps, args.ckpt_every, args.log_every_s = 10, 15, 3.0
        args.time_budget_s = min(args.time_budget_s, 10.0)
    args.curriculum_list = parse_curriculum(args.curriculum)
    return args


# ----------------------------------------------------------------------------- model

def make_config(args, vocab_size: int, bos_id: int, eos_id: int, arch: dict | None = None):
    from transformers import LlamaConfig
    a = arch or {k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate")}
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=a["hidden"], intermediate_size=a["intermediate"],
        num_hidden_layers=a["layers"], num_attention_heads=a["heads"], num_key_value_heads=a["kv_heads"],
        head_dim=a["head_dim"], hidden_act="silu", max_position_embeddings=args.max_pos,
        initializer_range=0.02, rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=False,
        mlp_bias=False, bos_token_id=bos_id, eos_token_id=eos_id,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta})
    rp = getattr(cfg, "rope_parameters", None)
    if not rp or float(rp.get("rope_theta", -1)) != args.rope_theta:
        raise RuntimeError(f"this transformers did not take rope_parameters: {rp!r}")
    return cfg


def make_model(cfg, device):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    assert type(model).__name__ == "LlamaForCausalLM", type(model)
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight, "embeddings must be tied"
    return model.to(device=device, dtype=torch.float32)


def count_params(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    return total, total - model.model.embed_tokens.weight.numel()


def make_optimizer(model, args):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=torch.cuda.is_available())


def ensure_flash_gqa(device) -> str:
    """HF passes enable_gqa=True to SDPA when it can. If this PyTorch's flash kernel does not take
    GQA, make HF repeat the KV heads instead, so attention stays on flash (never the O(L^2) math
    kernel). Returns what was decided, for the log."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(1, 4, 128, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(1, 2, 128, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True).sum().backward()
        return "flash attention takes enable_gqa"
    except RuntimeError:
        from transformers.integrations import sdpa_attention
        sdpa_attention.use_gqa_in_sdpa = lambda *a, **k: False
        return "flash attention without enable_gqa: HF repeats KV heads"


def loss_terms(model, x, y, w, weight_total: float):
    """x, y: [B, L] int64 inputs and next-token targets; w: [B, L] float32 loss weights.
    Returns (loss to backpropagate: sum(w * ce) / weight_total, sum of ce, sum of ce on answer
    tokens, number of answer tokens)."""
    hidden = model.model(input_ids=x, use_cache=False).last_hidden_state  # [B, L, H]
    logits = model.lm_head(hidden)                                         # [B, L, V]
    ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(w)  # [B, L]
    answer = (w > 1.0).float()
    loss = (ce * w).sum() / weight_total
    return loss, ce.detach().sum(), (ce.detach() * answer).sum(), answer.sum()


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: str, model, opt, state: dict) -> None:
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), **state}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, model, opt) -> dict:
    ck = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(ck.pop("model"))
    opt.load_state_dict(ck.pop("optimizer"))
    return ck


# ----------------------------------------------------------------------------- export

def export(model, tokenizer_dir: str, out_dir: str, bos_id: int, eos_ids: list[int], device) -> dict:
    """Writes the Hugging Face folder (bf16 safetensors, tokenizer files) and checks it: the file
    holds exactly the bf16-rounded weights, and transformers loads it back to the same logits."""
    import copy

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, GenerationConfig
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    # A bf16 copy, but with the fp32 RoPE buffers (inv_freq): casting those to bf16 would move
    # the rotary angles, and they are not saved anyway.
    m16 = copy.deepcopy(model).eval().to(torch.bfloat16)
    for name, b32 in model.named_buffers():
        owner, _, attr = name.rpartition(".")
        setattr(m16.get_submodule(owner), attr, b32.detach().clone())
    m16.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_ids,
                                             pad_token_id=eos_ids[0], do_sample=False)
    m16.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
    files = {f: os.path.getsize(os.path.join(out_dir, f)) for f in sorted(os.listdir(out_dir))}
    for need in ("config.json", "model.safetensors", "generation_config.json") + TOKENIZER_FILES:
        assert need in files, f"export lacks {need}: {files}"

    # 1. The file: every parameter once (the tied lm_head is normally left out), each bit-equal
    # to the bf16 copy.
    saved = load_file(os.path.join(out_dir, "model.safetensors"))
    named = dict(m16.named_parameters(remove_duplicate=False))
    covered = set()
    for k, v in saved.items():
        assert k in named, f"unexpected tensor {k} in model.safetensors"
        assert v.dtype == torch.bfloat16 and torch.equal(v.to(device), named[k].detach()), f"{k} differs"
        covered.add(id(named[k]))
    missing = [k for k, p in named.items() if id(p) not in covered]
    assert not missing, f"model.safetensors lacks {missing}"
    # 2. transformers' own load: same config (RoPE included) and same logits.
    back = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.bfloat16).to(device).eval()
    rb, rm = back.model.rotary_emb.inv_freq.float(), model.model.rotary_emb.inv_freq.float()
    assert torch.allclose(rb, rm, rtol=1e-2, atol=0), "RoPE frequencies changed in the round trip"
    inv_freq_dtype = str(back.model.rotary_emb.inv_freq.dtype)
    for name, b in back.named_buffers():  # compare weights and config, not buffer precision
        owner, _, attr = name.rpartition(".")
        setattr(m16.get_submodule(owner), attr, b.detach().clone())
    x = torch.randint(0, model.config.vocab_size, (2, 256), device=device)
    with torch.no_grad():
        a = m16(input_ids=x).logits.float()
        b = back(input_ids=x).logits.float()
    diff = (a - b).abs().max().item()
    assert diff < 1e-2, f"reloaded export differs: max |dlogit| = {diff}"
    with open(os.path.join(out_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16", cfg
    print(f"export: {out_dir}: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in files.items())
          + f"; weights bit-exact; reload max |dlogit| {diff:.1e}; reloaded inv_freq {inv_freq_dtype}", flush=True)
    del m16, back
    return {"files": files, "total_mb": round(sum(files.values()) / 1e6, 2), "reload_max_abs_logit_diff": diff}


# ----------------------------------------------------------------------------- training

def train_steps(model, opt, get_batch, args, device, state: dict, stop, log, train_t0: float):
    """Runs optimizer steps until stop(state, progress) is true. state: step, tokens,
    train_time (s), curve; get_batch(step, seq_len, n_rows) -> (rows, weights, synthetic rows)."""
    loss_sum = torch.zeros((), device=device)
    ans_sum = torch.zeros((), device=device)
    ans_n = torch.zeros((), device=device)
    tok_since, last_log, last_len = 0, time.time(), None
    prior_time = state["train_time"]
    while True:
        state["train_time"] = prior_time + (time.time() - train_t0)
        progress = state["step"] / args.max_steps if args.max_steps else state["train_time"] / args.time_budget_s
        if stop(state, progress):
            break
        seq_len = seq_len_at(args.curriculum_list, progress)
        if seq_len != last_len:
            log(f"step {state['step']}: context length {seq_len} (progress {progress:.2f})")
            last_len = seq_len
        n_rows = max(1, args.batch_tokens // seq_len)
        micro = max(1, min(n_rows, args.micro_tokens // seq_len))
        rows, weights, n_synth = get_batch(state["step"], seq_len, n_rows)
        lr = lr_at(args, state["step"], progress)
        for g in opt.param_groups:
            g["lr"] = lr
        weight_total = float(weights.sum())
        rows_t = torch.from_numpy(rows).pin_memory().to(device, non_blocking=True)
        w_t = torch.from_numpy(weights).pin_memory().to(device, non_blocking=True)
        for s in range(0, n_rows, micro):
            x = rows_t[s:s + micro, :-1]
            y = rows_t[s:s + micro, 1:]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, ce_sum, a_sum, a_n = loss_terms(model, x, y, w_t[s:s + micro], weight_total)
            loss.backward()
            loss_sum += ce_sum
            ans_sum += a_sum
            ans_n += a_n
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        state["tokens"] += n_rows * seq_len
        tok_since += n_rows * seq_len
        state["synthetic_rows"] = state.get("synthetic_rows", 0) + n_synth

        if args.ckpt_every and state["step"] % args.ckpt_every == 0:
            save_checkpoint(os.path.join(args.work, "ckpt.pt"), model, opt, dict(state))
        now = time.time()
        if now - last_log >= args.log_every_s:
            lm = (loss_sum / tok_since).item()  # syncs; the only sync in the loop
            ans = (ans_sum / ans_n.clamp(min=1)).item()
            rate = tok_since / (now - last_log)
            state["curve"].append({"step": state["step"], "tokens": state["tokens"], "seq_len": seq_len,
                                   "loss": round(lm, 4), "answer_loss": round(ans, 4),
                                   "train_time_s": round(prior_time + now - train_t0, 1)})
            log(f"step {state['step']:6d} | ctx {seq_len:5d} | tokens {state['tokens'] / 1e6:8.1f} M | "
                f"loss {lm:.4f} | answer loss {ans:.3f} | lr {lr:.2e} | gnorm {gnorm.item():.2f} | "
                f"{rate / 1e3:7.1f} K tok/s | train {prior_time + now - train_t0:6.1f} s")
            loss_sum.zero_(), ans_sum.zero_(), ans_n.zero_()
            tok_since, last_log = 0, now
    if device.type == "cuda":
        torch.cuda.synchronize()
    state["train_time"] = prior_time + (time.time() - train_t0)


def probe(args, vocab, bos, eos, device, get_batch, log) -> list[dict]:
    """One timed optimizer step at each curriculum length with the real model (after one warm-up
    step): peak memory and tokens/s, so a real run's budget can be judged before it starts."""
    real = getattr(args, "real_arch", None)
    cfg = make_config(args, vocab, bos, eos, real)
    model = make_model(cfg, device)
    opt = make_optimizer(model, args)
    real_args = argparse.Namespace(**vars(args))
    real_args.batch_tokens, real_args.micro_tokens = 131072, 65536
    real_args.ckpt_every, real_args.log_every_s = 0, 1e9
    out = []
    for seq_len in (1024, 2048, 4096, 8192):
        real_args.curriculum_list = [(seq_len, 0.0)]
        times = []
        for i in range(2):
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            t0 = time.time()
            st = {"step": 10**6 + i, "tokens": 0, "train_time": 0.0, "curve": []}
            train_steps(model, opt, get_batch, real_args, device, st,
                        lambda s, p, n=st["step"]: s["step"] > n, lambda m: None, time.time())
            times.append(time.time() - t0)
        rate = real_args.batch_tokens / times[-1]
        r = {"seq_len": seq_len, "step_s": round(times[-1], 3), "tokens_per_s": round(rate),
             "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
        log(f"probe: ctx {seq_len}: {r['step_s']:.3f} s/step of 131072 tokens, {rate / 1e3:.0f} K tok/s, "
            f"peak {r['peak_mem_gb']} GiB")
        out.append(r)
    del model, opt
    torch.cuda.empty_cache()
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.time()
    os.makedirs(args.work, exist_ok=True)
    log_path = os.path.join(args.work, "train.log")

    def log(msg: str) -> None:
        line = f"[{time.time() - t_start:7.1f}s] {msg}"
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    tok_path = os.path.join(args.tokenizer, "tokenizer.json")
    tok = Tokenizer.from_file(tok_path)
    with open(os.path.join(args.data, "meta.json")) as f:
        meta = json.load(f)
    vocab = tok.get_vocab_size()
    bos, eos, eot = tok.token_to_id(BOS), tok.token_to_id(EOS), tok.token_to_id(EOT)
    assert meta["vocab_size"] == vocab and meta["bos_id"] == bos and meta["eos_id"] == eos, "data/tokenizer mismatch"
    train_path = os.path.join(args.data, "train.bin")
    train_tokens = np.fromfile(train_path, dtype=np.uint16)
    # The batch workers are forked here, before CUDA is initialised.
    if args.data_workers > 0:
        get_batch = Prefetcher(train_path, tok_path, args, args.data_workers)
    else:
        get_batch = Batcher(train_tokens, tok, args).step_batch

    assert torch.cuda.is_available(), "train.py needs a CUDA GPU"
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    import transformers
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"GPU {torch.cuda.get_device_name(0)}, python {platform.python_version()}, "
        f"{args.data_workers} batch workers")
    log(ensure_flash_gqa(device))
    log(f"data: {len(train_tokens):,} training tokens ({meta['train']['books']} books); "
        f"validation held out: {meta['val']['tokens']:,} tokens")

    probe_results = probe(args, vocab, bos, eos, device, get_batch, log) if args.probe else []

    torch.manual_seed(args.seed)
    cfg = make_config(args, vocab, bos, eos)
    model = make_model(cfg, device)
    n_params, n_non_emb = count_params(model)
    log(f"model: LlamaForCausalLM hidden {args.hidden}, {args.layers} layers, {args.heads} q heads / "
        f"{args.kv_heads} kv heads x {args.head_dim}, mlp {args.intermediate}, vocab {vocab}, tied; "
        f"{n_params:,} parameters ({n_non_emb:,} without embeddings); attention {model.config._attn_implementation}")
    opt = make_optimizer(model, args)
    if args.compile:
        model.model.compile(dynamic=False)

    ckpt = os.path.join(args.work, "ckpt.pt")
    state = {"step": 0, "tokens": 0, "train_time": 0.0, "curve": [], "synthetic_rows": 0}
    if args.resume and os.path.exists(ckpt):
        state = load_checkpoint(ckpt, model, opt)
        log(f"resumed from {ckpt}: step {state['step']}, {state['tokens'] / 1e6:.1f} M tokens, "
            f"{state['train_time']:.0f} s trained")
    elif args.resume:
        log(f"--resume: no {ckpt}, starting fresh")

    def stop(st, progress):
        return progress >= 1.0

    log(f"training: budget {args.time_budget_s:.0f} s" + (f", max steps {args.max_steps}" if args.max_steps else "")
        + f", curriculum {args.curriculum}, {args.batch_tokens} tokens/step, peak lr {args.lr}")
    model.train()
    t_train = time.time()
    try:
        train_steps(model, opt, get_batch, args, device, state, stop, log, time.time())
    except torch.cuda.OutOfMemoryError as e:
        # Keep what was learnt: export the model as it is rather than lose the run.
        state["aborted"] = f"CUDA out of memory at step {state['step']}"
        log(f"{state['aborted']}: {str(e)[:300]}; stopping and exporting")
        opt.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    log(f"trained: {state['step']} steps, {state['tokens'] / 1e6:.1f} M tokens, "
        f"{state['train_time']:.1f} s of training ({time.time() - t_train:.1f} s in this run), "
        f"{state['tokens'] / max(state['train_time'], 1e-9) / 1e3:.0f} K tok/s on average")
    save_checkpoint(ckpt, model, opt, dict(state))

    if args.smoke:
        # The checkpoint must restore exactly, and training must continue from it.
        m2 = make_model(cfg, device)
        o2 = make_optimizer(m2, args)
        st2 = load_checkpoint(ckpt, m2, o2)
        for (k, a), (_, b) in zip(model.state_dict().items(), m2.state_dict().items()):
            assert torch.equal(a, b), f"checkpoint round trip changed {k}"
        assert st2["step"] == state["step"] and st2["tokens"] == state["tokens"]
        n0 = st2["step"]
        train_steps(m2, o2, get_batch, args, device, st2, lambda s, p: s["step"] >= n0 + 3, log, time.time())
        log(f"smoke: checkpoint round trip exact; resumed 3 more steps to step {st2['step']}")

    summary = {
        "seed": args.seed, "parameters": n_params, "parameters_without_embeddings": n_non_emb,
        "steps": state["step"], "tokens": state["tokens"], "train_time_s": round(state["train_time"], 1),
        "synthetic_rows": state.get("synthetic_rows", 0), "aborted": state.get("aborted"), "curve": state["curve"], "probe": probe_results,
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "transformers": transformers.__version__, "data": meta,
        "args": {k: v for k, v in vars(args).items() if k not in ("curriculum_list",)},
        "config": json.loads(cfg.to_json_string(use_diff=False)),
    }
    if args.export:
        try:
            summary["export"] = export(model, args.tokenizer, args.export, bos, [eos, eot], device)
        except Exception as e:  # noqa: BLE001
            # A failed check must not lose a real run: the files are written first; say so loudly.
            if args.smoke:
                raise
            summary["export"] = {"error": repr(e)}
            log(f"EXPORT CHECK FAILED: {e!r}")
    with open(os.path.join(args.work, "train_summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    if isinstance(get_batch, Prefetcher):
        get_batch.close()
    log(f"train.py done in {time.time() - t_start:.1f} s")


if __name__ == "__main__":
    main()
