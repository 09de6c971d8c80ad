"""quantize-weights: the library entry point (aquakv.weights.pipeline) and the command around it, on a tiny Llama."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from aquakv.cli.common import UserError
from aquakv.evaluation import evaluate_perplexity
from aquakv.evaluation.windows import cut_windows
from aquakv.weights import InfeasibleBudget, Sensitivities, average_bits, load_quantized
from aquakv.weights.pipeline import (
    check_output_dir,
    check_weight_options,
    quantize_weights,
    shipped_widths,
)
from tiny_llama import make_tiny_llama, random_token_windows


class _CharTokenizer:
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 253 for c in text[:2000]]}


def _cli(argv):
    from aquakv.cli.weights import add_parser

    parser = argparse.ArgumentParser(prog="aquakv")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything tries to load a model: the check under test must come first."""
    import aquakv.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(aquakv.models, "load_model", refuse)


def test_cli_help_and_missing_files(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _cli(["quantize-weights", "--help"])
    assert "--budget" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # --bits or --budget is required
        _cli(["quantize-weights", "--out", str(tmp_path)])
    args = _cli(["quantize-weights", "--model", str(tmp_path / "nope"), "--bits", "4", "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="--model directory not found"):
        args.func(args)
    args = _cli(["quantize-weights", "--bits", "4", "--sensitivities", str(tmp_path / "s.json"), "--out", str(tmp_path)])
    with pytest.raises(UserError, match="--sensitivities file not found"):
        args.func(args)


def test_cli_budget_end_to_end_on_tiny_model(tmp_path, monkeypatch, capsys):
    import aquakv.models

    monkeypatch.setattr(aquakv.models, "load_model", lambda *a, **k: (make_tiny_llama(seed=6), _CharTokenizer()))
    args = _cli(["quantize-weights", "--budget", "3.0625", "--out", str(tmp_path), "--eval", "--group-size", "64",
                 "--calib-windows", "2", "--calib-len", "32", "--eval-window", "64", "--eval-windows", "2", "-q"])
    assert args.func(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    methods = [r["method"] for r in results["rows"]]
    assert methods[0] == "unquantized (fp32)" and methods[1] == "RTN 2-bit" and methods[-1].startswith("HIGGS + DP")
    assert results["rows"][-1]["bits_per_weight"] <= 3.0625
    assert "| HIGGS + DP" in capsys.readouterr().out
    for f in ("higgs_weights.safetensors", "higgs_weights.json", "sensitivities.json", "allocation.json", "results.json"):
        assert (tmp_path / f).is_file()
    fresh = load_quantized(make_tiny_llama(seed=6), tmp_path)
    assert average_bits(fresh) == pytest.approx(results["rows"][-1]["bits_per_weight"])


@pytest.mark.parametrize("bits", ["inf", "nan", "9", "2.5", "0", "-2", "four"])
def test_cli_refuses_bits_that_are_not_a_shipped_width_at_parse_time(bits, capsys, no_model_load):
    """Before: inf/nan/9/2.5 got as far as default_grid after the parse (inf and nan with a confusing message)."""
    with pytest.raises(SystemExit):
        _cli(["quantize-weights", "--bits", bits, "--out", "o"])
    err = capsys.readouterr().err
    assert "--bits" in err and bits in err


def test_cli_help_lists_the_accepted_widths(capsys):
    with pytest.raises(SystemExit):
        _cli(["quantize-weights", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert ", ".join(f"{w:g}" for w in shipped_widths()) in out


def test_cli_refuses_missing_cuda_and_unwritable_out_before_the_load(tmp_path, capsys, no_model_load):
    from aquakv.cli import main

    (tmp_path / "file").write_text("x")
    code = main(["quantize-weights", "--bits", "4", "--out", str(tmp_path / "file" / "sub"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "is not a directory" in err and len(err.strip().splitlines()) == 1
    code = main(["quantize-weights", "--budget", "1.5", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "below the cheapest configuration" in err
    if not torch.cuda.is_available():
        code = main(["quantize-weights", "--bits", "4", "--out", str(tmp_path / "o"), "--device", "cuda"])
        err = capsys.readouterr().err
        assert code == 2 and "CUDA is not available" in err
    assert not (tmp_path / "o").exists()


def test_check_weight_options_names_the_bad_option():
    for bits in (math.inf, math.nan, 9, 2.5, -1, 0):
        with pytest.raises(ValueError, match="bits"):
            check_weight_options(bits=bits)
    with pytest.raises(ValueError, match="group_size"):
        check_weight_options(bits=4, group_size=96)
    with pytest.raises(ValueError, match="budget"):
        check_weight_options(budget=math.nan)
    with pytest.raises(InfeasibleBudget, match=r"below the cheapest configuration, 2.0625"):
        check_weight_options(budget=2.0)
    with pytest.raises(ValueError, match="min_bits"):
        check_weight_options(bits=4, min_bits=5, max_bits=7)
    with pytest.raises(ValueError, match="exactly one"):
        check_weight_options(bits=4, budget=4.0625)
    # the uniform comparison row takes the widest shipped width that fits the budget with its scales
    assert check_weight_options(budget=3.0625).uniform_bits == 3
    assert check_weight_options(budget=3.06).uniform_bits == 2
    assert check_weight_options(bits=4, group_size=64).budget == 4.25


def test_check_output_dir_refuses_a_file_and_creates_nothing(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        check_output_dir(tmp_path / "f")
    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()


def _run(tmp_path, layers: int = 4, **kwargs):
    options = dict(out=tmp_path / "out", group_size=64, calib_windows=2, calib_len=32, progress=False)
    model = make_tiny_llama(seed=6, num_hidden_layers=layers)
    return quantize_weights(model, _CharTokenizer(), **{**options, **kwargs})


def test_infeasible_budget_is_refused_before_any_measurement(tmp_path, monkeypatch):
    """Above the most expensive configuration: only the layers' sizes show it. Before, it surfaced after the layer
    errors and the sensitivities had been measured (and sensitivities.json written)."""
    import aquakv.weights.plan as plan

    def measured(*args, **kwargs):
        raise AssertionError("measured before the budget was checked")

    monkeypatch.setattr(plan, "measure_layer_errors", measured)
    monkeypatch.setattr(plan, "measure_sensitivities", measured)
    with pytest.raises(InfeasibleBudget, match="above the most expensive"):
        _run(tmp_path, budget=8.5)
    assert not (tmp_path / "out").exists()


def test_out_is_not_left_empty_when_a_step_fails(tmp_path, monkeypatch):
    import aquakv.weights.pipeline as pipeline

    other = Sensitivities(["not.a.layer"], [1.0], 2.0, 0.01, True, 1, 8, 0.0)
    with pytest.raises(ValueError, match="no measurement for 28 layers"):
        _run(tmp_path, budget=3.0625, sensitivities=other)
    assert not (tmp_path / "out").exists()

    def broken_save(model, directory):
        raise OSError("disk full")

    monkeypatch.setattr(pipeline, "save_quantized", broken_save)
    with pytest.raises(OSError, match="disk full"):
        _run(tmp_path, bits=4)
    assert not (tmp_path / "out").exists()


def test_pipeline_report_and_reused_sensitivities_give_the_same_files(tmp_path):
    first = _run(tmp_path, budget=3.0625)
    assert first.rows == [] and first.allocation.average_bits <= 3.0625
    assert {p.name for p in first.paths} == {"sensitivities.json", "higgs_weights.safetensors", "higgs_weights.json",
                                            "allocation.json"}
    again = _run(tmp_path / "2", budget=3.0625, sensitivities=tmp_path / "out" / "sensitivities.json")
    assert again.allocation.grid_per_layer == first.allocation.grid_per_layer
    for name in ("higgs_weights.safetensors", "allocation.json"):
        assert (tmp_path / "2" / "out" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()


def test_pipeline_evaluation_rows_are_perplexity_results(tmp_path):
    ids = torch.cat(random_token_windows(1, 140, seed=2))
    report = _run(tmp_path, layers=1, bits=3, evaluate=True, dp_row=True, eval_window=64, eval_ids=ids, calib_ids=ids)
    names = [name for name, _ in report.rows]
    assert names == ["unquantized (fp32)", "RTN 3-bit", "HIGGS 3-bit d2_n64", "HIGGS + DP (budget 3.25)"]
    base = evaluate_perplexity(make_tiny_llama(seed=6, num_hidden_layers=1), ids, window=64, step=None, progress=False)
    assert report.rows[0][1].ppl == base.ppl and report.rows[0][1].n_windows == 2  # the model itself is unchanged
    assert [r.bits_per_value for _, r in report.rows][2:] == [3.25, pytest.approx(report.allocation.average_bits)]
    assert [name for name, r in report.rows if r.predicted_ppl is not None] == names[2:]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["perplexity"] for r in saved["rows"]] == [r.ppl for _, r in report.rows]


def test_one_pass_perplexity_matches_manual_cross_entropy():
    """What weight quantization is measured with (moved here with weights/evaluate.py's `perplexity`)."""
    model = make_tiny_llama(seed=0)
    ids = torch.cat(random_token_windows(1, 100, seed=9))
    res = evaluate_perplexity(model, ids, window=32, step=None, progress=False)
    windows = torch.stack(cut_windows(ids, 32, keep_tail=False))
    assert windows.shape == (3, 32) and res.n_tokens == 3 * 31
    with torch.no_grad():
        logits = model(windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert res.nll == pytest.approx(float(nll), rel=1e-6)  # same logits, sum vs mean order only


def test_eval_with_fixed_bits_measures_only_what_the_table_needs_with_progress_lines(tmp_path, monkeypatch, capsys):
    """Before: --bits 4 --eval also ran the DP's sensitivity measurement (half an hour on SmolLM2-135M), silently
    when stderr was redirected. Now the table has the three rows a fixed width needs; every phase shows progress,
    as plain lines when stderr is not a terminal (as here: pytest captures it)."""
    import aquakv.models
    import aquakv.weights.plan as plan

    def measured(*args, **kwargs):
        raise AssertionError("measured for a fixed --bits without --dp-row")

    monkeypatch.setattr(plan, "measure_layer_errors", measured)
    monkeypatch.setattr(plan, "measure_sensitivities", measured)
    monkeypatch.setattr(aquakv.models, "load_model", lambda *a, **k: (make_tiny_llama(seed=6), _CharTokenizer()))
    args = _cli(["quantize-weights", "--bits", "4", "--out", str(tmp_path), "--eval", "--group-size", "64",
                 "--eval-window", "64", "--eval-windows", "2"])
    assert args.func(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["unquantized (fp32)", "RTN 4-bit", "HIGGS 4-bit d2_n256"]
    assert not (tmp_path / "sensitivities.json").exists() and not (tmp_path / "allocation.json").exists()
    err = capsys.readouterr().err
    for phase in ("unquantized (fp32): 2/2 window", "RTN 4-bit: ", "HIGGS quantize: ", "HIGGS 4-bit d2_n256: 2/2"):
        assert phase in err, err


def test_dp_row_needs_bits_and_eval(tmp_path, no_model_load):
    args = _cli(["quantize-weights", "--budget", "3.0625", "--dp-row", "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="--dp-row"):
        args.func(args)
