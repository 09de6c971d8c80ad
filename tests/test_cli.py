"""The `aquakv` command line: help for every command, one-line errors with exit status 2, and calibrate/eval/demo
end to end on the tiny random Llama (the real model runs in test_smollm2.py)."""
import sys

import pytest
import torch
from aquakv import cli
from tiny_llama import make_tiny_llama

COMMANDS = ["demo", "calibrate", "eval", "quantize-weights", "longctx"]


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("command,expected", [
    ("demo", ["--quick", "--device", "--seed"]),
    ("calibrate", ["--model", "--gguf", "--text", "--bits", "--out", "--rank", "--windows", "--window", "--device",
                   "--seed"]),
    ("eval", ["--model", "--gguf", "--predictors", "--text", "--window", "--step", "--max-windows", "--baselines",
              "--device", "--seed", "kivi2"]),
])
def test_command_help_explains_its_options(capsys, command, expected):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: aquakv {command}")
    for option in expected:
        assert option in out


def test_quantize_weights_is_wired_in_when_available(capsys):
    pytest.importorskip("aquakv.cli.weights")
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize-weights", "--help"])
    assert e.value.code == 0
    assert "usage: aquakv quantize-weights" in capsys.readouterr().out


def test_quantize_weights_errors_get_the_same_one_line_form(capsys, tmp_path):
    pytest.importorskip("aquakv.cli.weights")
    code, _, err = run(capsys, "quantize-weights", "--model", str(tmp_path / "none"), "--bits", "4", "--out",
                       str(tmp_path / "q"))
    assert_one_line_error(code, err, "aquakv quantize-weights: error:", "not found")


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def test_missing_text_file(capsys, tmp_path):
    code, _, err = run(capsys, "calibrate", "--text", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "p.st"),
                       "--device", "cpu", "-q")
    assert_one_line_error(code, err, "aquakv calibrate: error:", "text file not found", "nope.txt")


def test_missing_predictors_file(capsys, tmp_path):
    code, _, err = run(capsys, "eval", "--predictors", str(tmp_path / "p.safetensors"), "--device", "cpu", "-q")
    assert_one_line_error(code, err, "aquakv eval: error:", "--predictors file not found")


def test_missing_model_directory(capsys, tmp_path):
    code, _, err = run(capsys, "calibrate", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "p.st"),
                       "--device", "cpu", "-q")
    assert_one_line_error(code, err, "--model directory not found")


def test_out_must_be_a_file_in_an_existing_directory(capsys, tmp_path):
    code, _, err = run(capsys, "calibrate", "--out", str(tmp_path), "--device", "cpu", "-q")
    assert_one_line_error(code, err, "is a directory")
    code, _, err = run(capsys, "calibrate", "--out", str(tmp_path / "a" / "p.st"), "--device", "cpu", "-q")
    assert_one_line_error(code, err, "does not exist")


