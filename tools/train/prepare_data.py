#!/usr/bin/env python3
"""Tokenises the corpus into flat uint16 token files for training and validation.

    python3 tools/train/prepare_data.py --tokenizer models/adakv-tiny-v1 --out DIR \
        .carry/corpus/gutenberg-train-00.txt.xz .carry/corpus/gutenberg-train-01.txt.xz

Writes DIR/train.bin and DIR/val.bin ([n] uint16: each book's tokens followed by
<|end_of_text|>, no BOS; the training code puts BOS at the start of each sequence) and
DIR/meta.json. The split is corpus.load_splits: the validation books are never in train.bin.
Books are cut at paragraph breaks into pieces, and groups of pieces are encoded in a process pool
(one process a core).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from tokenizers import Tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import corpus  # noqa: E402

EOS = "<|end_of_text|>"


_worker_tok: Tokenizer | None = None


def _worker_init(tok_path: str) -> None:
    global _worker_tok
    _worker_tok = Tokenizer.from_file(tok_path)


def _encode_task(task: tuple[list[str], list[bool]]) -> np.ndarray:
    """[n] uint16 tokens of the pieces, with EOS after each piece that ends a book."""
    pieces, ends_book = task
    eos = _worker_tok.token_to_id(EOS)
    out = []
    for enc, end in zip(_worker_tok.encode_batch_fast(pieces, add_special_tokens=False), ends_book):
        out.append(np.asarray(enc.ids, dtype=np.uint16))
        if end:
            out.append(np.array([eos], dtype=np.uint16))
    return np.concatenate(out)


def encode_books(tok_path: str, books: list[str], name: str, workers: int,
                 task_chars: int = 1 << 21) -> np.ndarray:
    """[n] uint16: the books' tokens, each book followed by EOS. Tasks of about task_chars
    characters go to a process pool (one single-threaded tokenizer per process: this does not
    depend on the tokenizers library's own thread pool being enabled)."""
    tasks, cur, cur_end, cur_chars = [], [], [], 0
    for book in books:
        pieces = corpus.paragraph_chunks(book)
        for i, p in enumerate(pieces):
            cur.append(p)
            cur_end.append(i + 1 == len(pieces))
            cur_chars += len(p)
            if cur_chars >= task_chars:
                tasks.append((cur, cur_end))
                cur, cur_end, cur_chars = [], [], 0
    if cur:
        tasks.append((cur, cur_end))
    total_chars = sum(len(p) for t in tasks for p in t[0])
    out: list[np.ndarray] = []
    t0, last_print, done_chars = time.time(), 0.0, 0
    with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init, initargs=(tok_path,)) as pool:
        for task, ids in zip(tasks, pool.map(_encode_task, tasks)):
            out.append(ids)
            done_chars += sum(len(p) for p in task[0])
            now = time.time()
            if now - last_print > 5 or done_chars == total_chars:
                last_print = now
                print(f"  {name}: {done_chars / 1e6:.1f}/{total_chars / 1e6:.1f} M chars, {now - t0:.1f} s, "
                      f"{done_chars / 1e6 / max(now - t0, 1e-9):.1f} M chars/s", flush=True)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.uint16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", nargs="+", help="corpus .txt.xz files")
    ap.add_argument("--tokenizer", required=True, help="folder holding tokenizer.json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--max-chars", type=int, default=None, help="read only this many characters a file (smoke tests)")
    args = ap.parse_args()

    # Each worker process runs one tokenizer thread; no nested thread pools.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    t0 = time.time()
    tok_path = os.path.join(args.tokenizer, "tokenizer.json")
    tok = Tokenizer.from_file(tok_path)
    assert tok.get_vocab_size() <= 65536, "token ids must fit uint16"
    train_books, val_books = corpus.load_splits(args.corpus, max_chars=args.max_chars)
    t1 = time.time()
    print(f"read {len(args.corpus)} files: {len(train_books)} train books, {len(val_books)} val books, "
          f"{t1 - t0:.1f} s", flush=True)

    os.makedirs(args.out, exist_ok=True)
    stats = {}
    for name, books in (("val", val_books), ("train", train_books)):
        ids = encode_books(tok_path, books, name, args.workers)
        ids.tofile(os.path.join(args.out, f"{name}.bin"))
        n_bytes = sum(len(b.encode("utf-8")) for b in books)
        stats[name] = {"books": len(books), "tokens": int(len(ids)), "bytes": n_bytes}
        print(f"{name}: {len(books)} books, {len(ids):,} tokens, {n_bytes / max(len(ids), 1):.2f} bytes/token",
              flush=True)
    with open(tok_path, "rb") as f:
        tok_sha = hashlib.sha256(f.read()).hexdigest()
    meta = {"vocab_size": tok.get_vocab_size(), "bos_id": tok.token_to_id("<|begin_of_text|>"),
            "eos_id": tok.token_to_id(EOS), "dtype": "uint16", "tokenizer_sha256": tok_sha,
            "corpus": [os.path.basename(p) for p in sorted(args.corpus, key=os.path.basename)],
            "max_chars": args.max_chars, "val_fraction": corpus.VAL_FRACTION, **stats}
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(f"prepare_data: done in {time.time() - t0:.1f} s -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
