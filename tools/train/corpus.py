"""Reading the Gutenberg training corpus and its fixed train/validation split.

Shared by train_tokenizer.py and prepare_data.py so that both see exactly the same split: the
validation text is the tail (about `val_fraction` of the characters, whole books only) of the
last corpus file in name order; nothing of it is ever used for training the tokenizer or model.
"""

from __future__ import annotations

import lzma
import os
import re
from concurrent.futures import ThreadPoolExecutor

# Books are separated by two or more blank lines; paragraphs by exactly one.
_BOOK_SEPARATOR = re.compile(r"\n{3,}")
VAL_FRACTION = 0.1


def read_text(path: str, max_chars: int | None = None) -> str:
    """Text of a .xz (or plain) UTF-8 file; only its first max_chars characters when given."""
    opener = lzma.open if path.endswith(".xz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read(max_chars) if max_chars else f.read()


def split_books(text: str) -> list[str]:
    """Books of one corpus file, without the blank lines between them."""
    return [b.strip("\n") for b in _BOOK_SEPARATOR.split(text) if b.strip()]


def load_splits(paths: list[str], val_fraction: float = VAL_FRACTION,
                max_chars: int | None = None) -> tuple[list[str], list[str]]:
    """(train books, validation books). The validation books are the last books of the last file
    (by base name) holding about val_fraction of its characters; the book that crosses the cut
    stays in training, so no book is split between the two."""
    paths = sorted(paths, key=os.path.basename)
    if not paths:
        raise ValueError("no corpus files given")
    # lzma releases the GIL, so the files decompress in parallel.
    with ThreadPoolExecutor(max_workers=len(paths)) as pool:
        texts = list(pool.map(lambda p: read_text(p, max_chars), paths))
    train: list[str] = []
    for text in texts[:-1]:
        train.extend(split_books(text))
    last = split_books(texts[-1])
    total = sum(len(b) for b in last)
    cut, seen = len(last), 0
    for i, book in enumerate(last):
        seen += len(book)
        if seen >= (1.0 - val_fraction) * total:
            cut = i + 1
            break
    train.extend(last[:cut])
    val = last[cut:]
    if not val:
        # Only for short test slices (max_chars) that hold one book or two: cut the last book
        # at a paragraph break instead.
        book = train.pop()
        brk = book.find("\n\n", int((1.0 - val_fraction) * len(book)))
        if brk < 0:
            raise ValueError(f"{paths[-1]}: too little text to hold out a validation split")
        train.append(book[:brk])
        val = [book[brk + 2:]]
    return train, val


def paragraph_chunks(book: str, max_chars: int = 1 << 17) -> list[str]:
    """The book cut at paragraph breaks into pieces of at most about max_chars characters, so that
    batch tokenisation has many similar-sized items to spread over the cores. The pieces
    concatenate back to the book exactly."""
    if len(book) <= max_chars:
        return [book]
    pieces, start = [], 0
    while start < len(book):
        end = start + max_chars
        if end >= len(book):
            pieces.append(book[start:])
            break
        brk = book.rfind("\n\n", start + max_chars // 2, end)
        end = brk + 2 if brk >= 0 else end
        pieces.append(book[start:end])
        start = end
    return pieces
