"""The passkey task (a needle in a haystack): a five-digit key hidden in real text at a chosen depth, then asked for.

A prompt of exactly `length` tokens reads, in the model's chat template when the tokenizer has one:

    user:       INSTRUCTION  <haystack excerpt with the needle at a sentence boundary>  QUESTION
    assistant:  ANSWER_PREFIX

and without a template the same text as a plain prompt (after the BOS token when the tokenizer has one). The
needle is "The pass key is 48213. Remember it."; the answer is scored by `answer_matches`. Everything is built
from token ids of separately tokenized pieces, which is what makes the length exact. Samples are deterministic
in (seed, sample): sample i uses the same key and the same haystack passage at every length and depth, so a
cell differs from its neighbours only in what the grid varies.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from aquakv.longctx.haystack import Haystack

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
INSTRUCTION = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the pass key.")
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"
NEEDLE = "The pass key is {key}. Remember it."
_MARK = "\x00HAYSTACK\x00"


@dataclass(frozen=True)
class NeedleTask:
    """One prompt. input_ids: [length] LongTensor; key: the digits to retrieve.

    needle_start, needle_tokens: where the needle's ids lie in input_ids. haystack_start, haystack_tokens: where
    the filler lies (the needle excluded). depth: the requested fraction; `placed_depth` is where it went.
    """

    input_ids: torch.Tensor
    key: str
    length: int
    depth: float
    sample: int
    needle_start: int
    needle_tokens: int
    haystack_start: int
    haystack_tokens: int

    @property
    def placed_depth(self) -> float:
        """Filler tokens before the needle over all filler tokens (0: first, 1: last before the question)."""
        return (self.needle_start - self.haystack_start) / self.haystack_tokens


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_frame(tokenizer, chat: Optional[bool] = None) -> tuple[list[int], list[int]]:
    """(ids before the haystack, ids after it): instruction and question, in the chat template or plain.

    chat: None uses the template when the tokenizer has one; True requires one; False never uses it.
    """
    if chat is None:
        chat = has_chat_template(tokenizer)
    if chat:
        if not has_chat_template(tokenizer):
            raise ValueError("needle task: chat=True but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], add_generation_prompt=True,
                                             tokenize=False)
        if text.count(_MARK) != 1:
            raise ValueError("needle task: the chat template does not show the user message verbatim")
        before, after = text.split(_MARK)
        return (_encode(tokenizer, f"{before}{INSTRUCTION}\n\n"),
                _encode(tokenizer, f"\n\n{QUESTION}{after}{ANSWER_PREFIX}"))
    bos = getattr(tokenizer, "bos_token_id", None)
    return (([bos] if bos is not None else []) + _encode(tokenizer, f"{INSTRUCTION}\n\n"),
            _encode(tokenizer, f"\n\n{QUESTION} {ANSWER_PREFIX}"))


def draw_sample(haystack: Haystack, seed: int, sample: int) -> tuple[str, int]:
    """(key, first haystack piece) of sample `sample`: the same for every length and depth, different per sample.

    The key is five digits that appear nowhere in the filler text (so exactly one place holds the answer).
    """
    rng = random.Random(f"aquakv-needle:{seed}:{sample}")  # string seeds are hashed portably (sha512)
    for _ in range(1000):
        key = str(rng.randrange(10_000, 100_000))
        if key not in haystack.text:
            return key, rng.randrange(len(haystack))
    raise ValueError("needle task: could not draw a key absent from the filler text")


def build_task(tokenizer, haystack: Haystack, length: int, depth: float, *, seed: int = 0, sample: int = 0,
               chat: Optional[bool] = None, frame: Optional[tuple[list[int], list[int]]] = None) -> NeedleTask:
    """The prompt of exactly `length` tokens with the needle at the sentence boundary nearest to `depth`.

    frame: `prompt_frame(tokenizer, chat)`, passed in to build many tasks without re-tokenizing it.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"needle task: depth must be in [0, 1], got {depth}")
    before, after = frame if frame is not None else prompt_frame(tokenizer, chat)
    key, start = draw_sample(haystack, seed, sample)
    needle = _encode(tokenizer, " " + NEEDLE.format(key=key))
    filler = length - len(before) - len(needle) - len(after)
    if filler < 1:
        raise ValueError(f"needle task: length {length} is too short: the instruction, needle and question alone "
                         f"take {length - filler} tokens")
    ids, boundaries = haystack.excerpt(start, filler)
    at = min(boundaries, key=lambda b: (abs(b - depth * filler), b))
    prompt = before + ids[:at] + needle + ids[at:] + after
    if len(prompt) != length:  # cannot happen: every piece above is counted
        raise RuntimeError(f"needle task: built {len(prompt)} tokens instead of {length}")
    return NeedleTask(input_ids=torch.tensor(prompt, dtype=torch.long), key=key, length=length, depth=depth,
                      sample=sample, needle_start=len(before) + at, needle_tokens=len(needle),
                      haystack_start=len(before), haystack_tokens=filler)


def build_tasks(tokenizer, lengths: Sequence[int], depths: Sequence[float] = DEPTHS, samples: int = 1, *,
                seed: int = 0, haystack: Optional[Haystack] = None, chat: Optional[bool] = None) -> list[NeedleTask]:
    """Every (length, depth, sample) task, in that nesting order. haystack: default the bundled text."""
    if samples < 1:
        raise ValueError(f"needle task: samples must be >= 1, got {samples}")
    if not lengths or not depths:
        raise ValueError("needle task: need at least one length and one depth")
    haystack = haystack or Haystack(tokenizer)
    frame = prompt_frame(tokenizer, chat)
    return [build_task(tokenizer, haystack, length, depth, seed=seed, sample=s, frame=frame)
            for length in lengths for depth in depths for s in range(samples)]


def answer_matches(answer: str, key: str) -> bool:
    """Exact match: the first run of digits in the generated text is the key, no more and no fewer digits.

    " 48213. Remember it." and "is 48213" match 48213; "4821", "482130", "48 213" and "the key" do not.
    """
    found = re.search(r"\d+", answer)
    return found is not None and found.group() == key
