"""aquakv.kv.rope: re-rotation (into views of other dtypes) and un-rotation against the model's own RoPE."""
import pytest
import torch
from aquakv.kv.rope import RotaryTracker, rotate, unrotate
from tiny_llama import make_tiny_llama


@pytest.fixture(scope="module")
def cos_sin():
    model = make_tiny_llama()
    tracker = RotaryTracker(model)
    positions = torch.tensor([[0, 1, 2, 7, 8, 300, 301], [5, 6, 7, 8, 9, 10, 4000]])
    yield tracker.cos_sin(positions)
    tracker.close()


def test_rotate_matches_transformers_apply_rotary_pos_emb(cos_sin):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos, sin = cos_sin
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 7, 16, generator=gen) * 3
    _, want = apply_rotary_pos_emb(k, k, cos, sin)
    torch.testing.assert_close(rotate(k, cos, sin), want, rtol=0, atol=2e-6)  # fp32: a few ulps of |k| ~ 10
    torch.testing.assert_close(unrotate(want, cos, sin), k, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rotate_into_a_slice_rounds_once_and_leaves_the_rest(cos_sin, dtype):
    cos, sin = cos_sin
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(2, 3, 7, 16, generator=gen)
    out = torch.full((2, 3, 11, 16), 7.0, dtype=dtype)
    got = rotate(k, cos, sin, out=out[:, :, 2:9])
    assert got.data_ptr() == out[:, :, 2:9].data_ptr()
    # float32 arithmetic rounded once to the target dtype: exactly the fp32 result, cast
    assert torch.equal(out[:, :, 2:9], rotate(k, cos, sin).to(dtype))
    assert (out[:, :, :2] == 7).all() and (out[:, :, 9:] == 7).all()


# ---- partial rotary, rope scaling, other module names, layer types ---------------------------------------------

def _keys(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_partial_rotary_matches_gpt_neox_and_passes_the_rest_through():
    from test_model_families import build
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    model = build("gpt-neox-partial")  # rotary on 4 of 16 channels
    tracker = RotaryTracker(model)
    cos, sin = tracker.cos_sin(torch.tensor([[0, 3, 9, 200], [1, 2, 3, 4000]]))
    assert cos.shape == (2, 4, 4)
    k = _keys((2, 3, 4, 16), 2)
    _, want = apply_rotary_pos_emb(k, k, cos, sin)
    torch.testing.assert_close(rotate(k, cos, sin), want, rtol=0, atol=2e-6)  # fp32: a few ulps of |k| ~ 10
    assert torch.equal(rotate(k, cos, sin)[..., 4:], k[..., 4:])
    torch.testing.assert_close(unrotate(want, cos, sin), k, rtol=0, atol=1e-5)
    assert torch.equal(unrotate(want, cos, sin)[..., 4:], k[..., 4:])
    out = torch.full((2, 3, 6, 16), 7.0, dtype=torch.float16)
    rotate(k, cos, sin, out=out[:, :, 1:5])
    assert torch.equal(out[:, :, 1:5], rotate(k, cos, sin).half()) and (out[:, :, 0] == 7).all()
    with pytest.raises(ValueError, match="width 3 cannot rotate heads of width 16"):
        rotate(k, cos[..., :3], sin[..., :3])
    tracker.close()


@pytest.mark.parametrize("family", ["llama3-scaling", "yarn", "linear-scaling", "dynamic-scaling"])
def test_scaled_ropes_rotate_like_the_model_and_invert(family):
    from test_model_families import build
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = build(family)
    module = model.model.rotary_emb
    tracker = RotaryTracker(model)
    positions = torch.tensor([[0, 1, 15, 16, 17, 100, 255], [3, 40, 64, 128, 200, 250, 7]])
    cos, sin = tracker.cos_sin(positions)
    want_cos, want_sin = module(torch.empty(0), positions)
    torch.testing.assert_close(cos, want_cos, rtol=0, atol=0)
    scale = module.attention_scaling
    assert (scale != 1) == (family == "yarn")  # yarn scales cos/sin; unrotate divides it out
    torch.testing.assert_close(cos * cos + sin * sin, torch.full_like(cos, scale ** 2), rtol=1e-6, atol=0)
    k = _keys((2, 2, 7, 16), 3)
    _, rotated = apply_rotary_pos_emb(k, k, cos, sin)
    torch.testing.assert_close(rotate(k, cos, sin), rotated, rtol=0, atol=4e-6)
    torch.testing.assert_close(unrotate(rotated, cos, sin), k, rtol=0, atol=1e-5)
    tracker.close()


def test_dynamic_rope_past_its_context_is_refused_and_never_reset_by_the_tracker():
    from test_model_families import build

    model = build("dynamic-scaling", max_position_embeddings=32)
    module, tracker = model.model.rotary_emb, RotaryTracker(model)
    with torch.no_grad():
        model(torch.arange(3, 23)[None])  # within 32 tokens: plain RoPE
    assert tracker.take(1, 20, "test").shape == (1, 20)
    with torch.no_grad():
        model(torch.arange(3, 43)[None])  # 40 tokens: frequencies rescaled for this forward
    grown = module.inv_freq.clone()
    assert not torch.equal(grown, module.original_inv_freq)
    with pytest.raises(RuntimeError, match="changed its frequencies"):
        tracker.take(1, 40, "test")
    tracker.cos_sin(torch.arange(4)[None])  # the model's own (decorated) forward would reset to the original here
    assert torch.equal(module.inv_freq, grown)
    tracker.close()


def test_rotary_module_found_under_other_names_or_by_its_frequencies():
    from aquakv.kv.rope import find_rotary_module
    from test_model_families import rename_rotary

    for name in ("rotary_pos_emb", "positional"):  # a usual name; a name found only by the inv_freq buffer
        model = make_tiny_llama(num_hidden_layers=1)
        module = model.model.rotary_emb
        rename_rotary(model.model, name)
        assert find_rotary_module(model) is module
    model.model.second = type(module)(model.config)
    with pytest.raises(ValueError, match=r"found 2 holding an inv_freq buffer: \['model.positional', 'model.second'\]"
                                         r".*pass rotary="):
        find_rotary_module(model)
    assert RotaryTracker(model, rotary=model.model.second).module is model.model.second
    with pytest.raises(ValueError, match="no rotary embedding module in Linear"):
        find_rotary_module(torch.nn.Linear(2, 2))


@pytest.fixture(scope="module")
def gemma3():
    from test_model_families import build_gemma3

    return build_gemma3(sliding_window=8)


def test_layer_typed_rotary_gives_each_layer_its_own_cos_sin(gemma3):
    tracker = RotaryTracker(gemma3)
    assert tracker.layer_types == gemma3.config.layer_types and not tracker.single_kind
    with torch.no_grad():
        gemma3(torch.arange(3, 13)[None])  # the model calls its rotary module once per layer type
    positions = tracker.take(1, 10, "test")
    assert torch.equal(positions, torch.arange(10)[None])
    module = gemma3.model.rotary_emb
    per_layer = [tracker.cos_sin(positions, i) for i in range(4)]
    for i, (cos, sin) in enumerate(per_layer):
        want = module(torch.empty(0), positions, gemma3.config.layer_types[i])
        assert torch.equal(cos, want[0]) and torch.equal(sin, want[1])
        assert tracker.kind(i) == gemma3.config.layer_types[i]
    assert torch.equal(per_layer[0][0], per_layer[2][0])
    assert not torch.allclose(per_layer[0][0], per_layer[1][0])  # rope_theta 10k (local) vs 1M (global)
    with pytest.raises(ValueError, match="per layer type.*pass layer_idx"):
        tracker.cos_sin(positions)
    tracker.close()


def test_single_kind_models_need_no_layer_index(cos_sin):
    tracker = RotaryTracker(make_tiny_llama(num_hidden_layers=1))
    positions = torch.tensor([[0, 1, 2, 7, 8, 300, 301], [5, 6, 7, 8, 9, 10, 4000]])
    assert tracker.single_kind and tracker.kind(None) is None and tracker.kind(0) is None
    assert all(torch.equal(a, b) for a, b in zip(tracker.cos_sin(positions, 0), tracker.cos_sin(positions)))
    assert all(torch.equal(a, b) for a, b in zip(tracker.cos_sin(positions), cos_sin))
