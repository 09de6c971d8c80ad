"""What the commands report (issue 21): calibrate's bytes-held figure counted without another pass over the model,
Ctrl-C after the save, a --window past the model's positions, an eval row whose cache quantized nothing, and
progress lines when stderr is a log file rather than a terminal."""
from __future__ import annotations

import pytest
import torch
from aquakv import cli
from tiny_llama import make_tiny_llama


class ByteTokenizer:
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + b % 253 for b in text.encode()]}


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    model = make_tiny_llama(seed=0)
    monkeypatch.setattr(cli.common, "load", lambda args: (model, ByteTokenizer()))
    gen = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "cache", "key", "value", "layer"]
    text = tmp_path / "text.txt"
    text.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (1200,), generator=gen)))
    return model, text


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def preds_file(tmp_path, tiny):
    import aquakv

    model, text = tiny
    ids = torch.tensor(ByteTokenizer()(text.read_text())["input_ids"])
    path = tmp_path / "p.safetensors"
    aquakv.calibrate(model, [ids], bits=2, window=256, max_windows=4, progress=False).save(path)
    return path


@pytest.mark.parametrize("kwargs", [dict(bits=2, rank=4), dict(bits=3, layer0_bits="fp16")])
def test_bytes_held_count_equals_a_cache_that_ran_the_window(tiny, kwargs):
    """The count replaces a pass of one window through the model (1-3.5x the fitting time); it must equal what
    that pass measured, bit for bit, on windows that end with the buffer empty, partly full, or nothing quantized."""
    from aquakv.cli.calibrate import held_bits_per_value
    from aquakv.evaluation import evaluate_perplexity
    from aquakv.kv import AquaKVCache, calibrate

    model, _ = tiny
    ids = torch.randint(3, 250, (3000,), generator=torch.Generator().manual_seed(1))
    preds = calibrate(model, [ids], window=256, max_windows=2, progress=False, **kwargs)
    for window in (100, 300):  # nothing quantized; quantized with 12 tokens left in the buffer
        measured = evaluate_perplexity(model, ids, lambda m: AquaKVCache(m, preds), window=window, step=32,
                                       max_windows=1, progress=False).bits_per_value
        assert held_bits_per_value(model, preds, window) == measured, window


def test_calibrate_runs_no_evaluation_pass_after_saving(capsys, tmp_path, tiny, monkeypatch):
    import aquakv.evaluation.perplexity as perplexity

    def no_pass(*a, **k):
        raise AssertionError("calibrate ran the model over a window again to count bytes")

    monkeypatch.setattr(perplexity, "evaluate_perplexity", no_pass)
    _, text = tiny
    out_file = tmp_path / "p.safetensors"
    code, out, err = run(capsys, "calibrate", "--text", str(text), "--windows", "4", "--window", "256",
                         "--out", str(out_file), "--device", "cpu", "-q")
    assert code == 0, err
    assert "all bytes held" in out


def test_ctrl_c_after_the_save_reports_the_complete_file(capsys, tmp_path, tiny, monkeypatch):
    import aquakv
    import aquakv.cli.calibrate as calibrate_cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(calibrate_cli, "held_bits_per_value", interrupted)
    _, text = tiny
    out_file = tmp_path / "p.safetensors"
    code, _, err = run(capsys, "calibrate", "--text", str(text), "--windows", "4", "--window", "256",
                       "--out", str(out_file), "--device", "cpu", "-q")
    assert code == 0
    assert err.strip() == f"aquakv calibrate: interrupted after saving; {out_file} is complete"
    aquakv.AquaKVPredictors.load(out_file)


def test_calibrate_refuses_a_window_past_the_models_positions(capsys, tmp_path, tiny):
    _, text = tiny
    out_file = tmp_path / "p.safetensors"
    code, _, err = run(capsys, "calibrate", "--text", str(text), "--window", "10000000", "--out", str(out_file),
                       "--device", "cpu", "-q")
    assert code == 2 and err.strip() == "aquakv calibrate: error: --window 10000000 exceeds the model's 4096 positions"
    assert not out_file.exists() and list(tmp_path.iterdir()) == [text]


