"""bench/bench_cache.py end to end on the tiny random shape (seconds): every cache row runs, decodes and holds fewer
bytes than fp16 once a chunk is quantized."""
from __future__ import annotations

import os
import re
import sys

import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
import bench_cache  # noqa: E402


def test_every_row_decodes_and_compresses(monkeypatch, capsys):
    threads = torch.get_num_threads()
    # 512 tokens: past the 4 sinks + 128-token buffer, so every compressed cache holds quantized chunks.
    monkeypatch.setattr(sys, "argv", ["bench_cache.py", "--random-weights", "--shape", "tiny", "--contexts", "512",
                                      "--tokens", "2", "--threads", "1"])
    try:
        bench_cache.main()
    finally:
        torch.set_num_threads(threads)
    rows = re.findall(r"^\| 512 \| (.+?) \| ([\d.]+) \| ([\d.]+)x \| ([\d.]+) MiB \|$", capsys.readouterr().out, re.M)
    names = [r[0] for r in rows]
    assert names[0] == "fp16 (unquantized)" and len(names) == len(set(names)) == 13
    assert {"AQUA-KV-2, bf16 predictors", "AQUA-KV-2, per-head", "AQUA-KV-2, blockwise, bf16 predictors"} <= set(names)
    fp16_mib = float(rows[0][3])
    for name, ms, _, mib in rows[1:]:
        assert float(ms) > 0 and float(mib) < fp16_mib, name
