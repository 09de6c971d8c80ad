"""The evaluation protocol (docs/evaluation.md) on the tiny random Llama."""
import math

import pytest
import torch
from aquakv.evaluation.perplexity import (
    cache_nbytes,
    evaluate_perplexity,
    format_table,
    kv_values,
    relative_increase,
    window_nll,
)
from aquakv.hf_compat import cache_kwargs
from aquakv.kv.baselines import Fp16Cache
from aquakv.kv.cache_presets import kivi_factory
from tiny_llama import make_tiny_llama, random_token_windows


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(seed=0)


@pytest.fixture(scope="module")
def tokens():
    return torch.cat(random_token_windows(3, 200, seed=1))  # 600 tokens: 4 windows of 128 + a dropped tail


@torch.no_grad()
def full_forward_nll(model, tokens, window, n_windows):
    """The reference: one forward per window, no cache, cross-entropy of every next-token prediction."""
    total = 0.0
    for w in range(n_windows):
        ids = tokens[w * window:(w + 1) * window][None]
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
    return total / (n_windows * (window - 1))


@pytest.mark.parametrize("step", [32, 7, 1])
def test_stepped_dynamic_cache_equals_one_full_forward(model, tokens, step):
    window = 128 if step > 1 else 32
    ref = full_forward_nll(model, tokens, window, 2)
    r = evaluate_perplexity(model, tokens, None, window=window, step=step, max_windows=2, progress=False)
    assert r.n_windows == 2 and r.n_tokens == 2 * (window - 1)
    # Same fp32 math in a different order (attention over a growing cache instead of one causal pass): per-logit
    # differences are ~1e-6, so the mean NLL (~5.6 nats) agrees to far better than 1e-5 relative.
    assert r.nll == pytest.approx(ref, rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(ref), rel=1e-5)


def test_windows_are_non_overlapping_and_the_tail_is_dropped(model, tokens):
    r = evaluate_perplexity(model, tokens, None, window=128, step=64, progress=False)
    assert r.n_windows == 600 // 128
    assert r.nll == pytest.approx(full_forward_nll(model, tokens, 128, 4), rel=1e-5)
    shifted = evaluate_perplexity(model, tokens[128:], None, window=128, step=64, max_windows=1, progress=False)
    assert shifted.nll == pytest.approx(full_forward_nll(model, tokens[128:], 128, 1), rel=1e-5)


def test_batched_windows_score_the_same_predictions(model, tokens):
    one = evaluate_perplexity(model, tokens, kivi_factory(2, buffer=32), window=128, step=32, progress=False)
    three = evaluate_perplexity(model, tokens, kivi_factory(2, buffer=32), window=128, step=32, batch_size=3,
                                progress=False)
    # Batching changes only how matmuls are blocked: float rounding, far below the 2-bit effect (checked below).
    assert three.nll == pytest.approx(one.nll, rel=1e-5)
    assert three.kv_bytes == pytest.approx(one.kv_bytes)


def test_quantized_cache_changes_the_result_and_reports_its_size(model, tokens):
    exact = evaluate_perplexity(model, tokens, None, window=128, step=32, progress=False)
    kivi = evaluate_perplexity(model, tokens, kivi_factory(2, buffer=32), window=128, step=32, progress=False)
    # The tiny model's weights have std 0.2, so attention is sharp and 2-bit keys move the NLL visibly.
    assert abs(kivi.nll - exact.nll) > 1e-3
    assert exact.bits_per_value == 32.0  # the DynamicCache of an fp32 model holds fp32
    assert 2.0 < kivi.bits_per_value < 16.0


def test_fp16_cache_is_16_bits_and_matches_the_exact_cache(model, tokens):
    exact = evaluate_perplexity(model, tokens, None, window=128, step=32, progress=False)
    half = evaluate_perplexity(model, tokens, Fp16Cache, window=128, step=32, progress=False)
    assert half.bits_per_value == 16.0
    assert half.kv_bytes == kv_values(model.config, 1, 128) * 2
    # fp16 keeps ~3 significant digits of each state; the NLL moves by much less than 1e-3 relative.
    assert half.nll == pytest.approx(exact.nll, rel=1e-3)


def test_window_nll_scores_window_minus_one_predictions(model, tokens):
    ids = tokens[:50][None]
    per_token = window_nll(model, ids, None, step=50)  # a None cache: the model makes its own
    assert per_token.shape == (1,) and per_token.dtype == torch.float64
    assert float(per_token) / 49 == pytest.approx(full_forward_nll(model, tokens, 50, 1), rel=1e-5)


