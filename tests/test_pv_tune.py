"""PV-Tuning (aquakv.weights.pv.tune) on a tiny random Llama: the V step's limits, the three methods, determinism,
checkpoints, the saved format, and encode_with_scales against higgs_quantize."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from aquakv import ops
from aquakv.grids import available_grids, get_grid
from aquakv.quantizer import random_signs
from aquakv.weights import (
    encode_with_scales,
    load_quantized,
    pv_tune,
    quantize_model,
    save_quantized,
)
from aquakv.weights.linear import HiggsLinear, flat_groups
from aquakv.weights.pv.loss import kl_window_loss
from aquakv.weights.pv.step import max_changes, rotate_normalise, v_step_codes
from aquakv.weights.quantize import higgs_layers
from tiny_llama import make_tiny_llama, random_token_windows

GROUP = 64  # the tiny model's in-features are 64 and 128: one or two groups per row


@pytest.fixture(autouse=True, scope="module")
def one_thread_and_rng_untouched():
    """Tiny matrices: a second thread only adds synchronisation, which on a shared 2-core machine costs 10x. The
    global RNG is restored afterwards, so later modules that draw unseeded numbers see what they saw before."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]):
        yield
    torch.set_num_threads(threads)


# ---- encode_with_scales ---------------------------------------------------------------------------------------------
def _exact_norm_groups(rows: int, group: int, seed: int) -> torch.Tensor:
    """Groups of +-1 and +-3 times a power of two, arranged so every group norm is an integer times that power:
    the kernel's fp32 norm is then exact and equal to its fp16 scale, and so is the Hadamard transform, so
    higgs_quantize and encode_with_scales search from bit-identical y and must agree on every code."""
    threes = {64: 10, 256: 18}[group]  # 54 + 9*10 = 144 = 12^2; 238 + 9*18 = 400 = 20^2
    gen = torch.Generator().manual_seed(seed)
    mags = torch.ones(rows, group)
    for r in range(rows):
        mags[r, torch.randperm(group, generator=gen)[:threes]] = 3.0
    signs = torch.randint(0, 2, (rows, group), generator=gen) * 2.0 - 1.0
    return mags * signs * 2.0 ** torch.randint(-8, 4, (rows, 1), generator=gen).float()


@pytest.mark.parametrize("grid_dn", available_grids(), ids=lambda g: f"d{g[0]}_n{g[1]}")
@pytest.mark.parametrize("group", [64, 256])
def test_encode_with_scales_equals_higgs_quantize_when_the_scales_are_the_group_norms(grid_dn, group):
    d, n = grid_dn
    grid, signs = get_grid(d, n), random_signs(group, 7)
    x = _exact_norm_groups(24, group, seed=d * 1000 + n).reshape(6, 4 * group)  # 4 groups per row
    codes, scales = torch.ops.aquakv.higgs_quantize(x, grid, signs, group)
    norms = x.reshape(-1, group).norm(dim=1).reshape(scales.shape)
    assert torch.equal(scales.float(), norms), "the construction must make the fp16 scales the exact norms"
    assert torch.equal(encode_with_scales(x, scales, grid, signs, group), codes)


