"""Calibration and evaluation text: a default that ships with every Python, and file readers."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def default_texts(split: str) -> list[str]:
    """Python's own reference documentation (`pydoc_data.topics`, ~465k characters), split by topic.

    split: "calibration" (three topics in four) or "evaluation" (the fourth): disjoint by construction.
    """
    from pydoc_data.topics import topics

    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    keys = sorted(topics)
    held_out = split == "evaluation"
    return [topics[k] for i, k in enumerate(keys) if (i % 4 == 3) == held_out]


# Above this share of undecodable characters a file is not text in any useful sense (a few stray bytes in a real
# text file are replaced by U+FFFD and kept, as before).
MAX_INVALID_UTF8 = 0.05


def read_text_files(paths: Sequence[str | Path]) -> list[str]:
    """Read UTF-8 text files. A missing file, a directory, an empty file or a binary one (NUL bytes, or more than
    5% of it not UTF-8) raises with its name; isolated invalid bytes become U+FFFD."""
    texts = []
    for p in map(Path, paths):
        if p.is_dir():
            raise IsADirectoryError(f"text file {p} is a directory, not a file")
        if not p.is_file():
            raise FileNotFoundError(f"text file not found: {p}")
        data = p.read_bytes()
        if b"\0" in data:
            raise ValueError(f"text file {p} is binary (it holds NUL bytes), not UTF-8 text")
        text = data.decode("utf-8", errors="replace")
        if not text.strip():
            raise ValueError(f"text file is empty: {p}")
        bad = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
        if bad > MAX_INVALID_UTF8 * len(text):
            raise ValueError(f"text file {p} is not UTF-8 text ({bad} of {len(text)} characters undecodable)")
        texts.append(text)
    return texts


def tokenize(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Concatenate texts (separated by EOS when the tokenizer has one) into one 1-D LongTensor of ids."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + eos
    return torch.tensor(ids, dtype=torch.long)
