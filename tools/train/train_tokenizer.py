#!/usr/bin/env python3
"""Trains the byte-level BPE tokenizer of the adakv test model and saves it as a Hugging Face
tokenizer folder (tokenizer.json, tokenizer_config.json with a chat template).

The tokenizer is Llama-3 shaped: the Llama-3 split regex, byte-level pre-tokenisation without a
prefix space, ignore_merges, a ByteLevel decoder and a post-processor that adds
<|begin_of_text|>. Trained on the corpus training split only (see corpus.py).

    python3 tools/train/train_tokenizer.py --out models/adakv-tiny-v1 \
        /work/shared/corpus/gutenberg-train-00.txt.xz /work/shared/corpus/gutenberg-train-01.txt.xz
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import corpus  # noqa: E402

# The pre-tokenisation regex of Llama 3 (tokenizer.json of Meta-Llama-3-8B).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
EOT = "<|eot|>"
# Ids follow list order: 0 = BOS, 1 = EOS, ..., 5 = <|eot|>.
SPECIAL_TOKENS = [BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>", EOT] + [
    f"<|reserved_{i}|>" for i in range(10)]

# One line, so no whitespace control is needed; uses only what Llama-3/Qwen templates use.
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                 "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|eot|>' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")

VOCAB_SIZE = 8192
MODEL_MAX_LENGTH = 8192


def build_untrained() -> Tokenizer:
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def finish(tok: Tokenizer) -> Tokenizer:
    """Sets what training may have dropped (ignore_merges) and the BOS post-processor."""
    spec = json.loads(tok.to_str())
    spec["model"]["ignore_merges"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                                      special_tokens=[(BOS, bos_id)]),
    ])
    return tok


def tokenizer_config() -> dict:
    added = {}
    for i, t in enumerate(SPECIAL_TOKENS):
        added[str(i)] = {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
    return {
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "model_input_names": ["input_ids", "attention_mask"],
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }


def check_folder(out: str, sample_texts: list[str]) -> None:
    """Loads the folder with transformers and checks round trips, BOS and the chat template."""
    from transformers import AutoTokenizer

    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(out)
    assert hf.bos_token_id == 0 and hf.eos_token_id == 1, (hf.bos_token_id, hf.eos_token_id)
    assert hf.convert_tokens_to_ids(EOT) == 5
    assert len(hf) == VOCAB_SIZE, len(hf)
    for text in sample_texts:
        ids = hf(text)["input_ids"]
        assert ids[0] == 0 and ids[1:] == tok.encode(text, add_special_tokens=False).ids
        assert hf.decode(ids, skip_special_tokens=True) == text, "round trip failed"
        assert hf.decode(ids) == BOS + text
    messages = [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello."}]
    rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want = f"{BOS}<|user|>\nHi there.{EOT}<|assistant|>\nHello.{EOT}<|assistant|>\n"
    assert rendered == want, repr(rendered)
    ids = tok.encode(rendered, add_special_tokens=False).ids
    assert ids[:2] == [0, 3] and ids[-2:] == [4, tok.token_to_id("\u010a")], ids
    print(f"check: AutoTokenizer loads {out}; {len(sample_texts)} round trips, BOS, chat template ok")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", nargs="+", help="corpus files (.txt.xz); the last by name holds the validation tail")
    ap.add_argument("--out", required=True, help="output folder (Hugging Face tokenizer files)")
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    ap.add_argument("--max-chars", type=int, default=None, help="read only this many characters a file (tests)")
    args = ap.parse_args()

    t0 = time.time()
    train_books, val_books = corpus.load_splits(args.corpus, max_chars=args.max_chars)
    print(f"corpus: {len(train_books)} training books ({sum(map(len, train_books)) / 1e6:.1f} M chars), "
          f"{len(val_books)} validation books held out ({sum(map(len, val_books)) / 1e6:.1f} M chars); "
          f"{time.time() - t0:.1f} s")

    def pieces():
        for book in train_books:
            yield from corpus.paragraph_chunks(book, 1 << 15)

    tok = build_untrained()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t1 = time.time()
    tok.train_from_iterator(pieces(), trainer=trainer)
    tok = finish(tok)
    assert tok.get_vocab_size() == args.vocab_size, tok.get_vocab_size()
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    print(f"trained: vocab {tok.get_vocab_size()}, {time.time() - t1:.1f} s")

    os.makedirs(args.out, exist_ok=True)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    with open(os.path.join(args.out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(), f, indent=2, ensure_ascii=False)
        f.write("\n")

    # Bytes per token on held-out text: the number the model card quotes.
    sample = "\n\n".join(val_books)[:2_000_000]
    n_tok = len(tok.encode(sample, add_special_tokens=False).ids)
    print(f"validation text: {len(sample.encode('utf-8')) / n_tok:.2f} bytes/token")
    check_folder(args.out, [val_books[0][:3000], "The pass key is 48213. Remember it.",
                            "naïve café — “quoted” 1234567 tabs\tand\n\nnewlines  ", "日本語のテキスト 🙂"])


if __name__ == "__main__":
    main()
