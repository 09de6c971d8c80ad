"""Passkey retrieval through KV caches: greedy answers, exact-match accuracy per (length, depth) and per cache.

Protocol per task and cache: a fresh cache from the factory; the prompt except its last token is prefilled
`prefill_chunk` tokens per forward (None or 0: no separate prefill), so the question and every later chunk attend to
the compressed states of the haystack and needle, as in chunked-prefill serving (and the transient attention
memory stays bounded); then `model.generate` continues greedily from that cache for `max_new_tokens` tokens; the
decoded text is scored by `answer_matches`. Every cache answers the very same prompts.
"""
from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from aquakv.hf_compat import cache_kwargs
from aquakv.progress import progress as progress_bar
from aquakv.longctx.passkey import DEPTHS, NeedleTask, answer_matches, build_tasks

log = logging.getLogger(__name__)

CacheFactory = Callable[[torch.nn.Module], object]


@dataclass
class NeedleRecord:
    """One answer: which cache, which cell, the generated text, whether it matched, and its wall time."""

    cache: str
    length: int
    depth: float
    sample: int
    key: str
    answer: str
    correct: bool
    seconds: float


@dataclass
class NeedleResult:
    """Outcome of `run_needle`: every record, the grid it covers, the protocol, and wall time per cache."""

    lengths: list[int]
    depths: list[float]
    samples: int
    prefill_chunk: Optional[int] = None
    max_new_tokens: int = 8
    records: list[NeedleRecord] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def caches(self) -> list[str]:
        return list(dict.fromkeys(r.cache for r in self.records))

    def _of(self, cache: str) -> list[NeedleRecord]:
        records = [r for r in self.records if r.cache == cache]
        if not records:
            raise KeyError(f"no needle results for cache {cache!r} (have: {', '.join(self.caches) or 'none'})")
        return records

    def accuracy(self, cache: str, length: Optional[int] = None, depth: Optional[float] = None) -> float:
        """Fraction of correct answers of `cache`, over one cell or over every length / depth left None."""
        records = [r for r in self._of(cache)
                   if (length is None or r.length == length) and (depth is None or r.depth == depth)]
        if not records:
            raise KeyError(f"no needle results for cache {cache!r} at length {length}, depth {depth}")
        return sum(r.correct for r in records) / len(records)

    def grid(self, cache: str) -> list[list[float]]:
        """Accuracy [depth][length] of `cache`, in the order of `depths` and `lengths`."""
        return [[self.accuracy(cache, n, d) for n in self.lengths] for d in self.depths]

    def to_dict(self) -> dict:
        return {"lengths": self.lengths, "depths": self.depths, "samples": self.samples,
                "prefill_chunk": self.prefill_chunk, "max_new_tokens": self.max_new_tokens, "seconds": self.seconds,
                "accuracy": {c: self.grid(c) for c in self.caches}, "records": [vars(r) for r in self.records]}


