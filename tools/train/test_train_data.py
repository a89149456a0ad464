#!/usr/bin/env python3
"""Tests of the torch-free parts of tools/train: corpus split, tokenizer folder, data
preparation, synthetic tasks, training batches and schedules, model card rendering.

    python3 tools/train/test_train_data.py          (needs tokenizers, transformers, numpy; ~1 min)

The synthetic tasks are checked by an independent solver that reads only the decoded prompt
text (regular expressions), not the generator's internals.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import unittest

import numpy as np
from tokenizers import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import batches  # noqa: E402
import corpus  # noqa: E402
import evaluate  # noqa: E402
import synthetic  # noqa: E402

TOK_DIR = os.path.join(ROOT, "models", "adakv-tiny-v1")
CORPUS = sorted(glob.glob(os.path.join(ROOT, "..", "shared", "corpus", "*.txt.xz"))) or sorted(
    glob.glob("/work/shared/corpus/*.txt.xz"))
SLICE_CHARS = 2_000_000

_DATA: dict = {}


def prepared() -> str:
    """A folder prepared by prepare_data.py from a slice of the corpus (made once)."""
    if not CORPUS:
        raise unittest.SkipTest("corpus (shared/corpus/*.txt.xz) not found")
    if "dir" not in _DATA:
        d = tempfile.mkdtemp(prefix="adakv-prep-")
        subprocess.run([sys.executable, os.path.join(HERE, "prepare_data.py"), "--tokenizer", TOK_DIR, "--out", d,
                        "--max-chars", str(SLICE_CHARS), "--workers", "2", *CORPUS],
                       check=True, capture_output=True)
        _DATA["dir"] = d
    return _DATA["dir"]


def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(os.path.join(TOK_DIR, "tokenizer.json"))


def solve(task: str, prompt: str) -> str:
    """The answer to a synthetic prompt, found from its text alone."""
    if task == "passkey":
        keys = re.findall(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\.", prompt)
        assert len(keys) == 1 and keys[0][0] == keys[0][1], keys
        return keys[0][0]
    if task in ("kv_scatter", "kv_block"):
        asked = re.findall(r"what is the value for key ([0-9a-f]{4}-[0-9a-f]{4})\?", prompt, re.IGNORECASE)[-1]
        if task == "kv_scatter":
            pairs = re.findall(r"The value for key ([0-9a-f]{4}-[0-9a-f]{4}) is (\d+)\.", prompt)
        else:
            pairs = re.findall(r"^([0-9a-f]{4}-[0-9a-f]{4}): (\d+)$", prompt, re.MULTILINE)
        table = dict(pairs)
        assert len(table) == len(pairs), "keys must be unique"
        return table[asked]
    if task == "multi_value":
        word = re.findall(r"What are all the special magic numbers for (\w+)\?", prompt)[-1]
        return ", ".join(re.findall(rf"One of the special magic numbers for {word} is: (\d+)\.", prompt))
    if task == "var_track":
        asked = re.findall(r"What is the value of VAR ([A-Z]{5})\?", prompt)[-1]
        env: dict[str, str] = {}
        for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (\d+|VAR [A-Z]{5})\.", prompt):
            env[name] = env[rhs[4:]] if rhs.startswith("VAR ") else rhs
        return env[asked]
    raise ValueError(task)


class CorpusSplit(unittest.TestCase):
    def test_full_split_is_disjoint_and_about_ten_percent(self):
        if not CORPUS:
            self.skipTest("corpus not found")
        train, val = corpus.load_splits(CORPUS)
        self.assertGreater(len(val), 3)
        last = corpus.split_books(corpus.read_text(CORPUS[-1]))
        self.assertEqual(val, last[len(last) - len(val):])  # the tail of the last file
        frac = sum(map(len, val)) / sum(map(len, last))
        self.assertTrue(0.05 < frac <= 0.1 + 1e-9, frac)
        train_set = set(train)
        self.assertFalse(any(v in train_set for v in val))

    def test_paragraph_chunks_concatenate_back(self):
        text = ("word " * 50 + "\n\n") * 400
        pieces = corpus.paragraph_chunks(text, 1000)
        self.assertEqual("".join(pieces), text)
        self.assertTrue(all(len(p) <= 1000 for p in pieces))


class TokenizerFolder(unittest.TestCase):
    def test_files_and_specials(self):
        with open(os.path.join(TOK_DIR, "tokenizer.json")) as f:
            spec = json.load(f)
        self.assertEqual(spec["model"]["type"], "BPE")
        self.assertTrue(spec["model"]["ignore_merges"])
        self.assertEqual(spec["decoder"]["type"], "ByteLevel")
        tok = tokenizer()
        self.assertEqual(tok.get_vocab_size(), 8192)
        for i, t in enumerate(["<|begin_of_text|>", "<|end_of_text|>", "<|system|>", "<|user|>", "<|assistant|>",
                               "<|eot|>"]):
            self.assertEqual(tok.token_to_id(t), i)
        with open(os.path.join(TOK_DIR, "tokenizer_config.json")) as f:
            cfg = json.load(f)
        self.assertIn("for message in messages", cfg["chat_template"])

    def test_transformers_round_trip_and_chat(self):
        from transformers import AutoTokenizer
        hf = AutoTokenizer.from_pretrained(TOK_DIR)
        for text in ["Hello, world!  It's 1865.\n\nNew paragraph\twith tab", "ünïcödé “quotes” — 😀"]:
            ids = hf(text)["input_ids"]
            self.assertEqual(ids[0], 0)
            self.assertEqual(hf.decode(ids, skip_special_tokens=True), text)
        out = hf.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                                     tokenize=False, add_generation_prompt=True)
        self.assertEqual(out, "<|begin_of_text|><|system|>\nS<|eot|><|user|>\nU<|eot|><|assistant|>\n")

    def test_answers_split_from_space_and_punctuation(self):
        # The answer scoring relies on the split regex keeping the space, the digits and the
        # final "." apart: then the value's tokens do not depend on what follows them.
        tok = tokenizer()
        rng = np.random.default_rng(0)
        for n in rng.integers(1000, 10**6, size=200):
            enc = lambda t: tok.encode(t, add_special_tokens=False).ids  # noqa: E731
            self.assertEqual(enc(f"is {n}."), enc("is") + enc(" ") + enc(str(n)) + enc("."))


class PrepareData(unittest.TestCase):
    def test_tokens_decode_to_the_books(self):
        d = prepared()
        with open(os.path.join(d, "meta.json")) as f:
            meta = json.load(f)
        tok = tokenizer()
        train_books, val_books = corpus.load_splits(CORPUS, max_chars=SLICE_CHARS)
        for name, books in (("train", train_books), ("val", val_books)):
            ids = np.fromfile(os.path.join(d, f"{name}.bin"), dtype=np.uint16)
            self.assertEqual(meta[name]["tokens"], len(ids))
            eos_at = np.flatnonzero(ids == meta["eos_id"])
            self.assertEqual(len(eos_at), len(books))  # one EOS after each book
            self.assertEqual(eos_at[-1], len(ids) - 1)
            self.assertNotIn(meta["bos_id"], set(ids[:100000].tolist()))
            for k in (0, len(books) - 1):
                s = 0 if k == 0 else eos_at[k - 1] + 1
                self.assertEqual(tok.decode(ids[s:eos_at[k]].tolist()), books[k])


class Synthetic(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tok = tokenizer()
        cls.hay = synthetic.Haystack(np.fromfile(os.path.join(prepared(), "train.bin"), dtype=np.uint16), cls.tok)

    def check(self, s: synthetic.Sample, target: int, chat: bool):
        tok = self.tok
        self.assertLessEqual(len(s), target)
        self.assertGreaterEqual(len(s), target - 8 - target // 64 - 4 * 12)
        self.assertEqual(s.prompt_ids[0], tok.token_to_id("<|begin_of_text|>"))
        self.assertEqual(s.prompt_ids.count(0), 1)
        end = "<|eot|>" if chat else "<|end_of_text|>"
        self.assertEqual(s.completion_ids[-1], tok.token_to_id(end))
        prompt = tok.decode(s.prompt_ids, skip_special_tokens=False)
        completion = tok.decode(s.completion_ids, skip_special_tokens=False)
        self.assertEqual(solve(s.task, prompt), s.value)
        scored = tok.decode(s.completion_ids[:s.score_len])
        if chat:
            self.assertTrue(prompt.startswith("<|begin_of_text|><|user|>\n"))
            self.assertTrue(prompt.endswith("<|eot|><|assistant|>\n"))
            self.assertTrue(scored.endswith(" " + s.value) and scored.startswith("The "), scored)
        else:
            self.assertEqual(scored, " " + s.value)
            self.assertTrue(prompt.rstrip().endswith(" is") or prompt.endswith(" are"), prompt[-80:])
        self.assertTrue(completion.endswith("." + end), completion)
        # The ids are the tokenizer's own encoding of the whole text: what a text-level
        # evaluator (adakv eval) would feed the model is exactly what was trained on.
        self.assertEqual(tok.encode(prompt + completion, add_special_tokens=False).ids, s.ids)

    def test_every_task_every_format_and_length(self):
        for task in synthetic.TASKS:
            for target in (256, 1024, 4096, 8192):
                for chat in (False, True):
                    for seed in range(3):
                        with self.subTest(task=task, target=target, chat=chat, seed=seed):
                            self.check(synthetic.make_sample(task, seed, self.hay, target, chat), target, chat)

    def test_deterministic(self):
        a = synthetic.make_sample("var_track", 7, self.hay, 2048)
        b = synthetic.make_sample("var_track", 7, self.hay, 2048)
        c = synthetic.make_sample("var_track", 8, self.hay, 2048)
        self.assertEqual(a.ids, b.ids)
        self.assertNotEqual(a.ids, c.ids)
        t1 = synthetic.make_training_sample(99, self.hay, 1024)
        t2 = synthetic.make_training_sample(99, self.hay, 1024)
        self.assertEqual(t1.ids, t2.ids)

    def test_passkey_depth(self):
        for depth in (0.1, 0.5, 0.9):
            s = synthetic.make_sample("passkey", 3, self.hay, 4096, depth=depth, digits=5)
            self.assertEqual(len(s.value), 5)
            text = self.tok.decode(s.prompt_ids)
            at = text.index("The pass key is " + s.value)
            body_len = text.index("What is the pass key?")
            self.assertAlmostEqual(at / body_len, depth, delta=0.05)

    def test_same_haystack_and_key_across_depths(self):
        a = synthetic.make_sample("passkey", 5, self.hay, 2048, depth=0.2)
        b = synthetic.make_sample("passkey", 5, self.hay, 2048, depth=0.8)
        self.assertEqual(a.value, b.value)
        strip = lambda s: self.tok.decode(s.prompt_ids).replace(  # noqa: E731
            f"The pass key is {s.value}. Remember it. {s.value} is the pass key.", "")
        self.assertEqual(re.sub(r"\s+", " ", strip(a)), re.sub(r"\s+", " ", strip(b)))

    def test_insert_needles(self):
        hay = "First one. Second one.\nThird line here. End"
        self.assertEqual(synthetic.insert_needles(hay, ["N1", "N2"], [0.0, 0.5]),
                         "First one. N1 Second one.\nN2\nThird line here. End")
        self.assertEqual(synthetic.insert_needles(hay, ["N"], [0.6]), "First one. Second one.\nThird line here. N End")
        self.assertEqual(synthetic.insert_needles("no breaks", ["N"], [0.5]), "no breaks\nN\n")

    def test_training_mix(self):
        counts: dict = {}
        chats = 0
        for seed in range(300):
            s = synthetic.make_training_sample(seed, self.hay, 512)
            counts[s.task] = counts.get(s.task, 0) + 1
            chats += s.chat
        self.assertEqual(set(counts), set(synthetic.TASKS))
        self.assertTrue(30 <= chats <= 90, chats)


class Batches(unittest.TestCase):
    def args(self, **kw):
        a = dict(seed=1, synthetic_frac=0.5, chat_prob=0.2, answer_weight=5.0, lr=1e-3, min_lr_frac=0.1,
                 warmup_steps=10)
        a.update(kw)
        return argparse.Namespace(**a)

    def test_rows_and_weights(self):
        tok = tokenizer()
        train = np.fromfile(os.path.join(prepared(), "train.bin"), dtype=np.uint16)
        b = batches.Batcher(train, tok, self.args())
        rows, w, n_synth = b.step_batch(3, 1024, 16)
        self.assertEqual(rows.shape, (16, 1025))
        self.assertEqual(w.shape, (16, 1024))
        self.assertTrue((rows[:, 0] == 0).all())
        self.assertTrue(0 < n_synth < 16)
        self.assertTrue((rows >= 0).all() and (rows < 8192).all())
        heavy = 0
        for r in range(16):
            idx = np.flatnonzero(w[r] > 1)
            if len(idx) == 0:
                # A corpus row: BOS and a contiguous crop of the stream.
                crop = rows[r, 1:].astype(np.uint16)
                hits = np.flatnonzero(train[:len(train) - 1024] == crop[0])
                self.assertTrue(any((train[h:h + 1024] == crop).all() for h in hits))
                continue
            heavy += 1
            self.assertTrue((np.diff(idx) == 1).all())  # one contiguous answer region
            answer = rows[r, idx + 1].tolist()
            end = answer[-1]
            self.assertIn(end, (tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot|>")))
            text = tok.decode(rows[r, :idx[-1] + 2].tolist(), skip_special_tokens=False)
            task = next(t for t, pat in (("passkey", "pass key?"), ("kv_block", "In the list"),
                                         ("kv_scatter", "What is the value for key"),
                                         ("multi_value", "magic numbers for"), ("var_track", "value of VAR"))
                        if pat in text[-400:])
            prompt = tok.decode(rows[r, :idx[0] + 1].tolist(), skip_special_tokens=False)
            want = solve(task, prompt)
            self.assertIn(" " + want + ".", tok.decode(answer, skip_special_tokens=False))
        self.assertEqual(heavy, n_synth)
        rows2, w2, _ = b.step_batch(3, 1024, 16)
        self.assertTrue((rows == rows2).all() and (w == w2).all())
        rows3, _, _ = b.step_batch(4, 1024, 16)
        self.assertFalse((rows == rows3).all())

    def test_curriculum_and_lr(self):
        cur = batches.parse_curriculum("1024:0,2048:0.3,4096:0.5,8192:0.75")
        self.assertEqual([batches.seq_len_at(cur, p) for p in (0, 0.29, 0.3, 0.6, 0.75, 1.0)],
                         [1024, 1024, 2048, 4096, 8192, 8192])
        a = self.args()
        self.assertAlmostEqual(batches.lr_at(a, 0, 0.0), 1e-4)
        self.assertAlmostEqual(batches.lr_at(a, 9, 0.0), 1e-3)
        self.assertAlmostEqual(batches.lr_at(a, 100, 0.5), 1e-3 * (0.1 + 0.9 * 0.5))
        self.assertAlmostEqual(batches.lr_at(a, 100, 1.0), 1e-4)
        self.assertAlmostEqual(batches.lr_at(a, 100, 0.25), 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))))


class ModelCard(unittest.TestCase):
    def test_render_fills_every_placeholder(self):
        summary = {"parameters": 15_735_936, "parameters_without_embeddings": 12_590_208, "steps": 2000,
                   "tokens": 262_144_000, "train_time_s": 400.0, "gpu": "NVIDIA H100", "torch": "2.11",
                   "transformers": "5.17", "seed": 1234,
                   "curve": [{"step": 2000, "tokens": 1, "seq_len": 8192, "loss": 3.1, "answer_loss": 0.2,
                              "train_time_s": 400}],
                   "data": {"train": {"books": 370, "tokens": 31_785_961, "bytes": 116_000_000},
                            "val": {"books": 9, "tokens": 1_523_376, "bytes": 5_700_000}},
                   "args": {"seed": 1234, "weight_decay": 0.1, "lr": 2e-3, "warmup_steps": 150, "min_lr_frac": 0.1,
                            "grad_clip": 1.0, "batch_tokens": 131072, "curriculum": "1024:0,8192:0.75",
                            "synthetic_frac": 0.25, "answer_weight": 5.0, "chat_prob": 0.2},
                   "config": {"hidden_size": 384, "num_hidden_layers": 8, "num_attention_heads": 6,
                              "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 1024,
                              "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 500000.0},
                              "max_position_embeddings": 8192, "vocab_size": 8192}}
        res = {"perplexity": [{"context": 2048, "windows": 128, "tokens": 262016, "ppl": 30.1, "bits_per_byte": 1.3}],
               "passkey": {"trials": 20, "grid": {"1024": {"by_depth": {"0.1": 1.0, "0.5": 0.95}, "mean": 0.975,
                                                           "mean_prompt_tokens": 1010}}},
               "tasks": {"trials": 20, "accuracy": {"passkey (raw)": {"1024": 1.0}}},
               "generate_check": [{"agrees_with_scoring": True}], "transformers": "5.17", "torch": "2.11",
               "gpu": "NVIDIA H100", "skipped": [], "date": "2026-11-27"}
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "card.md")
            evaluate.render_card(evaluate.DEFAULT_TEMPLATE, out, res, summary)
            with open(out) as f:
                text = f.read()
        self.assertNotIn("{{", text)
        self.assertNotIn("pending", text)
        self.assertIn("15,735,936", text)
        self.assertIn("| 1024 (1010) | 100 % | 95 % | 98 % |", text)


if __name__ == "__main__":
    unittest.main(verbosity=2)
