"""The validation guard of pv_tune on a tiny random Llama: a deliberately unstable run stops early and returns the
best state it saw; the model returned is never worse on the validation windows than the one passed in; the code
step follows the loss; a resumed run with the guard equals an uninterrupted one."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from aquakv.evaluation.perplexity import evaluate_perplexity
from aquakv.weights import pv_tune, quantize_model
from aquakv.weights.pv.guard import ValidationGuard, split_validation
from aquakv.weights.quantize import higgs_layers
from tiny_llama import make_tiny_llama, random_token_windows

GROUP = 64
WINDOW = 64
# Far past stable: every code re-encoded from a W~ that moves 3 weight units a step (the tiny model's weights are
# ~0.02), no trust region. The first steps already wreck the model; the test does not depend on how fast.
UNSTABLE = dict(method="ste", code_lr=3.0, lr=0.3, max_code_change_per_step=1.0, code_trust_ratio=100.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread_and_rng_untouched():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher():
    return make_tiny_llama(seed=3)


@torch.no_grad()
def _sampled(model, count: int, seed: int) -> torch.Tensor:
    """`count` windows drawn from the teacher itself: text it predicts well (its perplexity is far below that
    of random tokens), so a damaged student shows as a rise in perplexity, as on real text with a real model."""
    gen = torch.Generator().manual_seed(seed)
    seq = torch.cat(random_token_windows(count, 1, seed=seed)).view(count, 1)
    while seq.shape[1] < WINDOW:
        probs = torch.softmax(model(seq).logits[:, -1].float() * 2.0, dim=-1)  # temperature 0.5
        seq = torch.cat([seq, torch.multinomial(probs, 1, generator=gen)], dim=1)
    return seq.reshape(-1)


@pytest.fixture(scope="module")
def ids(teacher):
    return _sampled(teacher, 8, seed=2)


@pytest.fixture(scope="module")
def validation(teacher):
    return _sampled(teacher, 2, seed=7)


def _student(teacher):
    return quantize_model(copy.deepcopy(teacher), bits=2, group_size=GROUP, progress=False)


def _state(model):
    return {n: (m.codes.clone(), m.scales.clone()) for n, m in higgs_layers(model).items()}


def _ppl(model, ids) -> float:
    return evaluate_perplexity(model, ids, window=WINDOW, step=None, progress=False).ppl


def _run(teacher, ids, student=None, **kw):
    student = student or _student(teacher)
    settings = dict(steps=12, batch_size=2, window=WINDOW, seed=0, progress=False, validate_every=2)
    return student, pv_tune(student, teacher, ids, **{**settings, **kw})


def test_an_unstable_run_stops_early_and_returns_the_best_state(teacher, ids, validation):
    start = _student(teacher)
    student, result = _run(teacher, ids, student=copy.deepcopy(start), validation=validation, **UNSTABLE)
    assert result.stopped is not None and "validation perplexity" in result.stopped
    assert result.steps < 12, "the run must end before its last step"
    assert result.val_steps[0] == 0 and result.val_start == pytest.approx(_ppl(start, validation), rel=1e-6)
    assert max(result.val_ppl) > 1.25 * min(result.val_ppl)
    # What comes back is the best state seen, and it is what the result says it is.
    assert result.val_final == min(result.val_ppl) <= result.val_start
    assert _ppl(student, validation) == pytest.approx(result.val_final, rel=1e-6)
    if result.best_step == 0:
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                   for a, b in zip(_state(start).values(), _state(student).values()))


def test_keep_best_false_returns_the_last_state_as_asked(teacher, ids, validation):
    student, result = _run(teacher, ids, validation=validation, keep_best=False, **UNSTABLE)
    assert result.stopped is not None
    assert result.val_final == result.val_ppl[-1] > result.val_start
    assert _ppl(student, validation) == pytest.approx(result.val_final, rel=1e-6)


def test_defaults_never_return_a_model_worse_on_validation(teacher, ids):
    """Default settings, the validation slice held out of the training windows."""
    start = _student(teacher)
    student, result = _run(teacher, ids, student=copy.deepcopy(start), steps=6, validate_every=2)
    held = ids.view(-1, WINDOW)[-2:].reshape(-1)  # 8 windows: the last 8 // 4 = 2 are held out
    assert result.val_start == pytest.approx(_ppl(start, held), rel=1e-6)
    assert result.val_final <= result.val_start
    assert _ppl(student, held) == pytest.approx(result.val_final, rel=1e-6)
    assert result.val_steps == [0, 2, 4, 6] and len(result.code_lr) == 6


def test_the_code_step_follows_the_loss_and_backs_off(teacher, ids):
    _, result = _run(teacher, ids, steps=4, validate_every=None, code_lr_per_nat=1e-2)
    for i, rate in enumerate(result.code_lr):
        recent = result.loss[max(0, i - 4): i + 1]
        assert rate == pytest.approx(1e-2 * sum(recent) / len(recent), rel=1e-9)
    guard = ValidationGuard(ids.view(-1, WINDOW)[:1], every=1, stop_rise=0.5, backoff=0.5, keep_best=True)
    for step, ppl in enumerate([10.0, 9.0, 9.5, 8.0, 8.5, 8.6]):
        guard.observe(step, ppl, dict)
    assert guard.best_step == 3 and guard.step_scale() == 0.5 ** 3
    assert guard.observe(6, 8.0 * 1.6, dict).stop and guard.observe(7, math.nan, dict).stop


def test_split_validation_holds_out_the_tail_and_refuses_one_window():
    windows = torch.arange(40).view(10, 4)
    train, held = split_validation(windows, 4)
    assert torch.equal(held, windows[8:]) and torch.equal(train, windows[:8])  # at most a quarter
    with pytest.raises(ValueError, match="validate_every=None"):
        split_validation(windows[:1], 4)


def test_bad_guard_options_are_refused(teacher, ids, validation):
    for bad in (dict(validate_every=0), dict(stop_rise=-1.0), dict(backoff=0.0), dict(backoff=1.5),
                dict(validation_windows=0), dict(code_lr_per_nat=0.0), dict(validate_every=None, validation=validation)):
        with pytest.raises(ValueError, match="pv_tune"):
            _run(teacher, ids, steps=1, **bad)


@pytest.mark.parametrize("method", ["pv", "p-only"])
def test_resume_with_the_guard_equals_an_uninterrupted_run(teacher, ids, tmp_path, method):
    kw = dict(method=method, validate_every=2, stop_rise=0.01)  # a tight stop rule: the stop must resume too
    whole, r_whole = _run(teacher, ids, steps=6, **kw)
    _run(teacher, ids, steps=3, checkpoint_dir=tmp_path, checkpoint_every=1, **kw)
    resumed, r_res = _run(teacher, ids, steps=6, checkpoint_dir=tmp_path, resume=True, **kw)
    assert (r_res.loss, r_res.val_ppl, r_res.best_step, r_res.stopped) == (
        r_whole.loss, r_whole.val_ppl, r_whole.best_step, r_whole.stopped)
    for (n, x), y in zip(_state(whole).items(), _state(resumed).values()):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]), n