@pytest.mark.parametrize("grid_dn", [(1, 4), (2, 16), (2, 64), (4, 256)], ids=str)
def test_encode_with_scales_depends_on_the_scales_only_through_y(grid_dn):
    # Doubling x and its scales together leaves y = H(Dx)/s bit-identical (powers of two are exact) ...
    grid, signs = get_grid(*grid_dn), random_signs(GROUP, 1)
    x = torch.randn(8, 2 * GROUP, generator=torch.Generator().manual_seed(3))
    scales = (x.reshape(8, 2, GROUP).norm(dim=-1) * 1.3).half()
    codes = encode_with_scales(x, scales, grid, signs, GROUP)
    assert torch.equal(encode_with_scales(2 * x, (2 * scales.float()).half(), grid, signs, GROUP), codes)
    # ... and each code is the nearest grid point to y under the GIVEN scales (float64 truth; no near-ties here).
    y = rotate_normalise(x, scales, signs, GROUP).double().reshape(-1, grid_dn[0])
    dist = (y[:, None, :] - grid.double()[None]).square().sum(-1)
    best = dist.argmin(dim=1)
    two = dist.topk(2, dim=1, largest=False).values
    clear = (two[:, 1] - two[:, 0]) > 1e-4
    got = ops.unpack_bits(codes, round(math.log2(grid_dn[1])), 2 * GROUP // grid_dn[0]).reshape(-1).long()
    assert clear.float().mean() > 0.99
    assert torch.equal(got[clear], best[clear])


# ---- the V step of one layer ----------------------------------------------------------------------------------------
def _layer(seed: int = 0, bits: float = 2, dim: int = 2) -> HiggsLinear:
    torch.manual_seed(seed)
    return HiggsLinear.from_linear(torch.nn.Linear(128, 96, bias=False), bits=bits, dim=dim, group_size=GROUP)


def _v_step(layer: HiggsLinear, noise: float, **kw):
    w = layer.dequantize_weight().float()
    target = w + noise * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
    grid, signs = layer.quantizer.grid_and_signs(w.device)
    return v_step_codes(flat_groups(target, GROUP), layer.codes, layer.scales, grid, signs, GROUP,
                        weight_norm=float(w.norm()), **kw), w


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.05, 0.3])
@pytest.mark.parametrize("dim", [1, 2, 4])
def test_v_step_changes_at_most_the_stated_fraction(fraction, dim):
    layer = _layer(dim=dim)
    n_codes = layer.codes.shape[0] * GROUP // dim
    out, _ = _v_step(layer, 1.0, max_code_change_per_step=fraction, code_trust_ratio=10.0)
    old = ops.unpack_bits(layer.codes, layer.grid.code_bits, GROUP // dim)
    new = ops.unpack_bits(out.codes, layer.grid.code_bits, GROUP // dim)
    assert int((old != new).sum()) == out.changed
    assert 1 <= out.changed <= max_changes(n_codes, fraction) == math.ceil(fraction * n_codes)


@pytest.mark.parametrize("trust", [1e-9, 0.002, 0.01, 0.05])
def test_v_step_respects_the_trust_ratio_and_keeps_at_least_one_change(trust):
    layer = _layer(seed=1)
    out, w = _v_step(layer, 1.0, max_code_change_per_step=0.2, code_trust_ratio=trust)
    layer_new = copy.deepcopy(layer)
    layer_new.codes.copy_(out.codes)
    moved = float((layer_new.dequantize_weight() - w).norm())
    assert out.changed >= 1
    assert moved == pytest.approx(out.moved, rel=1e-3)  # the reported move is the real one
    if out.changed > 1:
        assert moved <= trust * float(w.norm()) * (1 + 1e-4)
    free, _ = _v_step(layer, 1.0, max_code_change_per_step=0.2, code_trust_ratio=100.0)
    assert out.changed <= free.changed
    if trust == 1e-9:
        assert out.changed == 1


@pytest.mark.parametrize("dim", [1, 2, 4])
def test_ste_v_step_reencodes_every_code_and_reports_the_real_move(dim):
    layer = _layer(seed=2, dim=dim)
    out, w = _v_step(layer, 1.0, max_code_change_per_step=0.01, code_trust_ratio=1e-9, select=False)
    grid, signs = layer.quantizer.grid_and_signs(w.device)
    target = w + 1.0 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out.codes, encode_with_scales(flat_groups(target, GROUP), layer.scales, grid, signs, GROUP))
    old = ops.unpack_bits(layer.codes, layer.grid.code_bits, GROUP // dim).long()
    new = ops.unpack_bits(out.codes, layer.grid.code_bits, GROUP // dim).long()
    assert out.changed == int((old != new).sum()) > 1 and out.candidates == old.numel()  # no selection, no limit
    # The move summed over all codes (unchanged ones add 0) is the one reported, computed on the changed ones only.
    every = (grid[new] - grid[old]).square().sum(-1) * (layer.scales.float().square() / GROUP)
    assert out.moved == pytest.approx(float(every.sum().sqrt()), rel=1e-6)
    layer_new = copy.deepcopy(layer)
    layer_new.codes.copy_(out.codes)
    assert float((layer_new.dequantize_weight() - w).norm()) == pytest.approx(out.moved, rel=1e-3)


# ---- whole runs on the tiny model -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher():
    return make_tiny_llama(seed=3)


@pytest.fixture(scope="module")
def ids():
    return torch.cat(random_token_windows(6, 64, seed=2))


def _student(teacher):
    return quantize_model(copy.deepcopy(teacher), bits=2, group_size=GROUP, progress=False)


def _run(teacher, ids, method="pv", steps=4, student=None, **kw):
    student = student or _student(teacher)
    # The guard is off here: these tests are about the steps themselves (the guard has its own tests below).
    settings = dict(batch_size=2, window=64, lr=3e-3, code_lr=3e-2, max_code_change_per_step=0.02,
                    code_trust_ratio=0.2, seed=0, progress=False, validate_every=None)
    result = pv_tune(student, teacher, ids, steps=steps, method=method, **{**settings, **kw})
    return student, result


def _codes(model):
    return {n: m.codes.clone() for n, m in higgs_layers(model).items()}


def _state(model):
    return {n: (m.codes.clone(), m.scales.clone()) for n, m in higgs_layers(model).items()}


def test_loss_decreases_and_codes_stay_valid(teacher, ids):
    batch = ids[:128].view(2, 64)
    start = _student(teacher)
    with torch.no_grad():
        before = float(kl_window_loss(start, teacher, batch))
    student = _student(teacher)
    flags = [p.requires_grad for p in student.parameters()]
    student, result = _run(teacher, batch.reshape(-1), steps=12, student=student)
    with torch.no_grad():
        after = float(kl_window_loss(student, teacher, batch))
    assert after < 0.9 * before, (before, after, result.loss)
    assert result.loss[-1] < result.loss[0]
    assert sum(result.codes_changed) > 0 and result.steps == 12 and result.tokens == 12 * 2 * 64
    for name, m in higgs_layers(student).items():
        assert isinstance(m, HiggsLinear), name  # the stand-ins are gone again
        assert m.codes.dtype == torch.uint8 and m.scales.dtype == torch.float16
        assert torch.isfinite(m.scales).all() and (m.scales > 0).all()
        assert not any(p.requires_grad for p in m.parameters())
    assert [p.requires_grad for p in student.parameters()] == flags  # nothing left trainable or frozen


def test_p_only_never_changes_a_code_but_moves_scales(teacher, ids):
    start = _state(_student(teacher))
    student, result = _run(teacher, ids, method="p-only")
    end = _state(student)
    assert all(torch.equal(start[n][0], end[n][0]) for n in start)
    assert any(not torch.equal(start[n][1], end[n][1]) for n in start)
    assert result.codes_changed == [0] * 4


def test_ste_and_pv_differ_and_ste_changes_more(teacher, ids):
    pv, r_pv = _run(teacher, ids, method="pv")
    ste, r_ste = _run(teacher, ids, method="ste")
    assert any(not torch.equal(a, b) for a, b in zip(_codes(pv).values(), _codes(ste).values()))
    assert sum(r_ste.codes_changed) > sum(r_pv.codes_changed)


def test_same_seed_same_result_other_seed_other_batches(teacher, ids):
    a, ra = _run(teacher, ids)
    b, rb = _run(teacher, ids)
    assert ra.loss == rb.loss and ra.codes_changed == rb.codes_changed
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(_state(a).values(), _state(b).values()))
    _, rc = _run(teacher, ids, seed=1)
    assert rc.loss != ra.loss


@pytest.mark.parametrize("method", ["pv", "ste", "p-only"])
def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(teacher, ids, tmp_path, method):
    whole, r_whole = _run(teacher, ids, method=method, steps=6, delta_decay=0.5 if method == "pv" else 0.0)
    half, _ = _run(teacher, ids, method=method, steps=3, checkpoint_dir=tmp_path, checkpoint_every=2,
                   delta_decay=0.5 if method == "pv" else 0.0)
    fresh = _student(teacher)  # a new process would start from the same data-free model
    resumed, r_res = _run(teacher, ids, method=method, steps=6, student=fresh, checkpoint_dir=tmp_path, resume=True,
                          delta_decay=0.5 if method == "pv" else 0.0)
    assert r_res.resumed_from == 3
    assert r_res.loss == r_whole.loss and r_res.codes_changed == r_whole.codes_changed
    for (n, x), y in zip(_state(whole).items(), _state(resumed).values()):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]), n


