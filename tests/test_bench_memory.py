"""bench/bench_memory.py: the child's JSON row, the compressed cache holding less than fp16, a failing child
reported with its stderr, and the parent's table. Tiny random shape: seconds."""
from __future__ import annotations

import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
import bench_memory  # noqa: E402

# 256 tokens: past the 4 sinks + 128-token buffer, so the compressed caches really hold a quantized chunk.
CONTEXT = 256
FIELDS = {"cache", "label", "context", "chunk", "tokens", "device", "dtype", "threads", "baseline_bytes",
          "peak_added_bytes", "peak_added_after_prefill_bytes", "end_added_bytes", "nbytes", "prefill_s",
          "ms_per_token", "peak_note"}


@pytest.fixture(scope="module")
def rows() -> dict[str, dict]:
    return {name: bench_memory.measure(name, CONTEXT, chunk=64, tokens=3, random_weights=True, shape="tiny")
            for name in ("fp16", "higgs-2")}


def test_child_row_has_every_field_and_sane_values(rows):
    for name, row in rows.items():
        assert set(row) == FIELDS
        assert row["cache"] == name and row["context"] == CONTEXT and row["tokens"] == 3
        # /proc's RSS counters lag by a few pages per thread: the decode peak may read a hair below the prefill's.
        assert row["baseline_bytes"] > 0 and row["peak_added_bytes"] >= row["peak_added_after_prefill_bytes"] - 2**20
        assert row["prefill_s"] > 0 and row["ms_per_token"] > 0
        json.dumps(row)  # what the child prints must be one JSON line


def test_compressed_cache_holds_fewer_bytes_than_fp16(rows):
    cfg = bench_memory.SHAPES["tiny"]
    fp16_bytes = 2 * 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * (CONTEXT + 3)
    assert rows["fp16"]["nbytes"] == fp16_bytes  # keys + values, fp16, every token incl. the decoded ones
    assert rows["higgs-2"]["nbytes"] < 0.6 * rows["fp16"]["nbytes"]


def test_failing_child_is_reported_with_its_stderr(tmp_path):
    missing = str(tmp_path / "no-such-predictors.safetensors")
    args = bench_memory.parse_args(["--random-weights", "--shape", "tiny", "--threads", "1"])
    row = bench_memory.run_child(bench_memory.child_argv(args, "aqua-kv-2", 64, missing))
    assert "child exited with status" in row["error"]
    assert "no-such-predictors" in row["stderr_tail"] and "Traceback" in row["stderr_tail"]
    assert "FAILED" in bench_memory.table(64, [{**row, "cache": "aqua-kv-2", "context": 64}])


def test_child_subprocess_prints_one_json_row():
    args = bench_memory.parse_args(["--random-weights", "--shape", "tiny", "--threads", "1", "--chunk", "32",
                                    "--tokens", "2"])
    row = bench_memory.run_child(bench_memory.child_argv(args, "kivi-2", 64, None))
    assert "error" not in row, row.get("stderr_tail")
    assert set(row) == FIELDS and row["cache"] == "kivi-2" and row["chunk"] == 32


def test_table_ratio_is_against_fp16(rows):
    text = bench_memory.table(CONTEXT, [rows["fp16"], rows["higgs-2"]])
    ratio = rows["higgs-2"]["peak_added_bytes"] / rows["fp16"]["peak_added_bytes"]
    assert f"| {ratio:.2f} |" in text and "| 1.00 |" in text
    assert text.count("\n| ") == 3  # header + two rows


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        bench_memory.parse_args(["--chunk", "0"])
    with pytest.raises(SystemExit):
        bench_memory.parse_args(["--shape", "8b"])  # a shape needs --random-weights
    with pytest.raises(SystemExit, match="unknown cache"):
        bench_memory.measure("nope", 16, random_weights=True, shape="tiny")
