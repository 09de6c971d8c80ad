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
