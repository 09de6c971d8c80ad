"""The KV bit allocation (aquakv.kv.bit_allocation, aquakv.kv.sensitivities, calibrate(budget=...)): the DP's choice
equals brute force on small cases, the budget counts what `aquakv calibrate` prints, the sensitivities see the noise."""
import itertools
import math

import numpy as np
import pytest
import torch
from aquakv.allocation import InfeasibleBudget
from aquakv.kv.bit_allocation import allocate_kv_bits, candidate_quantizers
from aquakv.kv.predictor_settings import AquaKVSettings
from aquakv.kv.sensitivities import KVSensitivities
from tiny_llama import make_tiny_llama, random_token_windows

SETTINGS = AquaKVSettings(bits=2, grid_dim=2, group_size=16, seed=0, layer0_bits=4)  # C = 32: scales cost 1 bit
CANDIDATES = candidate_quantizers(SETTINGS, [1, 2, 3, 4])


def _case(seed: int, layers: int):
    rng = np.random.default_rng(seed)
    errors = [{"layer": 0, "chain_start": True, "keys": [0.0] * 4, "values": [0.0] * 4}]
    for layer in range(1, layers):
        # errors fall with the bits, as a grid's MSE does (by ~4x per bit), each part at its own level
        errors += [{"layer": layer, "chain_start": False,
                    **{p: list(rng.uniform(0.2, 2) * 0.36 * 0.27 ** np.arange(4)) for p in ("keys", "values")}}]
    alpha = {p: [math.nan] + list(rng.uniform(-0.05, 1, layers - 1)) for p in ("keys", "values")}
    sens = KVSensitivities(alpha["keys"], alpha["values"], 2.0, 0.01, 2, 64, 0.0)
    return errors, sens


def _brute_force(errors, sens, budget, layers):
    """Every assignment of a candidate to every predicted part; the least predicted loss within the budget."""
    parts = [(e["layer"], p) for e in errors[1:] for p in ("keys", "values")]
    best = (math.inf, None)
    for choice in itertools.product(range(4), repeat=len(parts)):
        bits = [1 + j for j in choice]
        average = (2 * 5 + sum(b + 1 for b in bits)) / (2 * layers)  # layer 0: 4 bits + 1 of scales
        if average > budget + 1e-12:
            continue
        loss = sum(max(getattr(sens, p)[layer], 0) * errors[layer][p][j] for (layer, p), j in zip(parts, choice))
        best = min(best, (loss, choice))
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [3.0, 3.3, 3.7, 4.2, 5.0])
def test_dp_equals_brute_force(seed, budget):
    layers = 3  # 4 predicted parts: 256 assignments
    errors, sens = _case(seed, layers)
    got = allocate_kv_bits(errors, sens, SETTINGS, CANDIDATES, layers, 32, budget)
    loss, choice = _brute_force(errors, sens, budget, layers)
    assert got.predicted_delta_nll == pytest.approx(loss, rel=1e-12, abs=1e-15)
    assert got.average_bits <= budget + 1e-12
    assert got.key_bits[0] is None and got.value_bits[0] is None  # the chain start keeps layer0_bits


def test_budget_is_the_compressed_part_calibrate_prints():
    """Every part at 2 bits spends exactly the uniform 2-bit figure: (layer 0 at 4 + 1, the rest 2 + 1) / layers."""
    layers = 4
    errors, sens = _case(0, layers)
    sens = KVSensitivities([math.nan] + [1.0] * 3, [math.nan] + [1.0] * 3, 2.0, 0.01, 2, 64, 0.0)
    for e in errors[1:]:
        e["keys"] = e["values"] = [1.0, 0.2, 0.1, 0.05]  # convex in the bits, as grids' errors are: no part gains
    uniform = (5 + 3 * 3) / 4
    got = allocate_kv_bits(errors, sens, SETTINGS, CANDIDATES, layers, 32, uniform)
    assert got.average_bits == pytest.approx(uniform)
    assert got.key_bits[1:] + got.value_bits[1:] == [2.0] * 6 and got.predicted_delta_nll == pytest.approx(1.2)


