"""aquakv.calibrate on the tiny Llama: windows, capture, closed-form fits, quantization in the loop, determinism."""
import pytest
import torch
from aquakv.kv.calibration import calibrate, format_report, make_windows
from aquakv.kv.capture import capture_states
from aquakv.kv.fit import _moments, fit_ridge
from test_cli import tiny as tiny  # the fixture, shared
from tiny_llama import make_tiny_llama, random_token_windows


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama()


@pytest.fixture(scope="module")
def data():
    return random_token_windows(6, 200, seed=1)


@pytest.fixture(scope="module")
def preds(model, data):
    return calibrate(model, data, bits=2, window=100, progress=False)


def test_make_windows_cuts_keeps_tails_and_spreads_selection():
    seqs = [torch.arange(250), torch.arange(40)]
    windows = make_windows(seqs, window=100)
    assert [w.numel() for w in windows] == [100, 100, 50, 40]
    assert torch.equal(windows[2], torch.arange(200, 250))
    picked = make_windows([torch.arange(1000)], window=100, max_windows=3)
    assert [int(w[0]) for w in picked] == [0, 300, 600]  # spread over the data, not the first three
    assert [w.numel() for w in make_windows(seqs, window=100, min_tokens=45)] == [100, 100, 50]
    with pytest.raises(ValueError, match="tokenizer"):
        make_windows(["some text"])

    class ByteTokenizer:  # the two things aquakv.data.tokenize uses
        eos_token_id = 2

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text.encode())}

    from_text = make_windows(["abc", "de"], tokenizer=ByteTokenizer(), window=4)
    assert [w.tolist() for w in from_text] == [[97, 98, 99, 2], [100, 101, 2]]  # texts joined by EOS, then cut
    with pytest.raises(TypeError, match=r"data\[0\]"):
        make_windows([torch.randn(10)])


