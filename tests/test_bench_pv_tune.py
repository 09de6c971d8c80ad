"""bench/bench_pv_tune.py's --plot-from refuses directories that hold no bench report in one line."""
from __future__ import annotations

import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
import bench_pv_tune  # noqa: E402


def test_plot_from_a_directory_without_a_report_is_refused_in_one_line(tmp_path):
    (tmp_path / "dp3").mkdir()
    with pytest.raises(SystemExit) as e:
        bench_pv_tune.main(["--plot-from", str(tmp_path / "dp3"), str(tmp_path / "none"), "--out", str(tmp_path / "all")])
    message = str(e.value.code)
    assert message.startswith("--plot-from: no pv_bench.json in ") and "\n" not in message
    assert str(tmp_path / "dp3") in message and str(tmp_path / "none") in message
    assert not (tmp_path / "all").exists()
