"""Filler text for retrieval tasks: real prose cut at sentence boundaries into excerpts of an exact token length."""
from __future__ import annotations

import re
from typing import Optional, Sequence

# A boundary is the whitespace right after a sentence's final . ! or ?, or a blank line (paragraphs, code blocks,
# list items: the bundled Python documentation has many passages without a full stop).
_BOUNDARY = re.compile(r"(?<=[.!?])(?=\s)|(?<=\n)(?=\n)")

# The filler of the classic passkey test: plain sentences a small model does not mistake for the answer. Real text
# (the bundled Python docs) is the harder haystack: SmolLM2-135M reads "pass key" there as a Python term.
REPEATED_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def split_sentences(text: str) -> list[str]:
    """text -> pieces whose concatenation is `text`, each ending at a sentence boundary (the last one at the end).

    Every piece but the first starts with the whitespace that followed the previous sentence, so pieces tokenized
    one by one read like the original text.
    """
    cuts = [0] + [m.start() for m in _BOUNDARY.finditer(text)] + [len(text)]
    return [text[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]


class Haystack:
    """Sentences of real text, tokenized piece by piece on demand (each piece once).

    texts: the filler documents (default: the bundled evaluation text, Python's own reference documentation,
    which ships with every Python: nothing is downloaded). They are joined by blank lines and read as one stream
    that wraps around at its end.
    """

    def __init__(self, tokenizer, texts: Optional[Sequence[str]] = None):
        if texts is None:
            from aquakv.data import default_texts

            texts = default_texts("evaluation")
        self.text = "\n\n".join(t.strip() for t in texts if t and t.strip())
        if not self.text:
            raise ValueError("haystack: the filler texts are empty")
        self.tokenizer = tokenizer
        self.pieces = split_sentences(self.text)
        self._ids: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.pieces)

    def piece_ids(self, index: int) -> list[int]:
        """Token ids of piece `index` (modulo the number of pieces)."""
        index %= len(self.pieces)
        if index not in self._ids:
            self._ids[index] = list(self.tokenizer(self.pieces[index], add_special_tokens=False)["input_ids"])
        return self._ids[index]

    def excerpt(self, start: int, n_tokens: int) -> tuple[list[int], list[int]]:
        """(ids, boundaries): exactly `n_tokens` ids of consecutive pieces from piece `start` on, ending at the end
        of a sentence; the first piece is cut at its front as needed (an excerpt may start mid-sentence, as a page
        torn from a book does).

        boundaries: sorted token offsets where a needle may go without splitting a sentence: 0, the start of every
        whole piece inside, and n_tokens.
        """
        if n_tokens < 1:
            raise ValueError(f"haystack: an excerpt needs at least 1 token, got {n_tokens}")
        chunks: list[list[int]] = []
        total, index = 0, start
        while total < n_tokens:
            ids = self.piece_ids(index)
            chunks.append(ids)
            total += len(ids)
            index += 1
            if index - start > len(self.pieces) and total == 0:
                raise ValueError("haystack: the filler texts tokenize to no tokens")
        excess = total - n_tokens
        while chunks and excess >= len(chunks[0]):  # whole pieces that fall before the cut
            excess -= len(chunks.pop(0))
        chunks[0] = chunks[0][excess:]
        ids, boundaries = [], [0]
        for chunk in chunks:
            ids += chunk
            boundaries.append(len(ids))
        return ids, sorted(set(boundaries))
