"""Training data and schedules of train.py, without torch (so they can be tested anywhere).

A training row is seq_len + 1 tokens (inputs and shifted targets): either [BOS] + a random crop
of the training stream, or a synthetic retrieval sample (synthetic.py; it starts with BOS)
followed by stream text. Loss weights are 1, and answer_weight on the targets that are a
sample's completion tokens.
"""

from __future__ import annotations

import math
import multiprocessing
import os

import numpy as np
from tokenizers import Tokenizer

import synthetic

BOS = "<|begin_of_text|>"


def parse_curriculum(text: str) -> list[tuple[int, float]]:
    out = []
    for part in text.split(","):
        length, start = part.split(":")
        out.append((int(length), float(start)))
    out.sort(key=lambda x: x[1])
    assert out[0][1] == 0.0, "the curriculum must start at progress 0"
    return out


def seq_len_at(curriculum: list[tuple[int, float]], progress: float) -> int:
    length = curriculum[0][0]
    for n, start in curriculum:
        if progress >= start:
            length = n
    return length


def lr_at(args, step: int, progress: float) -> float:
    warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
    p = min(max(progress, 0.0), 1.0)
    cos = args.min_lr_frac + (1.0 - args.min_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * p))
    return args.lr * warm * cos


class Batcher:
    """Builds the rows of one optimizer step: [BOS] + a random crop of the training stream, or a
    synthetic retrieval sample followed by stream text. Rows are seq_len + 1 tokens (inputs and
    shifted targets). Deterministic in (seed, step, seq_len)."""

    def __init__(self, train_tokens: np.ndarray, tokenizer: Tokenizer, args):
        self.tokens = train_tokens  # [n] uint16
        self.haystack = synthetic.Haystack(train_tokens, tokenizer)
        self.bos = tokenizer.token_to_id(BOS)
        self.args = args

    def step_batch(self, step: int, seq_len: int, n_rows: int):
        """tokens [n_rows, seq_len + 1] int64, weights [n_rows, seq_len] float32, synthetic rows."""
        a = self.args
        rng = np.random.default_rng([a.seed, step, seq_len])
        rows = np.empty((n_rows, seq_len + 1), dtype=np.int64)
        weights = np.ones((n_rows, seq_len), dtype=np.float32)
        n = len(self.tokens)
        offsets = rng.integers(0, n - seq_len - 1, size=n_rows)
        synth = rng.random(n_rows) < a.synthetic_frac
        lo = min(256, seq_len)
        for r in range(n_rows):
            if not synth[r]:
                rows[r, 0] = self.bos
                rows[r, 1:] = self.tokens[offsets[r]:offsets[r] + seq_len]
                continue
            target = int(rng.integers(lo, seq_len + 2))  # sample length, <= row length
            sample = synthetic.make_training_sample(int(rng.integers(0, 2**62)), self.haystack, target,
                                                    a.chat_prob)
            ids = sample.ids
            k = len(ids)
            rows[r, :k] = ids
            rows[r, k:] = self.tokens[offsets[r]:offsets[r] + seq_len + 1 - k]
            # Targets t predict rows[t + 1]: the completion tokens sit at [k - len(c), k).
            c = len(sample.completion_ids)
            weights[r, k - c - 1:k - 1] = a.answer_weight
        return rows, weights, int(synth.sum())


# Worker processes: step_batch costs ~0.1-0.2 s of CPU a step (tokenising synthetic samples),
# about what the GPU spends on the step, so it runs in a pool, several steps ahead.
_WORKER: dict = {}


def _worker_init(tokens_path: str, tokenizer_path: str, args) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["batcher"] = Batcher(np.memmap(tokens_path, dtype=np.uint16, mode="r"),
                                 Tokenizer.from_file(tokenizer_path), args)


def _worker_batch(step: int, seq_len: int, n_rows: int):
    return _WORKER["batcher"].step_batch(step, seq_len, n_rows)


class Prefetcher:
    """Batcher.step_batch in `workers` forked processes, `depth` steps ahead of the one asked
    for. Batches are the same as Batcher's (they depend on step and shape only); a batch made
    ahead for another shape (the curriculum moved on) is dropped. Create it before CUDA is
    initialised: the workers are forked at once."""

    def __init__(self, tokens_path: str, tokenizer_path: str, args, workers: int, depth: int | None = None):
        ctx = multiprocessing.get_context("fork")
        self.pool = ctx.Pool(workers, initializer=_worker_init, initargs=(tokens_path, tokenizer_path, args))
        self.depth = depth or 2 * workers
        self.pending: dict = {}  # step -> ((seq_len, n_rows), AsyncResult)

    def __call__(self, step: int, seq_len: int, n_rows: int):
        for s in range(step, step + self.depth):
            p = self.pending.get(s)
            if p is None or p[0] != (seq_len, n_rows):
                self.pending[s] = ((seq_len, n_rows), self.pool.apply_async(_worker_batch, (s, seq_len, n_rows)))
        for s in [s for s in self.pending if s < step]:
            del self.pending[s]
        return self.pending.pop(step)[1].get()

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()