def test_resume_refuses_other_settings_and_an_existing_checkpoint_without_resume(teacher, ids, tmp_path):
    _run(teacher, ids, steps=2, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="lr=0.003.*lr=0.001"):
        _run(teacher, ids, steps=3, checkpoint_dir=tmp_path, resume=True, lr=1e-3)
    with pytest.raises(ValueError, match="resume=True"):
        _run(teacher, ids, steps=3, checkpoint_dir=tmp_path)


def test_tuned_model_saves_and_loads_in_the_quantize_weights_format(teacher, ids, tmp_path):
    student, _ = _run(teacher, ids, eval_data=ids[:256], eval_every=2, eval_window=64)
    save_quantized(student, tmp_path)
    loaded = load_quantized(copy.deepcopy(teacher), tmp_path)
    for (n, x), y in zip(_state(student).items(), _state(loaded).values()):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]), n
    with torch.no_grad():
        assert torch.equal(student(ids[None, :64]).logits, loaded(ids[None, :64]).logits)


def test_tuned_norms_are_saved_and_loaded_with_the_layers(teacher, ids, tmp_path):
    import json

    student, _ = _run(teacher, ids, steps=3, tune_norms=True, lr=3e-2)
    names = student.aquakv_tuned_norms
    params = dict(student.named_parameters())
    originals = dict(teacher.named_parameters())
    assert names and all(n.endswith("norm.weight") for n in names)
    assert any(not torch.equal(params[n], originals[n]) for n in names), "the norms must have moved"
    save_quantized(student, tmp_path)
    assert json.loads((tmp_path / "higgs_weights.json").read_text())["norms"] == sorted(names)
    loaded = load_quantized(copy.deepcopy(teacher), tmp_path)
    got = dict(loaded.named_parameters())
    assert all(torch.equal(got[n], params[n]) for n in names) and loaded.aquakv_tuned_norms == names
    with torch.no_grad():
        assert torch.equal(student(ids[None, :64]).logits, loaded(ids[None, :64]).logits)
    # A re-save of the loaded model keeps them; a model without tuned norms writes no "norms" field.
    save_quantized(loaded, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "higgs_weights.json").read_text())["norms"] == sorted(names)
    plain, _ = _run(teacher, ids, steps=1)
    save_quantized(plain, tmp_path / "plain")
    assert "norms" not in json.loads((tmp_path / "plain" / "higgs_weights.json").read_text())