def test_eval_says_when_a_row_quantized_nothing(capsys, tiny, preds_file):
    _, text = tiny
    code, out, err = run(capsys, "eval", "--predictors", str(preds_file), "--text", str(text), "--window", "64",
                         "--max-windows", "2", "--device", "cpu", "-q")
    assert code == 0, err
    assert ("AQUA-KV-2: nothing was quantized: every token of a 64-token window stayed in the cache's exact sinks "
            "and recent buffer") in out
    code, out, err = run(capsys, "eval", "--predictors", str(preds_file), "--text", str(text), "--window", "192",
                         "--max-windows", "1", "--device", "cpu", "-q")
    assert code == 0, err
    assert "nothing was quantized" not in out


def test_eval_writes_progress_lines_when_stderr_is_not_a_terminal(capsys, tiny, preds_file):
    """capsys's stderr is not a terminal, like a redirected log: one plain line per row at its end (and one per
    ~10 s), no bar frames."""
    _, text = tiny
    code, out, err = run(capsys, "eval", "--predictors", str(preds_file), "--text", str(text), "--window", "192",
                         "--max-windows", "1", "--device", "cpu")
    assert code == 0, err
    assert "fp16 (unquantized): 1/1 window" in err and "AQUA-KV-2: 1/1 window" in err
    assert "\r" not in err


def test_demo_reports_on_stdout_and_progress_on_stderr(tiny, monkeypatch, capsys):
    """The slow steps are stubbed: what is checked is which stream each line goes to, and the closing note."""
    import aquakv.demo as demo
    import aquakv.evaluation.compare as compare
    import aquakv.kv
    from aquakv.evaluation.result import PerplexityResult

    model, _ = tiny
    monkeypatch.setattr(aquakv.kv, "calibrate", lambda m, ids, bits, **k: aquakv.kv.AquaKVPredictors.zeros(m, bits))
    row = PerplexityResult(ppl=10.0, nll=2.3, n_tokens=511, n_windows=1, bits_per_value=16.0, compressed_values=0)
    monkeypatch.setattr(compare, "compare_caches",
                        lambda *a, **k: compare.Comparison(rows=[("fp16 (unquantized)", row)]))
    monkeypatch.setattr(demo, "_generate", lambda *a, **k: "True")
    demo.run_demo(quick=True, model=model, tokenizer=ByteTokenizer(), progress=False)
    out, err = capsys.readouterr()
    assert "calibrating AQUA-KV-2" in err and "perplexity on 1 held-out window" in err
    assert "calibrating" not in out and " ..." not in out
    assert "| fp16 (unquantized) |" in out and "AQUA-KV-2 calibrated on" in out
    assert "(the two answers are identical. One greedy answer shows" in out and "not a quality measure" in out


def test_one_cache_naming_across_commands(tiny, preds_file):
    """A cache's name is its table label in lowercase without dashes; every command takes either spelling."""
    import aquakv
    from aquakv.cli.common import UserError, cache_name
    from aquakv.cli.longctx import cache_factories

    assert [cache_name(t) for t in ("AQUA-KV-2", "KIVI-2", "HIGGS-2 (no predictors)", "fp16 (unquantized)",
                                    "AQUA-KV-2-bf16", "kivi2", "aquakv-bf16")] == \
        ["aquakv2", "kivi2", "higgs2", "fp16", "aquakv2-bf16", "kivi2", "aquakv-bf16"]
    preds = aquakv.AquaKVPredictors.load(preds_file)
    assert [n for n, _ in cache_factories(["FP16", "KIVI-2", "AQUA-KV-2"], preds)] == ["fp16", "kivi2", "aquakv2"]
    with pytest.raises(UserError, match="calibrated at 2 bits"):
        cache_factories(["AQUA-KV-3"], preds)
    args = cli.build_parser().parse_args(["eval", "--predictors", "p", "--baselines", "KIVI-2", "HIGGS-2", "kivi4"])
    assert args.baselines == ["kivi2", "higgs2", "kivi4"]


def test_longctx_writes_progress_lines_not_bars_into_a_log(capsys, tiny, tmp_path):
    _, text = tiny
    code, out, err = run(capsys, "longctx", "--task", "ppl", "--context", "256", "--prefill", "128", "--chunk", "64",
                         "--max-windows", "1", "--caches", "fp16", "KIVI-2", "--text", str(text), "--device", "cpu")
    assert code == 0, err
    assert "fp16 @ 256: 1/1 window" in err and "kivi2 @ 256: 1/1 window" in err
    assert "\r" not in err and "| kivi2 | 256 |" in out
