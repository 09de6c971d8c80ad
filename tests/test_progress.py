"""aquakv.progress: tqdm on a terminal, plain periodic lines on a redirected stderr, nothing when disabled."""

import io

import pytest

from aquakv.progress import LineProgress, progress


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_redirected_stream_gets_a_line_per_interval_and_one_at_the_end():
    clock, out = FakeClock(), io.StringIO()
    seen = []
    for i in progress(range(24), desc="calibrating", unit="layer", stream=out, clock=clock):
        seen.append(i)
        clock.t += 4.0  # 4 s a step: a line at most every 10 s -> after steps 3, 6, ... (12 s, 24 s, ...)
    assert seen == list(range(24))
    lines = out.getvalue().splitlines()
    assert lines[0] == "calibrating: 3/24 layer, 12 s elapsed, ~84 s left"
    # one per 12 s of the 96 s, except at 96 s, where the run is complete and only the closing line is written
    assert len(lines) == 24 * 4 // 12 - 1 + 1
    assert lines[-1] == "calibrating: 24/24 layer, 96 s elapsed, done"
    assert "\r" not in out.getvalue()


def test_no_line_before_the_interval_except_the_last():
    clock, out = FakeClock(), io.StringIO()
    with progress(total=5, desc="eval", unit="window", stream=out, clock=clock) as bar:
        for _ in range(5):
            clock.t += 1.0
            bar.update(1)
    assert out.getvalue().splitlines() == ["eval: 5/5 window, 5 s elapsed, done"]


def test_postfix_unknown_total_and_a_stopped_run():
    clock, out = FakeClock(), io.StringIO()
    bar = progress(desc="fit", stream=out, clock=clock)
    clock.t += 11
    bar.set_postfix_str("loss 0.5")
    bar.update(2)
    bar.close()
    bar.close()  # closing twice writes once
    assert out.getvalue().splitlines() == ["fit: 2 it, 11 s elapsed, loss 0.5", "fit: 2 it, 11 s elapsed, done, loss 0.5"]

    out = io.StringIO()
    with pytest.raises(KeyError):
        with progress(total=10, desc="x", stream=out, clock=clock) as bar:
            bar.update(3)
            raise KeyError
    assert out.getvalue().splitlines() == ["x: 3/10 it, 0 s elapsed, stopped"]


def test_long_runs_are_shown_in_minutes():
    clock, out = FakeClock(), io.StringIO()
    with progress(total=4, desc="pv", unit="step", stream=out, clock=clock) as bar:
        clock.t += 600
        bar.update(1)
    assert out.getvalue().splitlines()[0] == "pv: 1/4 step, 10.0 min elapsed, ~30.0 min left"


def test_disabled_draws_nothing_but_still_iterates_and_counts():
    for stream in (io.StringIO(), Tty()):
        clock = FakeClock()
        bar = progress(range(3), desc="quiet", enabled=False, stream=stream, clock=clock)
        clock.t += 50
        assert list(bar) == [0, 1, 2]
        assert bar.n == 3
        assert stream.getvalue() == ""


def test_terminal_gets_a_tqdm_bar_on_that_stream():
    from tqdm import tqdm

    tty = Tty()
    bar = progress(range(4), desc="bar", unit="layer", stream=tty)
    assert isinstance(bar, tqdm)
    assert list(bar) == [0, 1, 2, 3]
    assert "bar" in tty.getvalue() and "4/4" in tty.getvalue()
    assert isinstance(progress(total=2, desc="x", stream=io.StringIO()), LineProgress)


def test_terminal_bar_shows_even_when_third_party_bars_are_off():
    import functools

    import tqdm

    init = vars(tqdm.tqdm)["__init__"]
    tqdm.tqdm.__init__ = functools.partialmethod(init, disable=True)  # what cli.common.bars_off does
    try:
        tty = Tty()
        list(progress(range(2), desc="ours", stream=tty))
    finally:
        tqdm.tqdm.__init__ = init
    assert "ours" in tty.getvalue()


def test_default_stream_is_stderr_at_call_time(capsys):
    with progress(total=1, desc="late", unit="x") as bar:
        bar.update(1)
    assert "late: 1/1 x" in capsys.readouterr().err


def test_progress_imports_nothing_else_of_aquakv():
    import ast
    import pathlib

    import aquakv.progress as mod

    tree = ast.parse(pathlib.Path(mod.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.startswith("aquakv")]