def test_stored_norms_must_be_parameters_of_the_model(teacher, ids, tmp_path):
    import json

    student, _ = _run(teacher, ids, steps=1, tune_norms=True)
    save_quantized(student, tmp_path)
    meta = tmp_path / "higgs_weights.json"
    header = json.loads(meta.read_text())
    header["norms"] = header["norms"][:-1] + ["model.nowhere.weight"]
    meta.write_text(json.dumps(header))
    fresh = copy.deepcopy(teacher)
    with pytest.raises(ValueError, match="norms: 'model.nowhere.weight' is not a parameter"):
        load_quantized(fresh, tmp_path)
    assert not higgs_layers(fresh), "a refused file leaves the model untouched"

def test_eval_curve_and_bad_options(teacher, ids):
    _, result = _run(teacher, ids, steps=4, eval_data=ids[:256], eval_every=2, eval_window=64)
    assert result.eval_steps == [0, 2, 4] and all(math.isfinite(p) for p in result.eval_ppl)
    for bad in (dict(method="sgd"), dict(max_code_change_per_step=0.0), dict(code_trust_ratio=-1.0),
                dict(delta_decay=2.0), dict(window=1), dict(lr=float("nan"))):
        with pytest.raises(ValueError, match="pv_tune"):
            _run(teacher, ids, **bad)
    with pytest.raises(ValueError, match="no HiggsLinear"):
        pv_tune(copy.deepcopy(teacher), teacher, ids, steps=1)


def test_tuned_layer_matches_a_row_padded_higgs_layer():
    """in = 48: no power of two >= 32 divides it, so HiggsLinear pads each row to 64 (row_group_size). The tuning
    stand-in must read that layout: same weight, and a V step towards the current weight changes no code."""
    from aquakv.weights.pv.layer import TunedHiggsLinear

    torch.manual_seed(0)
    layer = HiggsLinear.from_linear(torch.nn.Linear(48, 8, bias=False), bits=2, dim=2, group_size=64)
    assert layer.in_padded == 64
    tuned = TunedHiggsLinear(layer, with_buffer=True)
    with torch.no_grad():
        assert torch.allclose(tuned.dequantized(), layer.dequantize_weight().float(), rtol=1e-3, atol=1e-6)
    before = layer.codes.clone()
    out = tuned.v_step(select=True, max_code_change_per_step=1.0, code_trust_ratio=1.0, delta_decay=0.0)
    assert out.changed == 0 and torch.equal(layer.codes, before)
