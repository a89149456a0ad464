#!/usr/bin/env python3
"""Writes data/haystack/validation.txt: haystack text for adakv's evaluation suite (src/eval/).

The text comes only from the validation books that tools/train held out from the tokenizer and the
test model (tools/train/corpus.load_splits: the last books, about 10 % of the characters, of the
last corpus file), so a needle task never hides its needle in text the model was trained on.

How it is cut: every validation book contributes its beginning, up to the same character cap,
ended at the last paragraph break ("\\n\\n") before the cap (a book shorter than the cap comes
whole); the cap is the largest one that keeps the file at or under --chars characters. Books keep
their order and are separated by three newlines, as in the corpus. Deterministic: the same corpus
gives the same bytes.

    python3 tools/make_haystack.py ../shared/corpus/gutenberg-train-0*.txt.xz \\
        --out data/haystack/validation.txt
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train"))
import corpus  # noqa: E402

BOOK_SEPARATOR = "\n\n\n"


def book_prefix(book: str, cap: int) -> str:
    """The book up to cap characters, ended at its last paragraph break before the cap."""
    if len(book) <= cap:
        return book
    brk = book.rfind("\n\n", 0, cap)
    return book[:brk] if brk > 0 else book[:cap]


def assemble(books: list[str], cap: int) -> str:
    return BOOK_SEPARATOR.join(book_prefix(b, cap) for b in books) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", nargs="+", help="the corpus .txt.xz files, all of them (the split needs every file)")
    ap.add_argument("--out", default="data/haystack/validation.txt")
    ap.add_argument("--chars", type=int, default=1_500_000, help="size of the file in characters, at most")
    args = ap.parse_args()

    _, val_books = corpus.load_splits(args.corpus)
    # Largest cap whose text fits: the length is monotone in the cap, so bisect.
    lo, hi = 1, max(len(b) for b in val_books)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(assemble(val_books, mid)) <= args.chars:
            lo = mid
        else:
            hi = mid - 1
    text = assemble(val_books, lo)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    data = text.encode("utf-8")
    with open(args.out, "wb") as f:
        f.write(data)
    print(f"{args.out}: {len(val_books)} validation books, cap {lo} characters a book, "
          f"{len(text)} characters, {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    for b in val_books:
        first = next((line.strip() for line in b.split("\n")[:40] if line.strip().isupper() and len(line.strip()) > 3), "?")
        print(f"  {len(book_prefix(b, lo)):>8} of {len(b):>8} characters  {first}")


if __name__ == "__main__":
    main()