def test_a_model_it_cannot_load(capsys, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    code, _, err = run(capsys, "calibrate", "--model", str(tmp_path), "--out", str(tmp_path / "p.st"),
                       "--device", "cpu", "-q")
    assert_one_line_error(code, err, "cannot load a causal language model from")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda(capsys, tmp_path):
    code, _, err = run(capsys, "calibrate", "--out", str(tmp_path / "p.st"), "--device", "cuda", "-q")
    assert_one_line_error(code, err, "CUDA is not available")


def test_bad_option_values_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--predictors", "p", "--window", "0"])
    assert e.value.code == 2
    assert "must be a positive integer" in capsys.readouterr().err


# ---- end to end on the tiny model -----------------------------------------------------------------------------
class ByteTokenizer:
    """Stand-in tokenizer for the tiny model: bytes -> ids 3..255 (0..2 are pad/bos/eos)."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + b % 253 for b in text.encode()]}


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """The CLI with `load` returning the tiny Llama, and a text file of ~6k byte-tokens."""
    model = make_tiny_llama(seed=0)
    monkeypatch.setattr(cli.common, "load", lambda args: (model, ByteTokenizer()))
    text = tmp_path / "text.txt"
    gen = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "cache", "key", "value", "layer"]
    text.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (1200,), generator=gen)))
    return model, text


def test_calibrate_then_eval_on_the_tiny_model(capsys, tmp_path, tiny):
    _, text = tiny
    preds = tmp_path / "p.safetensors"
    code, out, err = run(capsys, "calibrate", "--text", str(text), "--bits", "2", "--windows", "8", "--window", "256",
                         "--out", str(preds), "--device", "cpu", "-q")
    assert code == 0, err
    assert preds.is_file() and "saved to" in out
    code, out, err = run(capsys, "eval", "--predictors", str(preds), "--text", str(text), "--window", "256",
                         "--max-windows", "2", "--baselines", "kivi2", "higgs", "quanto", "--device", "cpu", "-q")
    assert code == 0, err
    # Row labels come from aquakv.kv.registry, the same in eval and demo (HIGGS rows say "(no predictors)").
    for row in ("| fp16 (unquantized) | 16.00 |", "| AQUA-KV-2 |", "| KIVI-2 |", "| HIGGS-2 (no predictors) |"):
        assert row in out
    if "needs the `optimum-quanto` package" not in out:
        assert "QuantizedCache (quanto" in out


def test_eval_refuses_predictors_of_another_model(capsys, tmp_path, tiny):
    import aquakv

    _, text = tiny
    other = make_tiny_llama(seed=0, num_hidden_layers=2)
    path = tmp_path / "other.safetensors"
    aquakv.AquaKVPredictors.zeros(other, 2).save(path)
    code, _, err = run(capsys, "eval", "--predictors", str(path), "--text", str(text), "--device", "cpu", "-q")
    assert_one_line_error(code, err, "do not fit this model", "num_layers")


def test_eval_text_shorter_than_a_window(capsys, tmp_path, tiny):
    import aquakv

    model, _ = tiny
    short = tmp_path / "short.txt"
    short.write_text("too short")
    path = tmp_path / "p.safetensors"
    aquakv.AquaKVPredictors.zeros(model, 2).save(path)
    code, _, err = run(capsys, "eval", "--predictors", str(path), "--text", str(short), "--device", "cpu", "-q")
    assert_one_line_error(code, err, "fewer than one --window")


def test_python_dash_m_entry_point(tmp_path):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "aquakv", "eval", "--predictors", str(tmp_path / "x"), "--device",
                        "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip() == f"aquakv eval: error: --predictors file not found: {tmp_path / 'x'}"


def test_quiet_draws_no_bars_and_leaves_tqdm_as_it_was(capsys, tmp_path, monkeypatch, tiny):
    """-q reaches bars outside aquakv and transformers' switch too (the GGUF loader's plain tqdm), only while the
    command runs."""
    import tqdm

    model, text = tiny

    def load_with_a_bar(args):  # stands in for transformers' GGUF loader
        for _ in tqdm.tqdm(range(3), desc="Converting GGUF tensors"):
            pass
        return model, ByteTokenizer()

    monkeypatch.setattr(cli.common, "load", load_with_a_bar)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # bars are drawn on terminals only
    init = vars(tqdm.tqdm)["__init__"]
    code, _, err = run(capsys, "calibrate", "--text", str(text), "--windows", "4", "--window", "128",
                       "--out", str(tmp_path / "p.safetensors"), "--device", "cpu", "-q")
    assert code == 0 and "Converting" not in err and "it/s" not in err, err
    assert vars(tqdm.tqdm)["__init__"] is init
    code, _, err = run(capsys, "calibrate", "--text", str(text), "--windows", "4", "--window", "128",
                       "--out", str(tmp_path / "p.safetensors"), "--device", "cpu")
    assert code == 0 and "Converting GGUF tensors" in err


# ---- startup, option types and user errors found before any slow work -------------------------------------------
@pytest.fixture
def no_slow_work(monkeypatch):
    """Any model load fails the test: the error must be found before it."""
    def load(args):
        raise AssertionError("the model was loaded before the user error was found")

    monkeypatch.setattr(cli.common, "load", load)


@pytest.mark.parametrize("bits", ["inf", "nan", "-inf", "2.5", "0", "5", "abc"])
def test_calibrate_bits_that_no_grid_codes_are_refused_at_parse_time(capsys, tmp_path, bits):
    with pytest.raises(SystemExit) as e:
        cli.main(["calibrate", f"--bits={bits}", "--out", str(tmp_path / "p.st")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --bits:" in err and "Traceback" not in err and "_bits" not in err
    assert ("must be one of 1, 2, 3, 4" in err) or ("must be a number of bits" in err)


def test_calibrate_help_says_which_bits_are_accepted(capsys):
    with pytest.raises(SystemExit):
        cli.main(["calibrate", "--help"])
    assert "one of 1, 2, 3, 4" in " ".join(capsys.readouterr().out.split())


def test_type_errors_read_well(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--predictors", "p", "--window", "abc"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--window: must be a positive integer, got 'abc'" in err


def test_unwritable_out_directory_is_found_before_the_model_load(capsys, tmp_path, monkeypatch, no_slow_work):
    from aquakv.cli import common

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(common.tempfile, "mkstemp", refuse)  # root ignores chmod: simulate the refusal
    code, _, err = run(capsys, "calibrate", "--out", str(tmp_path / "p.st"), "--device", "cpu", "-q")
    assert_one_line_error(code, err, "--out: cannot write in directory", "Permission denied")
    assert list(tmp_path.iterdir()) == []


def test_out_probe_leaves_nothing_behind(tmp_path):
    from aquakv.cli.common import check_out_file

    assert check_out_file(str(tmp_path / "p.st")) == tmp_path / "p.st"
    assert list(tmp_path.iterdir()) == []


def test_binary_text_file_is_refused_by_name(capsys, tmp_path, no_slow_work):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    code, _, err = run(capsys, "calibrate", "--text", str(binary), "--out", str(tmp_path / "p.st"), "--device", "cpu")
    assert_one_line_error(code, err, "aquakv calibrate: error:", str(binary), "binary")
    assert not (tmp_path / "p.st").exists()


def test_directory_given_as_a_file_is_called_a_directory(capsys, tmp_path, no_slow_work):
    code, _, err = run(capsys, "calibrate", "--text", str(tmp_path), "--out", str(tmp_path / "p.st"), "--device", "cpu")
    assert_one_line_error(code, err, f"text file {tmp_path} is a directory")
    code, _, err = run(capsys, "eval", "--predictors", str(tmp_path), "--device", "cpu")
    assert_one_line_error(code, err, f"--predictors file {tmp_path} is a directory")


@pytest.mark.parametrize("content", [b"", b"just some text\n", bytes(range(256)) * 4, b"\x08\x00\x00\x00\x00\x00"])
def test_unreadable_predictors_give_one_line(capsys, tmp_path, content, no_slow_work):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    code, _, err = run(capsys, "eval", "--predictors", str(bad), "--device", "cpu")
    assert_one_line_error(code, err, "aquakv eval: error:", f"--predictors {bad}")


def test_unknown_baseline_lists_the_registry(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--predictors", "p", "--baselines", "kivi3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'kivi3'" in err and "'kivi2'" in err and "'higgs3'" in err


def test_calibrate_names_both_bit_counts_and_eval_counts_windows_right(capsys, tmp_path, tiny):
    _, text = tiny
    preds = tmp_path / "p.safetensors"
    code, out, err = run(capsys, "calibrate", "--text", str(text), "--bits", "2", "--windows", "4", "--window", "128",
                         "--out", str(preds), "--device", "cpu", "-q")
    assert code == 0, err
    line = [x for x in out.splitlines() if x.startswith("compressed part")][0]
    nominal, held = (float(x.split()[0]) for x in line.removeprefix("compressed part ").split("; all bytes held "))
    assert held > nominal  # the fp16 sinks and buffer cost more than 2-bit codes
    code, out, err = run(capsys, "eval", "--predictors", str(preds), "--text", str(text), "--window", "128",
                         "--max-windows", "1", "--device", "cpu", "-q")
    assert code == 0, err
    assert "on 1 window of 128 tokens" in out
    aqua = [x for x in out.splitlines() if x.startswith("| AQUA-KV-2 |")][0]
    assert float(aqua.split("|")[2]) == pytest.approx(held, abs=0.01)  # the same cache, the same bytes


def test_eval_plot(capsys, tmp_path, tiny):
    pytest.importorskip("matplotlib")
    import aquakv

    model, text = tiny
    path = tmp_path / "p.safetensors"
    aquakv.AquaKVPredictors.zeros(model, 2).save(path)
    code, _, err = run(capsys, "eval", "--predictors", str(path), "--text", str(text), "--window", "128",
                       "--max-windows", "1", "--plot", str(tmp_path / "a.txt"), "--device", "cpu", "-q")
    assert_one_line_error(code, err, "--plot", ".png")
    code, out, err = run(capsys, "eval", "--predictors", str(path), "--text", str(text), "--window", "128",
                         "--max-windows", "1", "--plot", str(tmp_path / "ppl.png"), "--device", "cpu", "-q")
    assert code == 0, err
    assert (tmp_path / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupted_save_leaves_nothing_half_written(capsys, tmp_path, tiny, monkeypatch):
    from aquakv.kv import AquaKVPredictors

    _, text = tiny

    def save_then_interrupt(self, path):
        open(path, "wb").write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(AquaKVPredictors, "save", save_then_interrupt)
    code, _, err = run(capsys, "calibrate", "--text", str(text), "--windows", "2", "--window", "128",
                       "--out", str(tmp_path / "p.safetensors"), "--device", "cpu", "-q")
    assert code == 130 and "interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt"]
