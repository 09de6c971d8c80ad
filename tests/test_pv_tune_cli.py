"""`aquakv pv-tune` on a tiny random Llama: help, refusals before the model load, a run end to end with resume,
the guard's lines, and --plot into a directory that --out creates."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from aquakv.weights import load_quantized
from aquakv.weights.pv.settings import CODE_LR_PER_NAT
from aquakv.weights.quantize import higgs_layers
from tiny_llama import make_tiny_llama


class _CharTokenizer:
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 253 for c in text[:3000]]}


def test_cli_help_explains_and_refuses_before_the_model_load(tmp_path, capsys, monkeypatch):
    import aquakv.models
    from aquakv.cli import main

    with pytest.raises(SystemExit):
        main(["pv-tune", "--help"])
    text = capsys.readouterr().out
    assert "P step" in text and "V step" in text and "--trust-ratio" in text and "--resume" in text
    monkeypatch.setattr(aquakv.models, "load_model", lambda *a, **k: pytest.fail("model loaded before the checks"))
    assert main(["pv-tune", "--bits", "2", "--steps", "1", "--out", str(tmp_path), "--resume", "-q"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["pv-tune", "--bits", "2", "--steps", "1", "--out", str(tmp_path), "--text", str(tmp_path / "x"),
                 "-q"]) == 2
    assert "--text file not found" in capsys.readouterr().err


def test_cli_end_to_end_on_the_tiny_model_with_resume(tmp_path, monkeypatch, capsys):
    import aquakv.models
    from aquakv.cli import main

    monkeypatch.setattr(aquakv.models, "load_model", lambda *a, **k: (make_tiny_llama(seed=4), _CharTokenizer()))
    text = tmp_path / "train.txt"
    text.write_text("def f(x):\n    return x * 2  # a line of Python\n" * 40)
    out = tmp_path / "run"
    common = ["pv-tune", "--bits", "2", "--group-size", "64", "--text", str(text), "--eval-text", str(text),
              "--window", "64", "--eval-windows", "2", "--out", str(out), "--checkpoint-every", "1", "-q",
              "--lr", "3e-3", "--code-lr", "3e-2"]
    assert main(common + ["--steps", "2"]) == 0
    assert main(common + ["--steps", "3", "--resume", "--plot", str(tmp_path / "curves.png")]) == 0
    summary = json.loads((out / "pv_result.json").read_text())
    assert summary["steps"] == 3 and summary["resumed_from"] == 2 and len(summary["loss"]) == 3
    assert summary["eval_steps"] == [0, 2, 3]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    tuned = load_quantized(make_tiny_llama(seed=4), out)
    assert all(torch.isfinite(m.scales).all() for m in higgs_layers(tuned).values())
    assert "saved" in capsys.readouterr().out


@pytest.fixture
def tiny_cli(tmp_path, monkeypatch):
    """main() with the tiny model and a character tokenizer, plus a training text."""
    import aquakv.models
    from aquakv.cli import main

    monkeypatch.setattr(aquakv.models, "load_model", lambda *a, **k: (make_tiny_llama(seed=4), _CharTokenizer()))
    text = tmp_path / "train.txt"
    text.write_text("def f(x):\n    return x * 2  # a line of Python\n" * 40)
    return main, text


def test_plot_into_the_directory_that_out_creates(tmp_path, tiny_cli, capsys):
    main, text = tiny_cli
    out = tmp_path / "pv2"
    assert main(["pv-tune", "--bits", "2", "--group-size", "64", "--text", str(text), "--no-eval", "--window", "64",
                 "--steps", "1", "-q", "--out", str(out), "--plot", str(out / "curves.png")]) == 0
    assert (out / "curves.png").stat().st_size > 1000
    capsys.readouterr()
    # A --plot directory outside --out must still exist.
    assert main(["pv-tune", "--bits", "2", "--steps", "1", "--out", str(tmp_path / "x"), "-q",
                 "--plot", str(tmp_path / "nowhere" / "c.png")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err


def test_the_guard_is_reported_once_per_measurement(tmp_path, tiny_cli, capsys, caplog):
    main, text = tiny_cli
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    assert main(["pv-tune", "--bits", "2", "--group-size", "64", "--text", str(text), "--eval-text", str(text),
                 "--window", "64", "--eval-windows", "2", "--eval-every", "1", "--validate-every", "1",
                 "--steps", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    err = caplog.text
    for step in (0, 1, 2):  # one line per perplexity, not one from pv_tune and one from the evaluation
        assert err.count(f"step {step} held-out perplexity") == 1, err
        assert err.count(f"step {step} validation perplexity") == 1, err
        assert f"pv-tune step {step}: ppl" not in err
    assert "validation perplexity" in captured.out and "s per step" in captured.out
    summary = json.loads((out / "pv_result.json").read_text())
    assert summary["val_steps"] == [0, 1, 2] and summary["val_final"] <= summary["val_start"]


def test_help_names_the_code_step_default(capsys):
    from aquakv.cli import main

    with pytest.raises(SystemExit):
        main(["pv-tune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default {CODE_LR_PER_NAT:g})" in text and "--validate-every" in text and "--keep-last" in text
