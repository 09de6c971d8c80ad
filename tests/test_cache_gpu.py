"""The AQUA-KV pipeline on a GPU: calibration, the cache, generate, on the tiny Llama moved to CUDA.

Each test compares the GPU run with the same run on the CPU (the kernels' own parity is tests/test_ops_cuda.py).
Skipped without a CUDA device or without the CUDA kernels. AQUAKV_GPU_TEST_DEVICE=cpu runs the same tests with
the CPU as the "GPU", which checks the tests themselves on a machine without one.
"""
from __future__ import annotations

import os

import pytest
import torch
from aquakv.hf_compat import cache_kwargs
from aquakv.kv import AquaKVCache, HiggsCache
from aquakv.kv.calibration import calibrate
from sweeps import has_kernel
from test_cache import _chunk_errors, _feed, _record_updates
from tiny_llama import make_tiny_llama, random_token_windows
from transformers import DynamicCache

DEVICE = os.environ.get("AQUAKV_GPU_TEST_DEVICE", "cuda")
if DEVICE != "cpu":
    pytestmark = [
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        pytest.mark.skipif(not has_kernel("higgs_quantize", "CUDA"), reason="aquakv was built without CUDA kernels"),
    ]

CALIBRATION = dict(bits=2, window=160, progress=False)


@pytest.fixture(scope="module")
def cpu_model():
    return make_tiny_llama()


@pytest.fixture(scope="module")
def gpu_model():
    return make_tiny_llama().to(DEVICE)


@pytest.fixture(scope="module")
def cpu_preds(cpu_model):
    return calibrate(cpu_model, random_token_windows(4, 160, seed=5), **CALIBRATION)


def test_calibration_on_the_gpu_matches_the_cpu(gpu_model, cpu_preds):
    """Same data, same settings: the per-layer held-out errors agree (matmul order and near-tie codes differ)."""
    for offload in (True, False):
        preds = calibrate(gpu_model, random_token_windows(4, 160, seed=5), offload=offload, **CALIBRATION)
        for got, want in zip(preds.report, cpu_preds.report):
            for key in ("key_rel_err", "value_rel_err"):
                assert got[key] == pytest.approx(want[key], rel=0.02), (key, got, want)


def test_unquantized_pipeline_reproduces_dynamic_cache_on_the_gpu(gpu_model, cpu_preds):
    ids = torch.stack(random_token_windows(2, 70, seed=7)).to(DEVICE)
    steps = [9, 1, 20, 5, 1, 30, 4]
    ref = _feed(gpu_model, ids, DynamicCache(config=gpu_model.config), steps)
    got = _feed(gpu_model, ids, AquaKVCache(gpu_model, cpu_preds, quantize=False, buffer=16), steps)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)  # as on the CPU (tests/test_cache.py EXACT)


def test_quantized_cache_on_the_gpu_reconstructs_like_the_cpu(cpu_model, gpu_model, cpu_preds):
    """Predictors calibrated on the CPU serve the GPU model; every chunk's codec error matches the CPU run's."""
    ids = torch.stack(random_token_windows(1, 90, seed=8))
    errors = {}
    for where, model, tokens in (("cpu", cpu_model, ids), ("gpu", gpu_model, ids.to(DEVICE))):
        for name, cache in (("aqua", AquaKVCache(model, cpu_preds, buffer=16)),
                            ("higgs", HiggsCache(model, bits=2, layer0_bits=4, buffer=16))):
            seen = _record_updates(cache)
            _feed(model, tokens, cache, [40] + [10] * 5)
            assert cache.layers[1].store.keys.codes.device.type == tokens.device.type  # codes live where the model runs
            errors[where, name] = _chunk_errors(cache, seen)
    for name in ("aqua", "higgs"):
        for (kg, vg), (kc, vc) in zip(errors["gpu", name], errors["cpu", name]):
            assert kg == pytest.approx(kc, rel=0.03) and vg == pytest.approx(vc, rel=0.03), (name, errors)


def test_generate_with_batch_and_beams_on_the_gpu(gpu_model, cpu_preds):
    ids = torch.stack(random_token_windows(2, 20, seed=10)).to(DEVICE)
    for kw in (dict(max_new_tokens=30), dict(max_new_tokens=20, num_beams=2)):
        kw.update(do_sample=False, pad_token_id=0)
        ref = gpu_model.generate(ids, **cache_kwargs(gpu_model, DynamicCache(config=gpu_model.config)), **kw)
        exact = gpu_model.generate(ids, **cache_kwargs(gpu_model, AquaKVCache(gpu_model, cpu_preds, quantize=False,
                                                                              buffer=8)), **kw)
        assert torch.equal(exact, ref)
        cache = AquaKVCache(gpu_model, cpu_preds, buffer=8)
        out = gpu_model.generate(ids, **cache_kwargs(gpu_model, cache), **kw)
        assert out.shape == ref.shape and cache.layers[0].num_quantized > 0
        assert cache.nbytes() > 0 and cache.positions.device.type == torch.device(DEVICE).type
