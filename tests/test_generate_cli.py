"""`aquakv generate`'s early refusals, and a quantized model (mixed grids per layer, as the DP allocation gives)
served from its codes keeping the perplexity of the same model served from its dequantized weights."""
from __future__ import annotations

import pytest
import torch
from aquakv.cli import main
from aquakv.cli.generate import _perplexity, _weight_bytes
from aquakv.weights import HiggsLinear, quantize_model
from tiny_llama import make_tiny_llama, random_token_windows
from torch import nn


def test_missing_weights_and_predictors_are_refused_before_loading(tmp_path, capsys):
    assert main(["generate", "--weights", str(tmp_path)]) == 2
    assert "no higgs_weights.json there" in capsys.readouterr().err
    (tmp_path / "higgs_weights.json").write_text("{}")
    assert main(["generate", "--weights", str(tmp_path), "--predictors", str(tmp_path / "p.pt")]) == 2
    assert "--predictors" in capsys.readouterr().err


def test_mixed_grid_model_from_codes_keeps_the_dequantized_perplexity():
    model = make_tiny_llama(seed=4)
    float_bytes = _weight_bytes(model)
    plan = {name: [(2, 16), (2, 64), (2, 256), (1, 16)][i % 4] for i, (name, m) in enumerate(model.named_modules())
            if isinstance(m, nn.Linear) and name != "lm_head"}
    quantize_model(model, grid_per_layer=plan, group_size=256, seed=3, progress=False)
    assert _weight_bytes(model) < float_bytes
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    from_codes = _perplexity(model, ids)
    for m in model.modules():
        if isinstance(m, HiggsLinear):
            m.forward = (lambda layer: lambda x: torch.nn.functional.linear(x, layer.dequantize_weight(),
                                                                            layer.bias))(m)
    dense = _perplexity(model, ids)
    # The same weights; only float32 summation order differs (docs/ops.md's bound, a few ulps per layer).
    assert abs(from_codes - dense) <= 1e-5 * dense, (from_codes, dense)


def test_calibration_inside_generate_shows_progress_unless_quiet(tmp_path, monkeypatch):
    """Without --predictors, generate calibrates first (a minute or more on a loaded CPU): that phase draws its
    progress like `aquakv calibrate` does, and -q silences it."""
    import argparse

    import aquakv.data
    import aquakv.kv
    import aquakv.models
    from aquakv.cli import generate

    class Stop(Exception):
        pass

    seen = []

    def fake_calibrate(*args, **kwargs):
        seen.append(kwargs["progress"])
        raise Stop

    model = make_tiny_llama(seed=0)
    monkeypatch.setattr(aquakv.models, "load_model", lambda device="cpu": (model, None))
    monkeypatch.setattr(aquakv.data, "default_texts", lambda split: ["text"])
    monkeypatch.setattr(aquakv.data, "tokenize", lambda tok, texts: torch.arange(256) % model.config.vocab_size)
    monkeypatch.setattr(aquakv.kv, "calibrate", fake_calibrate)
    (tmp_path / "higgs_weights.json").write_text("{}")
    for quiet in (False, True):
        args = argparse.Namespace(device="cpu", weights=str(tmp_path), predictors=None, context=64, new_tokens=2,
                                  check_ppl=False, no_baseline=True, seed=0, quiet=quiet, verbose=False)
        with pytest.raises(Stop):
            generate.run(args)
    assert seen == [True, False]


def test_report_separates_the_weights_speed_from_the_cache_speed(tmp_path, monkeypatch, capsys):
    """Three rows: float32 + fp16 cache, HIGGS weights + fp16 cache, HIGGS weights + AQUA-KV cache; the summary
    gives the decode speed of the whole and of the weights alone (on CPUs the AQUA-KV decode can dominate)."""
    import copy

    import aquakv.data
    import aquakv.models
    from aquakv.kv import calibrate
    from aquakv.weights import save_quantized

    model = make_tiny_llama(seed=0)
    calibrate(model, random_token_windows(4, 160, seed=5), bits=2, window=160, progress=False).save(
        tmp_path / "p.safetensors")
    save_quantized(quantize_model(copy.deepcopy(model), bits=4, group_size=64, progress=False), tmp_path / "q")
    monkeypatch.setattr(aquakv.models, "load_model", lambda device="cpu": (copy.deepcopy(model), None))
    monkeypatch.setattr(aquakv.data, "default_texts", lambda split: ["text"])
    monkeypatch.setattr(aquakv.data, "tokenize", lambda tok, texts: torch.arange(400) % model.config.vocab_size)
    assert main(["generate", "--weights", str(tmp_path / "q"), "--predictors", str(tmp_path / "p.safetensors"),
                 "--context", "200", "--new-tokens", "3", "-q"]) == 0
    out = capsys.readouterr().out
    names = [line.split(" | ")[0][2:] for line in out.splitlines() if line.startswith("| ") and "MiB" not in line]
    assert len(names) == 3 and names[0] == "float32 weights, fp16 cache", names
    assert names[1].startswith("HIGGS weights (") and names[1].endswith(", fp16 cache"), names
    assert names[2].startswith("HIGGS weights (") and names[2].endswith(", AquaKVCache-2"), names
    assert "of which the weights alone (fp16 cache both)" in out
