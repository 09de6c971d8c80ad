"""`aquakv demo`: the whole pipeline on the bundled SmolLM2-135M and bundled text, in a few minutes on a CPU.

1. calibrate AQUA-KV predictors at 2 and 3 bits on the calibration part of Python's reference documentation;
2. measure perplexity on the held-out part (docs/evaluation.md: windows fed 32 tokens at a time through each
   cache) for an unquantized fp16 cache, KIVI-2/4, HIGGS-2 without predictors, AQUA-KV-2/3 and transformers'
   own quantized cache;
3. answer a question about a held-out passage with the AQUA-KV-2 cache (and the unquantized one, to compare):
   this shows the cache serving `generate` end to end; one greedy answer is not a quality measure (the table is).

Results go to `out` (stdout); what the demo is doing ("calibrating ...") goes to `log` (stderr), so a redirected
stdout holds the report alone.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, TextIO

import torch

from aquakv.hf_compat import cache_kwargs

# A held-out topic (the evaluation split holds every fourth topic) and a question its text answers (SmolLM2-135M
# answers this one correctly from the passage).
PASSAGE_TOPIC = "booleans"
QUESTION = 'What does the operator "not" yield if its argument is false?'


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo. The defaults fit a few minutes on 2 CPU cores; QUICK is a smoke test."""

    calib_windows: int = 8
    calib_window: int = 1024
    eval_windows: int = 4
    window: int = 1024
    step: int = 32
    max_new_tokens: int = 24


QUICK = DemoConfig(calib_windows=4, calib_window=512, eval_windows=1, window=512, max_new_tokens=8)


@dataclass
class DemoResult:
    """What the demo measured: table rows (name, PerplexityResult), skipped rows with reasons, answers, timings."""

    rows: list = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    answers: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def ppl(self, name: str) -> float:
        return dict(self.rows)[name].ppl


def _generate(model, tokenizer, cache, max_new_tokens: int) -> str:
    """Greedy answer to QUESTION about the PASSAGE_TOPIC text, generated through `cache`."""
    from pydoc_data.topics import topics

    messages = [{"role": "user", "content": f"{topics[PASSAGE_TOPIC].strip()}\n\n{QUESTION}"}]
    device = next(model.parameters()).device
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = {k: v.to(device) for k, v in ids.items()}
    out = model.generate(**ids, **cache_kwargs(model, cache), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _what_the_answers_show(quantized: str, exact: str) -> str:
    """What one greedy answer through each cache does and does not show, said plainly under the answers."""
    same = ("the two answers are identical" if quantized == exact else
            "the two answers differ: a 2-bit cache can flip one greedy choice and the rest of the answer follows it")
    return (f"({same}. One greedy answer shows the AQUA-KV cache serving generate() end to end; it is not a "
            f"quality measure: the perplexity table above is.)")


def run_demo(device: str = "cpu", quick: bool = False, seed: int = 0, progress: bool = True,
             config: Optional[DemoConfig] = None, model=None, tokenizer=None, out: Optional[TextIO] = None,
             log: Optional[TextIO] = None) -> DemoResult:
    """Run the demo and print its report to `out` and what it is doing to `log` (defaults: stdout and stderr at
    call time, never the streams of whenever this module was imported); returns the numbers.

    config: sizes (default DemoConfig(), or QUICK with quick=True). model, tokenizer: use these instead of
    loading the bundled SmolLM2 (the tokenizer must have a chat template for the generation step).
    """
    from aquakv.data import default_texts, tokenize
    from aquakv.evaluation import BITS_NOTE
    from aquakv.evaluation.compare import compare_caches
    from aquakv.evaluation.table import count
    from aquakv.kv import AquaKVCache, calibrate, registry
    from aquakv.kv.baselines import Fp16Cache
    from aquakv.models import load_model

    cfg = config or (QUICK if quick else DemoConfig())
    res = DemoResult()

    def say(text: str = "") -> None:
        print(text, file=out if out is not None else sys.stdout, flush=True)

    def note(text: str) -> None:  # progress, not results
        print(text, file=log if log is not None else sys.stderr, flush=True)

    def timed(name: str, fn: Callable):
        t0 = time.perf_counter()
        value = fn()
        res.seconds[name] = time.perf_counter() - t0
        return value

    torch.manual_seed(seed)
    t_start = time.perf_counter()
    if model is None:
        note("loading the bundled SmolLM2-135M-Instruct ...")
        model, tokenizer = timed("load", lambda: load_model(device=device))
        note(f"  loaded in {res.seconds['load']:.1f} s")
    model.eval()
    calib = tokenize(tokenizer, default_texts("calibration"))
    held_out = tokenize(tokenizer, default_texts("evaluation"))

    preds = {}
    for bits in (2, 3):
        note(f"calibrating AQUA-KV-{bits} on {count(cfg.calib_windows, 'window')} of {cfg.calib_window} tokens ...")
        preds[bits] = timed(f"calibrate {bits}-bit", lambda: calibrate(
            model, [calib], bits=bits, window=cfg.calib_window, max_windows=cfg.calib_windows, seed=seed,
            progress=progress))
        say(f"AQUA-KV-{bits} calibrated on {count(cfg.calib_windows, 'window')} of {cfg.calib_window} tokens in "
            f"{res.seconds[f'calibrate {bits}-bit']:.1f} s: compressed part {preds[bits].bits_per_value():.2f} "
            f"bits/value (all bytes held: the table's bits/value)")

    aquakv = registry.get("aquakv")
    rows = registry.rows(["fp16", "kivi4", "kivi2", "higgs2"], seed=seed)
    rows += [registry.Row("aquakv", aquakv.label(preds[b]), aquakv.factory(preds[b])) for b in (3, 2)]
    rows += registry.rows(["fp8", "quanto", "hqq"])

    n_windows = min(cfg.eval_windows, held_out.numel() // cfg.window)
    note(f"perplexity on {count(n_windows, 'held-out window')} of {cfg.window} tokens, fed {cfg.step} at a time ...")
    # All windows side by side: on a CPU one forward of B x 32 tokens costs far less than B forwards.
    comparison = compare_caches(model, held_out, rows, window=cfg.window, step=cfg.step, max_windows=n_windows,
                                batch_size=n_windows, progress=progress)
    res.rows, res.skipped = comparison.rows, comparison.skipped

    say()
    say(comparison.table())
    say(f"\n{BITS_NOTE}; KIVI uses groups of 32 with fp16 scale and zero point.")
    for name, why_not in res.skipped:
        say(f"{name}: skipped, {why_not}")

    say(f"\nQ: {QUESTION} (about the {PASSAGE_TOPIC!r} section of the Python reference, {cfg.max_new_tokens} "
        f"new tokens, greedy)")
    for name, factory in ((aquakv.label(preds[2]), lambda: AquaKVCache(model, preds[2])),
                          ("fp16 (unquantized)", lambda: Fp16Cache(model))):
        cache = factory()
        with torch.no_grad():
            answer = timed(f"generate {name}", lambda: _generate(model, tokenizer, cache, cfg.max_new_tokens))
        getattr(cache, "close", lambda: None)()
        res.answers[name] = answer
        say(f"{name:>20}: {answer}")
    say(_what_the_answers_show(*res.answers.values()))
    res.seconds["total"] = time.perf_counter() - t_start
    say("\ntimings: " + ", ".join(f"{k} {v:.1f} s" for k, v in res.seconds.items()))
    return res
