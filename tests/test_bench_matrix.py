"""bench/bench_matrix.py on the tiny random Llama with 192-token windows and two synthetic domains (seconds): every
cell is measured and classified, the report leads with off-domain numbers, the noise rows appear, and bad options,
short domains and windows too short to quantize anything are refused."""
from __future__ import annotations

import json
import os
import random
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
import bench_matrix  # noqa: E402
import matrix_report  # noqa: E402
from tiny_llama import make_tiny_llama  # noqa: E402

WINDOW = 192  # past the 4 sinks + 128-token buffer: every compressed cache quantizes a chunk in each window


class ByteTokenizer:
    """One token per byte, ids 3..255 (the tiny model's vocabulary), EOS 2."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + b % 253 for b in text.encode()]}


def synthetic_load(words: int = 1200):
    """Two domains with different letters, so off-domain calibration is visibly another text."""
    alphabets = {"vowels": "aeiou", "consonants": "bcdfghklmnprst"}

    def load(name: str, split: str) -> list[str]:
        if name not in alphabets:
            raise ValueError(f"unknown text domain {name!r}")
        rng = random.Random(f"{name}-{split}")
        return [" ".join("".join(rng.choices(alphabets[name], k=rng.randint(2, 6))) for _ in range(words))]
    return load


def settings(**kw) -> bench_matrix.MatrixSettings:
    base = dict(domains=["vowels", "consonants"], calibrations=["vowels", "mix"],
                methods=["aquakv2", "aquakv3", "higgs2", "kivi2"], eval_windows=2, calib_windows=3, window=WINDOW,
                step=32, seed=0, noise_seeds=[1])
    return bench_matrix.MatrixSettings(**{**base, **kw})


def run(tmp_path, s, load=None):
    return bench_matrix.run_matrix(make_tiny_llama(), ByteTokenizer(), s, tmp_path, dict(
        command="test", device="cpu", date="today", model="tiny"), load=load or synthetic_load(), progress=False)


def test_every_cell_is_measured_classified_and_reported(tmp_path):
    results = run(tmp_path, settings())
    assert results["complete"] and json.loads((tmp_path / "results.json").read_text()) == results
    main = matrix_report.main_cells(results)
    # 2 data-free methods x 2 domains, 2 AQUA-KV widths x 2 calibrations x 2 domains.
    assert len(main) == 4 + 8
    kinds = {(c["method"], c["calibration"], c["evaluation"]): c["kind"] for c in main}
    assert kinds[("aquakv2", "vowels", "vowels")] == "in-domain"
    assert kinds[("aquakv2", "vowels", "consonants")] == "off-domain"
    assert kinds[("aquakv3", "mix", "vowels")] == "mix" and kinds[("kivi2", None, "vowels")] == "data-free"
    for c in results["cells"]:
        ref = results["reference"][c["evaluation"]]["ppl"]
        assert c["relative"] == pytest.approx(c["ppl"] / ref - 1) and c["n_windows"] == 2
        assert 0 < c["bits_per_value"] < 16
    # The noise: AQUA-KV-2 [vowels] and HIGGS-2 re-drawn at seed 1 on both domains.
    noise = matrix_report.noise_rows(results)
    assert {r["cell"] for r in noise} == {"AQUA-KV-2 [vowels] on vowels", "AQUA-KV-2 [vowels] on consonants",
                                          "HIGGS-2 (no predictors) on vowels", "HIGGS-2 (no predictors) on consonants"}
    assert all(r["seeds"] == [0, 1] and r["spread"] > 0 for r in noise)
    md = (tmp_path / "matrix.md").read_text()
    assert md.index("off-domain mean") < md.index("in-domain mean") < md.index("[+") and "Incomplete" not in md
    assert "| AQUA-KV-3 [mix] |" in md and "| fp16 perplexity (reference) |" in md


def test_the_matrix_is_deterministic(tmp_path):
    s = settings(methods=["aquakv2"], calibrations=["consonants"], noise_seeds=[], eval_windows=1)
    first = run(tmp_path / "a", s)["cells"]
    again = run(tmp_path / "b", s)["cells"]
    assert [c["ppl"] for c in first] == [c["ppl"] for c in again]


def test_heatmap_is_written_from_the_results_alone(tmp_path):
    pytest.importorskip("matplotlib")
    results = dict(command="c", device="d", date="t", model="m", complete=False, reference={
        "x": {"ppl": 10.0}, "y": {"ppl": 20.0}}, settings=dict(settings(domains=["x", "y"]).__dict__), cells=[
        dict(label="AQUA-KV-2", calibration=c, evaluation=e, seed=0, kind=matrix_report.cell_kind(c, e),
             relative=r, bits_per_value=2.3) for c, e, r in [("x", "x", 0.01), ("x", "y", 0.03), ("mix", "y", 0.02)]])
    (tmp_path / "results.json").write_text(json.dumps(results))
    bench_matrix.render(tmp_path / "results.json")
    assert (tmp_path / "matrix.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "matrix.md").read_text()
    assert "Incomplete" in md and "| AQUA-KV-2 [mix] | not measured | +2.00% |" in md
    assert "| AQUA-KV-2 | 2.30 | +3.00% | +3.00% | +2.00% | +2.00% | +1.00% |" in md


@pytest.mark.parametrize("change, message", [
    (dict(domains=["vowels"]), "at least two different domains"),
    (dict(calibrations=["poetry"]), "'poetry' is neither one of --domains"),
    (dict(methods=["aquakv4"]), "unknown method 'aquakv4'"),
    (dict(eval_windows=0), "--eval-windows must be >= 1"),
    (dict(noise_seeds=[0]), "must differ from each other and from --seed 0"),
    (dict(methods=["kivi2"], noise_seeds=[1]), "add one of them to --methods"),
    (dict(noise_calibration="consonants"), "is not among --calibrations"),
])
def test_bad_options_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        settings(**change).check()


def test_short_sets_and_windows_are_refused_before_measuring(tmp_path):
    with pytest.raises(ValueError, match=r"domain 'vowels': its evaluation part has \d+ tokens, fewer than "
                                         r"--eval-windows 200"):
        run(tmp_path, settings(eval_windows=200))
    with pytest.raises(ValueError, match=r"calibration set 'vowels' holds \d+ windows of 192 tokens, fewer than "
                                         r"--calib-windows 99"):
        run(tmp_path, settings(calib_windows=99, methods=["aquakv2"], noise_seeds=[]))
    with pytest.raises(ValueError, match="nothing was quantized in a 64-token window"):
        run(tmp_path, settings(window=64, methods=["higgs2"], noise_seeds=[]))


def test_the_command_line_refuses_before_loading_a_model(capsys):
    with pytest.raises(SystemExit, match="at least two different domains"):
        bench_matrix.main(["--domains", "code", "--out", "unused"])
