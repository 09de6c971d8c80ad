"""Progress of `evaluate_long_perplexity` inside one long window (the periodic line of a redirected log)."""
import io

import aquakv.longctx.longppl as longppl
import torch
from aquakv.kv import Fp16Cache
from aquakv.longctx import evaluate_long_perplexity
from aquakv.progress import LineProgress
from tiny_llama import make_tiny_llama, random_token_windows


def test_long_perplexity_reports_progress_inside_a_window(monkeypatch):
    """One 8k window takes minutes per cache on a loaded CPU: the redirected log gets a line every interval from
    inside the window (which forward it is at), not only when the window is done."""
    model = make_tiny_llama(seed=0)
    out, now = io.StringIO(), [0.0]

    def clock():  # every reading is 11 s later: each update is past the 10 s interval
        now[0] += 11.0
        return now[0]

    monkeypatch.setattr(longppl, "progress_bar",
                        lambda it, **kw: LineProgress(it, total=len(it), stream=out, clock=clock, interval=10.0,
                                                      **{k: kw[k] for k in ("desc", "unit", "enabled")}))
    ids = torch.cat(random_token_windows(1, 192, seed=3))
    evaluate_long_perplexity(model, ids, Fp16Cache, window=192, prefill=128, chunk=64, step=32, desc="fp16 @ 192")
    lines = out.getvalue().splitlines()
    # prefill 128 in 2 pieces of 64, then 64 stepped tokens in 2 pieces of 32: 4 forwards
    assert [ln.rsplit(", ", 1)[-1] for ln in lines[:-1]] == [f"forward {i}/4" for i in range(1, 5)]
    assert lines[0].startswith("fp16 @ 192: 0/1 window, ")
    assert lines[-1].startswith("fp16 @ 192: 1/1 window, ") and lines[-1].endswith(" elapsed, done")