def test_capture_equals_k_proj_and_v_proj_outputs(model):
    """Keys un-rotated from what the cache receives are the k_proj outputs (pre-RoPE), values the v_proj outputs."""
    ids = random_token_windows(1, 50, seed=2)
    got_k, got_v = capture_states(model, ids, sinks=4, progress=False)
    seen = {}
    hooks = [getattr(layer.self_attn, name).register_forward_hook(
        lambda m, a, out, key=(i, name): seen.__setitem__(key, out[0, 4:]))
        for i, layer in enumerate(model.model.layers) for name in ("k_proj", "v_proj")]
    with torch.no_grad():
        model(ids[0][None])
    for h in hooks:
        h.remove()
    for i in range(len(model.model.layers)):
        # stored in fp16: 2^-11 relative rounding; the un-rotation adds a few fp32 ulps
        torch.testing.assert_close(got_k[i].float(), seen[(i, "k_proj")], rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(got_v[i].float(), seen[(i, "v_proj")], rtol=2e-3, atol=2e-3)


def test_layer_by_layer_capture_equals_full_forwards_for_mixed_window_lengths(model):
    """Windows of two lengths (a shorter tail window) go through the layers one layer at a time, each with the
    arguments of its own length; every layer's rows equal those of a full forward of that window."""
    from aquakv.hf_compat import cache_kwargs
    from aquakv.kv.capture import iter_layer_states
    from aquakv.kv.rope import RotaryTracker, unrotate
    from transformers import DynamicCache

    windows = random_token_windows(2, 40, seed=3) + random_token_windows(1, 23, seed=4)
    want = {}
    for w in windows:
        cache, tracker = DynamicCache(config=model.config), RotaryTracker(model)
        with torch.no_grad():
            model(w[None], **cache_kwargs(model, cache))
        cos_sin = tracker.cos_sin(tracker.take(1, w.numel(), "test"))
        tracker.close()
        for i, layer in enumerate(cache.layers):
            rows = [x[:, :, 4:].transpose(1, 2).reshape(-1, 32) for x in (unrotate(layer.keys, *cos_sin), layer.values)]
            want.setdefault(i, []).append(rows)
    for offload in (True, False):
        got = list(iter_layer_states(model, windows, sinks=4, offload=offload))
        assert [i for i, _, _ in got] == [0, 1, 2, 3]
        for i, keys, values in got:
            assert keys.shape == values.shape == (36 + 36 + 19, 32) and keys.dtype == torch.float16
            # the same arithmetic as the full forward, then rounded to fp16 the same way
            assert torch.equal(keys, torch.cat([k for k, _ in want[i]]).half())
            assert torch.equal(values, torch.cat([v for _, v in want[i]]).half())


def test_capture_refuses_a_model_without_decoder_layers():
    from aquakv.runner import decoder_layers

    with pytest.raises(ValueError, match="decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_fit_ridge_matches_least_squares_with_intercept():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=gen) * torch.tensor([1, 2, 3, 4, 5, 6.0]) + 3.0
    y = x @ torch.randn(6, 4, generator=gen) + torch.randn(4, generator=gen) + 0.1 * torch.randn(500, 4, generator=gen)
    amap = fit_ridge(_moments([x], y, 500, torch.device("cpu")), damping=1e-9, rank=None)
    sol = torch.linalg.lstsq(torch.cat([x, torch.ones(500, 1)], 1).double(), y.double()).solution
    # damping 1e-9 of the mean variance moves the solution by ~1e-9 relative; fp32 storage: ~1e-7
    torch.testing.assert_close(amap.weight.double(), sol[:6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(amap.bias.double(), sol[6], rtol=1e-5, atol=1e-5)


def test_reduced_rank_projects_onto_top_singular_vectors_of_fitted_values():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(400, 8, generator=gen)
    y = x @ torch.randn(8, 6, generator=gen) + 0.3 * torch.randn(400, 6, generator=gen) + 1.0
    m = _moments([x], y, 400, torch.device("cpu"))
    full = fit_ridge(m, damping=1e-3, rank=None)
    low = fit_ridge(m, damping=1e-3, rank=2)
    assert low.down.shape == (8, 2) and low.up.shape == (2, 6) and low.weight is None
    xc = (x - x.mean(0)).double()
    _, _, vh = torch.linalg.svd(xc @ full.weight.double(), full_matrices=False)
    proj = vh[:2].T @ vh[:2]
    # fp32-stored factors of an fp64 solution: ~1e-6 relative
    torch.testing.assert_close((low.down @ low.up).double(), full.weight.double() @ proj, rtol=1e-4, atol=1e-5)
    sv = torch.linalg.svdvals(low(x) - low(x).mean(0))
    assert sv[2] < 1e-5 * sv[0]  # rank 2 up to fp32 rounding


def test_calibration_shapes_report_and_determinism(model, data, preds):
    c = preds.kv_width
    assert preds.num_layers == 4 and c == 32
    assert preds.key_maps[0].weight is None and preds.key_maps[0].bias.shape == (c,)
    for layer in range(1, 4):
        assert preds.key_maps[layer].weight.shape == (c, c)
        assert preds.value_maps[layer].weight.shape == (2 * c, c)
    assert [r["layer"] for r in preds.report] == [0, 1, 2, 3]
    assert preds.calibration["windows"] == 12 and preds.calibration["held_out_tokens"] > 0
    again = calibrate(model, data, bits=2, window=100, progress=False)
    for a, b in zip(preds.key_maps + preds.value_maps, again.key_maps + again.value_maps):
        for name, t in a.tensors().items():
            assert torch.equal(t, b.tensors()[name])
    assert again.report == preds.report
    assert "key_pred_rel_mse" in format_report(preds)


def test_fit_predictors_on_captured_states_equals_calibrate(model, data, preds):
    """The two halves (capture every layer, then fit) give what calibrate's layer-by-layer stream gives."""
    from aquakv.kv.calibration import _split
    from aquakv.kv.fit import fit_predictors
    from aquakv.kv.predictors import AquaKVPredictors

    windows = make_windows(data, window=100)
    keys, values = capture_states(model, windows, sinks=4, progress=False)
    n_fit, _ = _split(windows, 4, 0.1)
    got = fit_predictors(keys, values, n_fit, preds.settings, AquaKVPredictors.model_info_of(model), progress=False)
    for a, b in zip(preds.key_maps + preds.value_maps, got.key_maps + got.value_maps):
        assert all(torch.equal(t, b.tensors()[name]) for name, t in a.tensors().items())
    assert got.report == preds.report


def test_adapters_beat_higgs_alone_on_held_out_tokens(preds):
    """The product claim at small scale: predicting from the previous layer shrinks what 2-bit HIGGS must code.
    On this random-weight model the held-out error drops ~1.5x (keys) and ~3x (values); demand a clear margin."""
    later = preds.report[1:]
    for kind in ("key", "value"):
        ours = sum(r[f"{kind}_rel_err"] for r in later) / len(later)
        higgs = sum(r[f"{kind}_higgs_rel_err"] for r in later) / len(later)
        assert ours < 0.9 * higgs, (kind, ours, higgs)
        # residual coding: final error ~ prediction error x the quantizer's own relative MSE (~0.1 at 2 bits)
        for r in later:
            assert r[f"{kind}_rel_err"] < 0.15 * r[f"{kind}_pred_rel_mse"], r


def test_fit_uses_reconstructed_previous_layer(model, data, preds):
    """Quantization in the loop: layer 1's key map is the ridge fit on layer 0's QUANTIZED reconstruction
    m + Q0(K_0 - m), not on the exact K_0."""
    windows = make_windows(data, window=100, min_tokens=5)
    keys, _ = capture_states(model, windows, sinks=4, progress=False)
    n_fit = preds.calibration["fit_tokens"]
    q0 = preds.quantizer(0)
    k0 = keys[0].float()
    mean = k0[:n_fit].mean(0)
    torch.testing.assert_close(preds.key_maps[0].bias, mean, rtol=1e-5, atol=1e-6)
    k0_hat = mean + q0.quantize_dequantize(k0 - mean)
    expected = fit_ridge(_moments([k0_hat], keys[1], n_fit, torch.device("cpu")), 1e-3, None)
    exact = fit_ridge(_moments([k0], keys[1], n_fit, torch.device("cpu")), 1e-3, None)
    # same inputs up to fp32 summation order -> equal to ~1e-5; the exact-input fit is measurably different
    torch.testing.assert_close(preds.key_maps[1].weight, expected.weight, rtol=1e-4, atol=1e-4)
    assert (preds.key_maps[1].weight - exact.weight).abs().max() > 1e-3


def test_layer0_options_and_rank(model, data):
    fp16 = calibrate(model, data, bits=2, window=100, layer0_bits="fp16", rank=4, progress=False)
    assert fp16.settings.layer0_bits is None and fp16.quantizer(0) is None
    assert fp16.report[0]["key_rel_err"] < 1e-5  # fp16 storage only: ~2^-22 relative squared error
    assert fp16.key_maps[1].down.shape == (32, 4) and fp16.value_maps[2].up.shape == (4, 32)
    with pytest.raises(ValueError, match="rank"):
        calibrate(model, data, window=100, rank=0, progress=False)
    with pytest.raises(ValueError, match="bits"):
        calibrate(model, data, bits=2.3, window=100, progress=False)


def test_package_level_calibrate_is_the_function_after_submodule_import(model, data):
    """The calibration module is aquakv.kv.calibration, so importing it never rebinds aquakv.calibrate."""
    import aquakv
    import aquakv.kv.calibration  # noqa: F401
    assert callable(aquakv.calibrate) and not isinstance(aquakv.calibrate, type(aquakv))
    preds = aquakv.calibrate(model, data[:3], window=100, progress=False)
    assert preds.num_layers == 4 and preds.has_adapters


@pytest.mark.parametrize("option,value", [
    ("damping", -1.0), ("damping", float("nan")), ("damping", float("inf")),
    ("sinks", -1), ("held_out", 1.0), ("held_out", -0.1), ("held_out", float("nan")),
    ("bits", float("inf")), ("bits", float("nan")), ("layer0_bits", float("nan")),
])
def test_calibrate_refuses_bad_option_values_naming_them(model, data, option, value):
    """Before: damping=-1, sinks=-1 and held_out=1 were accepted (a negative ridge, a negative sink count, every
    window held out); non-finite bits failed deep inside with "cannot convert float NaN to integer"."""
    with pytest.raises(ValueError, match=f"calibrate: {option} must be"):
        calibrate(model, data, window=100, progress=False, **{option: value})


def test_calibrate_accepts_the_edges_of_its_ranges(model, data):
    preds = calibrate(model, data[:2], window=100, damping=0.0, sinks=0, held_out=0.0, progress=False)
    assert preds.calibration["held_out_tokens"] > 0  # held_out=0 still keeps one window for the report


def test_structure_full_is_the_default_bit_for_bit(model, data, preds):
    full = calibrate(model, data, bits=2, window=100, structure="full", progress=False)
    for a, b in zip(preds.key_maps + preds.value_maps, full.key_maps + full.value_maps):
        assert a.tensors().keys() == b.tensors().keys() and a.groups == 1
        assert all(torch.equal(t, b.tensors()[name]) for name, t in a.tensors().items())
    assert full.report == preds.report and preds.calibration["structure"] == "full"


def test_fit_predictors_per_head_equals_calibrate_per_head(model, data):
    from aquakv.kv.calibration import _split
    from aquakv.kv.fit import fit_predictors
    from aquakv.kv.predictors import AquaKVPredictors

    ours = calibrate(model, data, bits=2, window=100, structure="per-head", rank=3, progress=False)
    windows = make_windows(data, window=100)
    keys, values = capture_states(model, windows, sinks=4, progress=False)
    n_fit, _ = _split(windows, 4, 0.1)
    got = fit_predictors(keys, values, n_fit, ours.settings, AquaKVPredictors.model_info_of(model), rank=3,
                         structure="per-head", progress=False)
    for a, b in zip(ours.key_maps + ours.value_maps, got.key_maps + got.value_maps):
        assert all(torch.equal(t, b.tensors()[name]) for name, t in a.tensors().items())
    assert got.report == ours.report and ours.key_maps[1].groups == 2


def test_per_head_on_one_kv_head_is_the_dense_fit(data):
    """With one KV head (MQA) per-head is the full-rank map: the same dense tensors, nothing block-shaped."""
    mqa = make_tiny_llama(num_key_value_heads=1, head_dim=32)
    full = calibrate(mqa, data, bits=2, window=100, progress=False)
    per_head = calibrate(mqa, data, bits=2, window=100, structure="per-head", progress=False)
    for a, b in zip(full.key_maps + full.value_maps, per_head.key_maps + per_head.value_maps):
        assert b.blocks is None and all(torch.equal(t, b.tensors()[name]) for name, t in a.tensors().items())


def test_cli_calibrate_structure_per_head(capsys, tmp_path, tiny):
    from aquakv.kv.predictors import AquaKVPredictors
    from test_cli import run

    _, text = tiny
    out_file = tmp_path / "p.safetensors"
    code, out, err = run(capsys, "calibrate", "--text", str(text), "--windows", "4", "--window", "128", "--structure",
                         "per-head", "--rank", "4", "--out", str(out_file), "--device", "cpu", "-q")
    assert code == 0, err
    loaded = AquaKVPredictors.load(out_file)
    assert loaded.key_maps[1].groups == 2 and loaded.key_maps[1].rank == 4 and "per-head" in out
    with pytest.raises(SystemExit) as e:
        run(capsys, "calibrate", "--text", str(text), "--structure", "diagonal", "--out", str(out_file))
    assert e.value.code == 2 and "--structure" in capsys.readouterr().err
