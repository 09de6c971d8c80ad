"""predictor_dtype=torch.bfloat16: AQUA-KV's predictor matmuls in bfloat16, accumulated in float32.

Three things are checked: the map alone against float32 (error of bfloat16 rounding, not more), both attention paths
agreeing with each other in bfloat16, and what it costs in quality: next to the exact cache, the bfloat16 logits are
hardly further off than the float32 ones, because rounding to bfloat16 (2**-9 relative) is far below 2-bit
quantization's error.
"""
import pytest
import torch
from aquakv.kv import AquaKVCache
from aquakv.kv.calibration import calibrate
from aquakv.kv.affine_map import AffineMap
from test_blockwise import CACHE_TOL, STEPS
from test_cache import _feed
from tiny_llama import make_tiny_llama, random_token_windows


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(initializer_range=0.02)


@pytest.fixture(scope="module")
def preds(model):
    return calibrate(model, random_token_windows(4, 160, seed=5), bits=2, window=160, progress=False)


@pytest.mark.parametrize("structure", ["dense", "low-rank", "block-diagonal"])
def test_map_in_bfloat16_is_float32_up_to_its_rounding(structure):
    gen = torch.Generator().manual_seed(0)
    c = 64
    kw = {"dense": dict(weight=torch.randn(2 * c, c, generator=gen)),
          "low-rank": dict(down=torch.randn(2 * c, 8, generator=gen), up=torch.randn(8, c, generator=gen)),
          "block-diagonal": dict(blocks=(torch.randn(4, c // 4, c // 4, generator=gen),) * 2)}[structure]
    m = AffineMap(bias=torch.randn(c, generator=gen), **kw)
    xs = torch.randn(5, 7, c, generator=gen), torch.randn(5, 7, c, generator=gen)
    exact = m(*xs)
    got = m(*xs, matmul_dtype=torch.bfloat16)
    assert got.dtype == torch.float32 and not torch.equal(got, exact)
    # Inputs and matrices rounded (2**-9 each), the matmul's result rounded once (twice with up): at most four
    # 2**-9 roundings deep, so within 2**-6 of the same map over |inputs| and |matrices|.
    absolute = AffineMap.from_tensors({k: v.abs() for k, v in m.tensors().items()})
    bound = 2.0**-6 * (absolute(*(x.abs() for x in xs)) - m.bias.abs())
    assert ((got - exact).abs() <= bound).all()
    with pytest.raises(ValueError, match="matmul_dtype must be torch.float32 or torch.bfloat16"):
        m(*xs, matmul_dtype=torch.float16)


def test_blockwise_gives_the_materialized_logits_in_bfloat16(model, preds):
    ids = torch.stack(random_token_windows(2, sum(STEPS), seed=3))
    bf = dict(buffer=16, predictor_dtype=torch.bfloat16)
    ref = _feed(model, ids, AquaKVCache(model, preds, chain_dtype=torch.float16, **bf), STEPS)
    got = _feed(model, ids, AquaKVCache(model, preds, attention="blockwise", block_tokens=7, **bf), STEPS)
    # Both round the same matmul to bfloat16; the blockwise op and the map may differ by a bfloat16 ulp of a
    # prediction where the float32 sums before rounding differ in their last bits, hence 10x the float-order budget.
    torch.testing.assert_close(got, ref, rtol=10 * CACHE_TOL["rtol"], atol=10 * CACHE_TOL["atol"])


@pytest.mark.parametrize("attention", ["materialize", "blockwise"])
def test_bfloat16_predictors_cost_no_accuracy(model, preds, attention):
    """Next to the exact cache, the bfloat16 logits' error is within 1.05x of the float32 ones' (quantization
    dominates); and the two differ, so the setting reaches the matmuls."""
    ids = torch.stack(random_token_windows(2, sum(STEPS), seed=3))
    exact = _feed(model, ids, AquaKVCache(model, preds, buffer=16, quantize=False), STEPS)
    logits = {dt: _feed(model, ids, AquaKVCache(model, preds, buffer=16, attention=attention, predictor_dtype=dt),
                        STEPS) for dt in (torch.float32, torch.bfloat16)}
    err = {dt: (x - exact).norm() for dt, x in logits.items()}
    assert not torch.equal(logits[torch.float32], logits[torch.bfloat16])
    assert err[torch.bfloat16] <= 1.05 * err[torch.float32], err


def test_other_predictor_dtypes_are_refused(model, preds):
    with pytest.raises(ValueError, match="predictor_dtype must be torch.float32 or torch.bfloat16, got torch.float16"):
        AquaKVCache(model, preds, predictor_dtype=torch.float16)