def test_unreachable_budgets_are_refused_with_the_range():
    errors, sens = _case(1, 3)
    with pytest.raises(InfeasibleBudget, match="below the cheapest allocation, 3.0000"):
        allocate_kv_bits(errors, sens, SETTINGS, CANDIDATES, 3, 32, 2.9)
    with pytest.raises(InfeasibleBudget, match="above the dearest allocation, 5.0000"):
        allocate_kv_bits(errors, sens, SETTINGS, CANDIDATES, 3, 32, 5.5)
    with pytest.raises(ValueError, match="budget must be a finite positive"):
        allocate_kv_bits(errors, sens, SETTINGS, CANDIDATES, 3, 32, float("nan"))
    sens.keys[1] = float("nan")
    with pytest.raises(ValueError, match="layer 1 keys: sensitivity nan"):
        allocate_kv_bits(errors, sens, SETTINGS, CANDIDATES, 3, 32, 3.0)


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama()


def test_sensitivities_by_replay_equal_those_of_full_forwards(model, monkeypatch):
    """Re-running only blocks l.. gives the alphas of full forwards (a random model on random tokens: alphas of either
    sign, the noise can make its guesses flatter)."""
    from aquakv.kv import sensitivities
    from aquakv.runner import LayerRunner

    windows = torch.stack(random_token_windows(2, 48, seed=2))
    replayed = sensitivities.measure_kv_sensitivities(model, windows, noise=0.05, progress=False)
    assert replayed.base_nll == pytest.approx(float(model(input_ids=windows, labels=windows).loss), rel=1e-4)
    monkeypatch.setattr(LayerRunner, "can_replay_logits", property(lambda self: False))
    full = sensitivities.measure_kv_sensitivities(model, windows, noise=0.05, progress=False)
    # alphas are NLL differences of ~1e-3 divided by 0.05; the two routes differ by float order (~1e-7 in the NLL)
    np.testing.assert_allclose(replayed.keys + replayed.values, full.keys + full.values, rtol=1e-3, atol=1e-4)
    assert np.isfinite(replayed.keys + replayed.values).all() and np.abs(replayed.keys).max() > 0
    with pytest.raises(ValueError, match="noise"):
        sensitivities.measure_kv_sensitivities(model, windows, noise=1.5, progress=False)


def test_injected_noise_has_the_relative_size_of_every_token_and_spares_the_sinks():
    from aquakv.kv.sensitivities import _Noise

    x = torch.randn(2, 10, 32) * torch.arange(1, 11).view(1, 10, 1)  # tokens of very different sizes
    noisy = _Noise(0.01, sinks=4, seed=0)(None, (), x)
    n = (noisy - x).norm(dim=-1)
    assert torch.equal(n[:, :4], torch.zeros(2, 4))
    torch.testing.assert_close(n[:, 4:], 0.1 * x.norm(dim=-1)[:, 4:], rtol=1e-5, atol=0)


def test_calibrate_at_a_budget_stores_widths_that_spend_it(model, tmp_path):
    from aquakv.kv.calibration import calibrate
    from aquakv.kv.predictors import AquaKVPredictors

    preds = calibrate(model, random_token_windows(4, 96, seed=1), bits=2, window=96, budget=3.5,
                      sensitivity_windows=2, progress=False)
    assert preds.settings.mixed and preds.bits_per_value() <= 3.5 + 1e-9
    assert preds.calibration["budget"] == 3.5 and math.isfinite(preds.calibration["predicted_delta_nll"])
    assert all(r["key_bits"] == preds.settings.key_bits[r["layer"]] for r in preds.report)
    preds.save(tmp_path / "p.safetensors")
    assert AquaKVPredictors.load(tmp_path / "p.safetensors").settings == preds.settings
