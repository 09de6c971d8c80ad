"""Shared bits of the Python benchmarks: the header every run prints, and timing."""
from __future__ import annotations

import datetime
import platform
import shlex
import sys
from typing import Callable

import torch
import torch.utils.benchmark as tbench


def print_header(device: str) -> None:
    """The command that produced the output, the machine and the date (benchmarks say where they come from)."""
    print(f"command: python {shlex.join(sys.argv)}")
    where = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()}, " \
        f"{torch.get_num_threads()} threads"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"device: {device} ({where}); torch {torch.__version__}; {now}\n")


def median_ms(fn: Callable[[], object], min_run_time: float = 1.0) -> float:
    """Median wall time of fn in ms (torch.utils.benchmark: warm-up, blocks of runs, CUDA synchronised)."""
    fn()  # warm-up: first-call allocation and lazy init stay out of the numbers
    return tbench.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median * 1e3


def gbs(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9