def _forward_kwargs(model: torch.nn.Module) -> dict:
    """Ask for the last position's logits only where the model can (a prefill chunk needs none of them)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.no_grad()
def answer(model: torch.nn.Module, tokenizer, task: NeedleTask, cache, *, prefill_chunk: Optional[int] = 1024,
           max_new_tokens: int = 8) -> str:
    """The model's greedy continuation of task's prompt through `cache` (decoded, special tokens dropped)."""
    device = next(model.parameters()).device
    ids = task.input_ids.to(device)[None]
    if prefill_chunk:
        extra = _forward_kwargs(model)
        for start in range(0, ids.shape[1] - 1, prefill_chunk):
            end = min(start + prefill_chunk, ids.shape[1] - 1)
            model(input_ids=ids[:, start:end], use_cache=True, **cache_kwargs(model, cache), **extra)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else getattr(tokenizer, "eos_token_id", None)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache),
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def _close(cache) -> None:
    close = getattr(cache, "close", None)
    if callable(close):  # caches that hook the model's rotary module unhook here
        close()


def run_needle(model: torch.nn.Module, tokenizer, caches: Sequence[tuple[str, CacheFactory]],
               lengths: Sequence[int], depths: Sequence[float] = DEPTHS, samples: int = 1, *, seed: int = 0,
               haystack=None, tasks: Optional[Sequence[NeedleTask]] = None, prefill_chunk: Optional[int] = 1024,
               max_new_tokens: int = 8, progress: bool = True) -> NeedleResult:
    """Passkey accuracy of every cache on the same tasks (see the module docstring for the protocol).

    caches: (name, factory) pairs; factory(model) -> a fresh transformers Cache, called once per task.
    lengths, depths, samples, seed, haystack: the task grid (`aquakv.longctx.passkey.build_tasks`); or pass
        prebuilt `tasks` (then lengths and depths only order the result).
    """
    if not caches:
        raise ValueError("run_needle: no caches given")
    if prefill_chunk is not None and prefill_chunk < 0:
        raise ValueError(f"run_needle: prefill_chunk must be >= 0 or None, got {prefill_chunk}")
    if max_new_tokens < 1:
        raise ValueError(f"run_needle: max_new_tokens must be >= 1, got {max_new_tokens}")
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    too_long = [n for n in lengths if limit is not None and n + max_new_tokens > limit]
    if too_long:
        raise ValueError(f"run_needle: length {too_long[0]} + {max_new_tokens} new tokens exceeds the model's "
                         f"{limit} positions")
    if tasks is None:
        tasks = build_tasks(tokenizer, lengths, depths, samples, seed=seed, haystack=haystack)
    result = NeedleResult(lengths=list(lengths), depths=list(depths), samples=samples,
                          prefill_chunk=prefill_chunk or None, max_new_tokens=max_new_tokens)

    for name, factory in caches:
        t0 = time.perf_counter()
        for task in progress_bar(tasks, desc=f"needle {name}", unit="prompt", enabled=progress, leave=False):
            t1 = time.perf_counter()
            cache = factory(model)
            try:
                text = answer(model, tokenizer, task, cache, prefill_chunk=prefill_chunk,
                              max_new_tokens=max_new_tokens)
            finally:
                _close(cache)
            del cache
            result.records.append(NeedleRecord(cache=name, length=task.length, depth=task.depth, sample=task.sample,
                                               key=task.key, answer=text, correct=answer_matches(text, task.key),
                                               seconds=time.perf_counter() - t1))
        result.seconds[name] = time.perf_counter() - t0
        log.info("needle %s: accuracy %.3f over %d prompts in %.1f s", name, result.accuracy(name), len(tasks),
                 result.seconds[name])
    return result


def _cell(acc: float, n: int) -> str:
    return f"{100 * acc:.0f}% ({round(acc * n)}/{n})"


def format_needle_table(result: NeedleResult) -> str:
    """Markdown: per cache one row per depth and an `all` row, one column per length, then overall and time."""
    head = "| cache | depth | " + " | ".join(f"{n} tok" for n in result.lengths) + " | all | eval time |"
    lines = [head, "|---|---:|" + "---:|" * (len(result.lengths) + 2)]
    per_cell = result.samples
    for cache in result.caches:
        for d in result.depths:
            cells = [_cell(result.accuracy(cache, n, d), per_cell) for n in result.lengths]
            lines.append(f"| {cache} | {d:.2f} | " + " | ".join(cells)
                         + f" | {_cell(result.accuracy(cache, depth=d), per_cell * len(result.lengths))} | |")
        cells = [_cell(result.accuracy(cache, n), per_cell * len(result.depths)) for n in result.lengths]
        total = per_cell * len(result.depths) * len(result.lengths)
        lines.append(f"| {cache} | all | " + " | ".join(cells) + f" | {_cell(result.accuracy(cache), total)} | "
                     f"{result.seconds.get(cache, 0.0):.0f} s |")
    return "\n".join(lines)