def test_cache_nbytes_of_a_dynamic_cache(model, tokens):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=tokens[:10][None], **cache_kwargs(model, cache), use_cache=True)
    assert cache_nbytes(cache) == kv_values(model.config, 1, 10) * 4
    assert cache_nbytes(object()) is None


def test_bad_arguments_are_named(model, tokens):
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluate_perplexity(model, tokens[:100], window=128, progress=False)
    with pytest.raises(ValueError, match="1-D LongTensor"):
        evaluate_perplexity(model, tokens.float(), window=128, progress=False)
    with pytest.raises(ValueError, match="step"):
        evaluate_perplexity(model, tokens, window=128, step=0, progress=False)
    with pytest.raises(ValueError, match="max_windows"):
        evaluate_perplexity(model, tokens, window=128, max_windows=0, progress=False)


def test_relative_increase_and_table():
    assert relative_increase(11.0, 10.0) == pytest.approx(0.1)
    assert relative_increase(10.0, 10.0) == 0.0
    with pytest.raises(ValueError, match="positive"):
        relative_increase(1.0, 0.0)
    from aquakv.evaluation import PerplexityResult

    rows = [("fp16", PerplexityResult(10.0, math.log(10.0), 100, 1, 2 * 2 ** 20, 16.0, 3.0)),
            ("KIVI-2", PerplexityResult(12.5, math.log(12.5), 100, 1, None, None, 40.2))]
    table = format_table(rows, baseline=10.0).splitlines()
    assert table[0].startswith("| method | bits/value | KV bytes | perplexity | vs fp16 |")
    assert table[2] == "| fp16 | 16.00 | 2.00 MiB | 10.000 | +0.00% | 3.0 s |"
    assert table[3] == "| KIVI-2 | n/a | n/a | 12.500 | +25.00% | 40 s |"


def test_table_shows_predicted_ppl_and_names_the_bits_column():
    from aquakv.evaluation import PerplexityResult

    rows = [("fp32", PerplexityResult(10.0, math.log(10.0), 100, 1, None, 32.0, 1.0)),
            ("HIGGS-3", PerplexityResult(10.5, math.log(10.5), 100, 1, None, 3.06, 1.0, predicted_ppl=10.4))]
    table = format_table(rows, baseline=10.0, baseline_name="fp32", bits_name="bits/weight").splitlines()
    # No row holds a KV cache, so there is no KV bytes column
    assert table[0] == "| method | bits/weight | perplexity | predicted ppl | vs fp32 | eval time |"
    assert table[2] == "| fp32 | 32.00 | 10.000 |  | +0.00% | 1.0 s |"
    assert table[3] == "| HIGGS-3 | 3.06 | 10.500 | 10.400 | +5.00% | 1.0 s |"
    assert "predicted" not in format_table(rows[:1])
    assert format_table(rows[1:], bits_digits=4).splitlines()[2].startswith("| HIGGS-3 | 3.0600 |")


def test_evaluation_names_import_without_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom aquakv.evaluation import format_table, PerplexityResult\n"
            "print(format_table([('a', PerplexityResult(2.0, 0.69, 1, 1))]).count('|'))\n"
            "assert 'torch' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_a_long_batch_reports_progress_between_its_steps(model, tokens, monkeypatch):
    """A batch of windows fed step by step can take minutes on a loaded CPU: the redirected log gets a line every
    interval from inside it (which forward it is at), not one line when the whole batch is over."""
    import io

    from aquakv.evaluation import perplexity
    from aquakv.progress import LineProgress

    out, now = io.StringIO(), [0.0]

    def clock():  # every reading is 11 s later: each update is past the 10 s interval
        now[0] += 11.0
        return now[0]

    monkeypatch.setattr(perplexity, "progress_bar",
                        lambda **kw: LineProgress(stream=out, clock=clock, interval=10.0,
                                                  **{k: kw[k] for k in ("total", "desc", "unit", "enabled")}))
    evaluate_perplexity(model, tokens, None, window=128, step=32, max_windows=2, batch_size=2, desc="fp16")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("fp16: 0/2 window, ") and lines[0].endswith("batch 1/1, step 1/4")
    assert [ln.rsplit(", ", 1)[-1] for ln in lines[:-1]] == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]
    assert lines[-1].startswith("fp16: 2/2 window, ") and lines[-1].endswith(" elapsed, done")
