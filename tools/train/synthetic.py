"""Synthetic long-context retrieval tasks, hidden in real corpus text.

Mixed into training sequences (train.py) so that the model grows retrieval heads, and used by
evaluate.py for pass-key accuracy by context length: both import the same generators, so what
is measured is exactly what was trained. Needs only numpy and tokenizers.

Tasks (RULER-style):
  passkey      "The pass key is 48213. Remember it. 48213 is the pass key." at one depth;
               question "What is the pass key?"
  kv_scatter   1-8 sentences "The value for key 3f1a-92c4 is 581204." at different depths; one asked
  kv_block     one block of 4-32 lines "3f1a-92c4: 581204" at one depth; one key asked
  multi_value  2-4 "One of the special magic numbers for river is: 4182." (plus distractors for
               other words); all values of one word asked, in order of appearance
  var_track    chains "VAR QWERT = 48213." ... "VAR ASDFG = VAR QWERT." (plus distractor
               chains); the value of the last variable of one chain asked

Two prompt formats:
  raw   BOS haystack-with-needles "\\n\\n" question " " lead  ->  " " value tail EOS
        e.g. "... What is the pass key? The pass key is" -> " 48213." <|end_of_text|>
  chat  BOS "<|user|>\\n" haystack "\\n\\n" question "<|eot|><|assistant|>\\n"
        ->  lead " " value tail <|eot|>           (the tokenizer's chat template)

A Sample holds prompt ids and completion ids separately; greedy decoding "gets it right" when it
reproduces the first `score_len` completion tokens (the value in raw format, lead + value in
chat format). Everything is deterministic in the seed (random.Random) and the haystack tokens.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import string
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer

TASKS = ("passkey", "kv_scatter", "kv_block", "multi_value", "var_track")
# Training mix: pass keys and scattered keys are the core skill; the others add variety.
TRAIN_TASK_WEIGHTS = {"passkey": 0.3, "kv_scatter": 0.2, "kv_block": 0.15, "multi_value": 0.15,
                      "var_track": 0.2}

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
EOT = "<|eot|>"

_WORDS = ("river", "lantern", "orchard", "falcon", "harbor", "meadow", "copper", "violet", "summit",
          "thistle", "anchor", "ember", "glacier", "saffron", "willow", "quarry", "marble", "beacon",
          "cedar", "dune", "fjord", "garnet", "hollow", "island", "juniper", "kestrel", "lagoon",
          "mantle", "nectar", "oasis", "pebble", "quill", "raven", "sparrow", "timber", "umber",
          "valley", "walnut", "yonder", "zephyr", "bramble", "cobalt", "dapple", "fennel", "grotto")


@dataclass
class Spec:
    """A task before its haystack: needles to hide (in order) and what is asked."""
    task: str
    needles: list[str]   # texts to insert, in order of appearance
    depths: list[float]  # [len(needles)] relative positions in the haystack, ascending
    question: str        # "What is the pass key?"
    lead: str            # "The pass key is"
    value: str           # "48213"
    tail: str = "."


@dataclass
class Sample:
    task: str
    prompt_ids: list[int]      # starts with BOS
    completion_ids: list[int]  # value (+ tail) + end token; the answer region of the loss
    score_len: int             # greedy is right iff it reproduces completion_ids[:score_len]
    value: str                 # the answer text, e.g. "48213"
    depths: list[float] = field(default_factory=list)
    chat: bool = False

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


class Haystack:
    """Spans of real text, decoded from a token array (the train or the validation split)."""

    def __init__(self, tokens: np.ndarray, tokenizer: Tokenizer):
        self.tokens = tokens      # [n] uint16 token ids, books separated by EOS
        self.tokenizer = tokenizer

    def offset(self, rng: random.Random, n_tokens: int) -> int:
        return rng.randrange(0, max(1, len(self.tokens) - n_tokens))

    def text(self, offset: int, n_tokens: int) -> str:
        span = self.tokens[offset:offset + max(0, n_tokens)].tolist()
        # A span starts and ends mid-sentence; that is fine for a haystack.
        return self.tokenizer.decode(span, skip_special_tokens=True)


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def _key(rng: random.Random) -> str:
    return f"{rng.getrandbits(16):04x}-{rng.getrandbits(16):04x}"


def _var(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def _depths(rng: random.Random, n: int) -> list[float]:
    return sorted(rng.uniform(0.02, 0.98) for _ in range(n))


def _distinct(rng: random.Random, make, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        x = make(rng)
        if x not in out:
            out.append(x)
    return out


def gen_passkey(rng: random.Random, target_len: int, depth: float | None = None,
                digits: int | None = None) -> Spec:
    k = _number(rng, digits or rng.choice((4, 5, 5, 5, 6)))
    d = rng.uniform(0.02, 0.98) if depth is None else depth
    return Spec("passkey", [f"The pass key is {k}. Remember it. {k} is the pass key."], [d],
                "What is the pass key?", "The pass key is", k)


def gen_kv_scatter(rng: random.Random, target_len: int) -> Spec:
    n = rng.randint(1, max(1, min(8, target_len // 128)))
    keys = _distinct(rng, _key, n)
    vals = [_number(rng, 6) for _ in range(n)]
    ask = rng.randrange(n)
    needles = [f"The value for key {k} is {v}." for k, v in zip(keys, vals)]
    return Spec("kv_scatter", needles, _depths(rng, n), f"What is the value for key {keys[ask]}?",
                f"The value for key {keys[ask]} is", vals[ask])


def gen_kv_block(rng: random.Random, target_len: int) -> Spec:
    # A line "3f1a-92c4: 581204" is about 12 tokens; keep the block to a quarter of the context.
    n = rng.randint(4, max(4, min(32, target_len // 48)))
    keys = _distinct(rng, _key, n)
    vals = [_number(rng, 6) for _ in range(n)]
    ask = rng.randrange(n)
    block = ("Here is a list of keys and values:\n"
             + "\n".join(f"{k}: {v}" for k, v in zip(keys, vals)) + "\nEnd of the list.")
    return Spec("kv_block", [block], _depths(rng, 1),
                f"In the list of keys and values, what is the value for key {keys[ask]}?",
                f"The value for key {keys[ask]} is", vals[ask])


def gen_multi_value(rng: random.Random, target_len: int) -> Spec:
    word, other = rng.sample(_WORDS, 2)
    m = rng.randint(2, 4)
    n_other = rng.randint(0, 2)
    owners = [word] * m + [other] * n_other
    rng.shuffle(owners)
    vals = [_number(rng, rng.choice((4, 5))) for _ in owners]
    needles = [f"One of the special magic numbers for {w} is: {v}." for w, v in zip(owners, vals)]
    asked = [v for w, v in zip(owners, vals) if w == word]
    return Spec("multi_value", needles, _depths(rng, len(needles)),
                f"What are all the special magic numbers for {word}?",
                f"The special magic numbers for {word} are", ", ".join(asked))


def gen_var_track(rng: random.Random, target_len: int) -> Spec:
    hops = rng.randint(2, 4) if target_len >= 512 else 2
    n_chains = 1 + rng.randint(0, 2)
    names = _distinct(rng, _var, hops * n_chains)
    values = _distinct(rng, lambda r: _number(r, 5), n_chains)
    chains = []  # [n_chains][hops] statements; chain 0 is asked
    for c in range(n_chains):
        vs = names[c * hops:(c + 1) * hops]
        chains.append([f"VAR {vs[0]} = {values[c]}."]
                      + [f"VAR {vs[i]} = VAR {vs[i - 1]}." for i in range(1, hops)])
    # Interleave the chains, keeping each chain's own order (an assignment follows its source).
    order = [c for c in range(n_chains) for _ in range(hops)]
    rng.shuffle(order)
    pos = [0] * n_chains
    needles = []
    for c in order:
        needles.append(chains[c][pos[c]])
        pos[c] += 1
    last = names[hops - 1]
    return Spec("var_track", needles, _depths(rng, len(needles)), f"What is the value of VAR {last}?",
                f"The value of VAR {last} is", values[0])


GENERATORS = {"passkey": gen_passkey, "kv_scatter": gen_kv_scatter, "kv_block": gen_kv_block,
              "multi_value": gen_multi_value, "var_track": gen_var_track}


def insert_needles(hay: str, needles: list[str], depths: list[float]) -> str:
    """hay with each needle placed after the first sentence or line end at or past its depth,
    so that needles sit between sentences; order of needles is kept."""
    cuts = []
    for d in depths:
        pos = int(d * len(hay))
        best, sep = len(hay), "\n"
        nl = hay.find("\n", pos)
        if nl >= 0:
            best = nl + 1
        for punct in (". ", "? ", "! "):
            p = hay.find(punct, pos, best)
            if p >= 0 and p + 2 <= best:
                best, sep = p + 2, " "
        if best == len(hay):
            sep = "\n"
        cuts.append((best, sep))
    out, prev = [], 0
    for (cut, sep), needle in zip(cuts, needles):
        out.append(hay[prev:cut])
        if cut == len(hay) and not hay.endswith("\n"):
            out.append("\n")
        out.append(needle + sep)
        prev = cut
    out.append(hay[prev:])
    return "".join(out)


def _texts(spec: Spec, hay: str, chat: bool) -> tuple[str, str, str]:
    """(prompt text without BOS, scored completion text, completion tail text)."""
    body = insert_needles(hay, spec.needles, spec.depths).rstrip() + "\n\n" + spec.question
    if chat:
        return (f"<|user|>\n{body}{EOT}<|assistant|>\n", f"{spec.lead} {spec.value}", spec.tail)
    return body + " " + spec.lead, " " + spec.value, spec.tail


def build(spec: Spec, haystack: Haystack, rng: random.Random, target_len: int,
          chat: bool = False) -> Sample:
    """The sample of `spec` with a haystack filling it to at most target_len tokens (prompt plus
    completion); a few tokens less when retokenisation of the haystack comes out shorter."""
    tok = haystack.tokenizer
    end_id = tok.token_to_id(EOT if chat else EOS)
    prompt0, scored, tail = _texts(spec, "", chat)
    scored_ids = tok.encode(scored, add_special_tokens=False).ids
    completion = tok.encode(scored + tail, add_special_tokens=False).ids + [end_id]
    # The value never merges with the tail (the split regex separates digits and punctuation),
    # so the scored part is a prefix of the completion.
    assert completion[:len(scored_ids)] == scored_ids, (scored, tail)
    fixed = len(tok.encode(prompt0, add_special_tokens=True).ids) + len(completion)
    # Retokenising a decoded span and the joins at the needles can add a few tokens.
    slack = 4 + 2 * len(spec.needles) + target_len // 128
    n_hay = target_len - fixed - slack
    if n_hay < 16:
        raise ValueError(f"{spec.task}: target_len {target_len} too short for its needles ({fixed} tokens)")
    offset = haystack.offset(rng, n_hay)
    for _ in range(6):
        prompt, _, _ = _texts(spec, haystack.text(offset, n_hay), chat)
        prompt_ids = tok.encode(prompt, add_special_tokens=True).ids
        excess = len(prompt_ids) + len(completion) - target_len
        if excess <= 0:
            return Sample(spec.task, prompt_ids, completion, len(scored_ids), spec.value,
                          list(spec.depths), chat)
        n_hay -= excess + 8
    raise RuntimeError(f"{spec.task}: could not fit target_len {target_len}")


def make_sample(task: str, seed: int, haystack: Haystack, target_len: int, chat: bool = False,
                **kwargs) -> Sample:
    """One sample of `task`, a function of (task, seed, haystack tokens, target_len, chat) alone.
    kwargs go to the generator (passkey: depth, digits)."""
    rng = random.Random(f"{task}/{seed}/{target_len}/{int(chat)}")
    spec = GENERATORS[task](rng, target_len, **kwargs)
    return build(spec, haystack, rng, target_len, chat)


def make_training_sample(seed: int, haystack: Haystack, target_len: int,
                         chat_prob: float = 0.2) -> Sample:
    """A sample of a task drawn from TRAIN_TASK_WEIGHTS, in chat format with chat_prob."""
    rng = random.Random(seed)
    task = rng.choices(list(TRAIN_TASK_WEIGHTS), weights=list(TRAIN_TASK_WEIGHTS.values()))[0]
    chat = rng.random() < chat_prob
    return make_sample(task, rng.getrandbits(62), haystack, target_len, chat)


_POOL: dict = {}


def _pool_init(tokens_path: str, tokenizer_path: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _POOL["hay"] = Haystack(np.memmap(tokens_path, dtype=np.uint16, mode="r"), Tokenizer.from_file(tokenizer_path))


def _pool_make(job: tuple) -> Sample:
    task, seed, target_len, chat, kwargs = job
    return make_sample(task, seed, _POOL["hay"], target_len, chat, **kwargs)


def make_samples(jobs: list[tuple], tokens_path: str, tokenizer_path: str, workers: int) -> list[Sample]:
    """make_sample for each job (task, seed, target_len, chat, kwargs), in order, with the
    haystack read from tokens_path; in `workers` forked processes (call it before CUDA is
    initialised)."""
    if workers <= 1:
        _pool_init(tokens_path, tokenizer_path)
        return [_pool_make(j) for j in jobs]
    with multiprocessing.get_context("fork").Pool(workers, _pool_init, (tokens_path, tokenizer_path)) as pool:
        return pool.map(_pool_make, jobs, chunksize=4)


def _main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description="Print synthetic samples (for eyeballing).")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json")
    ap.add_argument("--tokens", required=True, help="uint16 token file (val.bin) for haystacks")
    ap.add_argument("--len", type=int, default=512)
    ap.add_argument("--chat", action="store_true")
    args = ap.parse_args()
    tok = Tokenizer.from_file(args.tokenizer)
    hay = Haystack(np.fromfile(args.tokens, dtype=np.uint16), tok)
    for task in TASKS:
        s = make_sample(task, 1, hay, args.len, args.chat)
        print(f"=== {task}: {len(s)} tokens, value {s.value!r}, depths {s.depths}")
        print(tok.decode(s.prompt_ids, skip_special_tokens=False)[-700:])
        print("--- completion:", repr(tok.decode(s.completion_ids, skip_special_tokens=False)))


if __name__ == "__main__":
    _main()
