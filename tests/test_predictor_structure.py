"""Per-KV-head (block-diagonal) predictors: the map, its closed-form fit, the file schema, calibration and the cache."""
import json

import pytest
import torch
from aquakv.kv import AquaKVCache
from aquakv.kv.calibration import calibrate
from aquakv.kv.fit import _moments, fit_ridge, fit_ridge_blocks
from aquakv.kv.affine_map import AffineMap
from aquakv.kv.predictors import AquaKVPredictors
from test_cache import _chunk_errors, _feed, _record_updates
from tiny_llama import make_tiny_llama, random_token_windows


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama()


@pytest.fixture(scope="module")
def per_head(model):
    """Per-head predictors on the data of test_cache's fixture (its last window is held out)."""
    return calibrate(model, random_token_windows(4, 160, seed=5), bits=2, window=160, structure="per-head",
                     progress=False)


def _random_blocks(gen, groups: int, widths: list[int], c_out: int, rank: int | None) -> AffineMap:
    m = c_out // groups if rank is None else rank
    blocks = tuple(torch.randn(groups, w // groups, m, generator=gen) for w in widths)
    up = None if rank is None else torch.randn(groups, rank, c_out // groups, generator=gen)
    return AffineMap(bias=torch.randn(c_out, generator=gen), blocks=blocks, block_up=up)


def _dense_of(amap: AffineMap, widths: list[int]) -> torch.Tensor:
    """The dense [C_in, C_out] matrix of a block-diagonal map: every block in place, zeros off the diagonal."""
    g, c_out = amap.groups, amap.bias.shape[0]
    out = c_out // g
    dense = torch.zeros(sum(widths), c_out, dtype=torch.float64)
    start = 0
    for w, b in zip(widths, amap.blocks):
        d = w // g
        for k in range(g):
            block = b[k].double() if amap.block_up is None else b[k].double() @ amap.block_up[k].double()
            dense[start + k * d:start + (k + 1) * d, k * out:(k + 1) * out] = block
        start += w
    return dense


SHAPES = [(groups, widths, c_out, rank) for groups, widths, c_out in
          [(2, [32], 32), (2, [32, 32], 32), (3, [192, 192], 192), (4, [8, 16, 24], 12), (3, [6], 9), (5, [10], 5)]
          for rank in (None, 1, 2)]


@pytest.mark.parametrize("groups, widths, c_out, rank", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_block_diagonal_map_equals_dense_map_with_zero_off_diagonal_blocks(groups, widths, c_out, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    amap = _random_blocks(gen, groups, widths, c_out, rank)
    lead = [(5,), (2, 3), (1, 0), ()][(seed + 2 * (rank or 0)) % 4]  # batch shapes, empty and 1-D included
    xs = [torch.randn(*lead, w, generator=gen) for w in widths]
    expected = torch.cat([x.double() for x in xs], -1) @ _dense_of(amap, widths) + amap.bias.double()
    got = amap(*xs)
    assert got.shape == (*lead, c_out) and got.dtype == torch.float32
    # fp32 sums of <= 192 products of N(0,1) values (outputs ~sqrt(192) * sqrt(r) in size): ~1e-5 relative
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    # the op layout is the storage itself; a dense map comes out as G = 1 with the same product
    blocks, up, bias = amap.op_weights()
    assert all(a is b for a, b in zip(blocks, amap.blocks)) and up is amap.block_up and bias is amap.bias
    dense = AffineMap(bias=amap.bias, weight=_dense_of(amap, widths).float())
    d_blocks, d_up, _ = dense.op_weights(widths)
    assert [tuple(b.shape) for b in d_blocks] == [(1, w, c_out) for w in widths] and d_up is None
    torch.testing.assert_close(dense(*xs), got, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="widths"):
        amap(*[torch.randn(3, w + groups) for w in widths])


def test_block_diagonal_map_never_mixes_heads():
    """Perturbing group g' of any input leaves every other group's output bit for bit unchanged."""
    gen = torch.Generator().manual_seed(3)
    for rank in (None, 4):
        amap = _random_blocks(gen, 3, [192, 192], 192, rank)
        xs = [torch.randn(7, 192, generator=gen) for _ in range(2)]
        base = amap(*xs)
        for i in range(2):
            for g in range(3):
                moved = [x.clone() for x in xs]
                moved[i][:, g * 64:(g + 1) * 64] += 10 * torch.randn(7, 64, generator=gen)
                out = amap(*moved)
                others = [k for k in range(3) if k != g]
                for k in others:
                    assert torch.equal(out[:, k * 64:(k + 1) * 64], base[:, k * 64:(k + 1) * 64]), (rank, i, g, k)
                assert not torch.equal(out[:, g * 64:(g + 1) * 64], base[:, g * 64:(g + 1) * 64])


def test_dense_op_weights_split_rows_by_input():
    gen = torch.Generator().manual_seed(4)
    w, b = torch.randn(64, 32, generator=gen), torch.randn(32, generator=gen)
    blocks, up, bias = AffineMap(bias=b, weight=w).op_weights()
    assert [t.shape for t in blocks] == [(1, 32, 32)] * 2 and up is None and bias is b
    assert torch.equal(torch.cat([t[0] for t in blocks]), w) and blocks[0].data_ptr() == w.data_ptr()
    low = AffineMap(bias=b, down=w[:, :3], up=torch.randn(3, 32, generator=gen))
    blocks, up, _ = low.op_weights([16, 48])
    assert [t.shape for t in blocks] == [(1, 16, 3), (1, 48, 3)] and torch.equal(up[0], low.up)
    assert AffineMap(bias=b).op_weights() == ([], None, b)
    with pytest.raises(ValueError, match="in_widths"):
        low.op_weights([16, 16])


@pytest.mark.parametrize("kw", [
    dict(blocks=(torch.zeros(2, 3, 4),), block_up=torch.zeros(2, 5, 4)),  # up's rank is not the blocks' M
    dict(blocks=(torch.zeros(2, 3, 4), torch.zeros(3, 3, 4))),             # two G
    dict(blocks=(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))),             # two M
    dict(blocks=(torch.zeros(6, 4),)),                                     # not [G, C_i/G, M]
    dict(blocks=()),                                                       # no inputs
    dict(blocks=(torch.zeros(2, 3, 4),), weight=torch.zeros(6, 8)),        # both structures
    dict(block_up=torch.zeros(2, 4, 4)),                                   # up without blocks
    dict(blocks=(torch.zeros(2, 3, 5),)),                                  # bias [8] is not G * M = 10
])
def test_affine_map_refuses_inconsistent_blocks(kw):
    with pytest.raises(ValueError, match="block"):
        AffineMap(bias=torch.zeros(8), **kw)
    AffineMap(bias=torch.zeros(8), blocks=(torch.zeros(2, 3, 4),))  # and consistent ones are taken
    AffineMap(bias=torch.zeros(8), blocks=(torch.zeros(2, 3, 2),), block_up=torch.zeros(2, 2, 4))


@pytest.mark.parametrize("rank", [None, 3])
@pytest.mark.parametrize("groups, widths", [(2, [32]), (2, [32, 32]), (3, [48, 48]), (4, [16, 8])])
def test_per_head_fit_is_one_ridge_fit_per_head(groups, widths, rank):
    """The block-diagonal ridge decouples: group g's blocks are fit_ridge on group g's own columns alone."""
    gen = torch.Generator().manual_seed(groups + len(widths))
    n, c_out = 600, 8 * groups
    xs = [torch.randn(n, w, generator=gen) * torch.rand(w, generator=gen) * 3 + torch.randn(w, generator=gen)
          for w in widths]
    y = torch.cat(xs, 1) @ torch.randn(sum(widths), c_out, generator=gen) + 0.5 * torch.randn(n, c_out, generator=gen)
    got = fit_ridge_blocks(_moments(xs, y, n, torch.device("cpu")), widths, groups, 1e-2, rank)
    assert got.groups == groups and got.rank == rank
    out = c_out // groups
    for g in range(groups):
        cols = [x[:, g * (x.shape[1] // groups):(g + 1) * (x.shape[1] // groups)] for x in xs]
        alone = fit_ridge(_moments(cols, y[:, g * out:(g + 1) * out], n, torch.device("cpu")), 1e-2, rank)
        mine = torch.cat([b[g] for b in got.blocks])
        # float64 moments summed in another order, fp32 storage: ~1e-6 relative
        if rank is None:
            torch.testing.assert_close(mine, alone.weight, rtol=1e-4, atol=1e-5)
        else:  # eigenvector signs are arbitrary: compare the product down @ up
            torch.testing.assert_close(mine @ got.block_up[g], alone.down @ alone.up, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.bias[g * out:(g + 1) * out], alone.bias, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="groups"):
        fit_ridge_blocks(_moments(xs, y, n, torch.device("cpu")), widths, 5, 1e-2, rank)


# ---- calibration, the cache, the file ------------------------------------------------------------------------------
def test_per_head_calibration_shapes_and_heads_stay_apart(model, per_head):
    c, heads, hd = per_head.kv_width, per_head.num_kv_heads, per_head.head_dim
    assert heads == 2 and per_head.calibration["structure"] == "per-head"
    for layer in range(1, per_head.num_layers):
        k, v = per_head.key_maps[layer], per_head.value_maps[layer]
        assert [tuple(b.shape) for b in k.blocks] == [(heads, hd, hd)]
        assert [tuple(b.shape) for b in v.blocks] == [(heads, hd, hd)] * 2 and k.bias.shape == (c,)
    x = torch.randn(9, c)
    moved = x.clone()
    moved[:, hd:] += 5.0  # head 1 of every input
    for layer in range(1, per_head.num_layers):
        a, b = per_head.predict_keys(layer, x, like=x), per_head.predict_keys(layer, moved, like=x)
        assert torch.equal(a[:, :hd], b[:, :hd]) and not torch.equal(a[:, hd:], b[:, hd:])
        a, b = per_head.predict_values(layer, x, x), per_head.predict_values(layer, moved, moved)
        assert torch.equal(a[:, :hd], b[:, :hd])
    low = calibrate(model, random_token_windows(4, 160, seed=5), bits=2, window=160, structure="per-head", rank=5,
                    progress=False)
    assert low.key_maps[1].rank == 5 and low.value_maps[2].block_up.shape == (2, 5, hd)
    with pytest.raises(ValueError, match="structure"):
        calibrate(model, random_token_windows(4, 160, seed=5), window=160, structure="per_head", progress=False)


def test_per_head_cache_errors_match_the_calibration_report(model, per_head):
    """As test_cache's test for full rank: the held-out window through the cache has the report's errors."""
    held_out = random_token_windows(4, 160, seed=5)[-1]
    cache = AquaKVCache(model, per_head, buffer=16)
    seen = _record_updates(cache)
    _feed(model, held_out[None], cache, [160])
    for (k, v), row in zip(_chunk_errors(cache, seen), per_head.report):
        # the same fp16-capture vs fp16-buffer code flips as for full rank (measured there: up to 2.3% off)
        assert k == pytest.approx(row["key_rel_err"], rel=0.05) and v == pytest.approx(row["value_rel_err"], rel=0.05)


@pytest.mark.parametrize("rank", [None, 5])
def test_per_head_file_round_trip_is_exact(model, tmp_path, rank):
    preds = calibrate(model, random_token_windows(3, 120, seed=2), bits=2, window=120, structure="per-head",
                      rank=rank, progress=False)
    preds.save(tmp_path / "p.safetensors")
    loaded = AquaKVPredictors.load(tmp_path / "p.safetensors")
    x = torch.randn(6, preds.kv_width)
    for a, b in zip(preds.key_maps + preds.value_maps, loaded.key_maps + loaded.value_maps):
        assert a.tensors().keys() == b.tensors().keys()
        assert all(torch.equal(t, b.tensors()[name]) for name, t in a.tensors().items())
    for layer in range(preds.num_layers):
        k = preds.predict_keys(layer, x, like=x)
        assert torch.equal(k, loaded.predict_keys(layer, x, like=x))
        assert torch.equal(preds.predict_values(layer, k, x), loaded.predict_values(layer, k, x))
    assert _meta(tmp_path / "p.safetensors")["format_version"] == 2
    assert "per-head" in repr(loaded) and loaded.calibration["structure"] == "per-head"


def _meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["aquakv"])


# ---- the schema of block-diagonal maps: strict, one ValueError naming path and field ------------------------------
def _saved_per_head(model, tmp_path, rank=None):
    from safetensors.torch import load_file

    gen = torch.Generator().manual_seed(7)
    info = AquaKVPredictors.model_info_of(model)
    c, n = info["kv_width"], info["num_layers"]
    keys = [AffineMap(bias=torch.randn(c, generator=gen))] + [_random_blocks(gen, 2, [c], c, rank) for _ in range(n - 1)]
    values = [AffineMap(bias=torch.randn(c, generator=gen))] + [_random_blocks(gen, 2, [c, c], c, rank)
                                                                 for _ in range(n - 1)]
    settings = AquaKVPredictors.zeros(model).settings
    path = tmp_path / "good.safetensors"
    AquaKVPredictors(keys, values, settings, info).save(path)
    return load_file(str(path)), _meta(path)


def _set(name, shape):
    return lambda t, m: t.__setitem__(name, torch.zeros(*shape))


BLOCK_CORRUPTIONS = {  # (mutation, rank of the saved file, text the message must hold); C = 32, 2 KV heads of 16
    "version 1 with blocks": (lambda t, m: m.__setitem__("format_version", 1), None, "format_version 2"),
    "G = 1": (_set("key.1.block_weight.0", (1, 32, 32)), None, "'key.1.block_weight.0'"),
    "G does not divide the heads": (_set("key.2.block_weight.0", (4, 8, 8)), None, "num_kv_heads"),
    "block of the wrong width": (_set("value.1.block_weight.1", (2, 16, 8)), None, "'value.1.block_weight.1'"),
    "a value block missing": (lambda t, m: t.pop("value.3.block_weight.1"), None, "value.3"),
    "a third value input": (_set("value.3.block_weight.2", (2, 16, 16)), None, "value.3"),
    "a key input index 1": (lambda t, m: t.__setitem__("key.1.block_weight.1", t.pop("key.1.block_weight.0")), None,
                            "key.1"),
    "dense weight beside blocks": (_set("key.1.weight", (32, 32)), None, "key.1"),
    "blocks on layer 0": (_set("key.0.block_weight.0", (2, 16, 16)), None, "key.0"),
    "rank 0": (lambda t, m: (t.__setitem__("key.1.block_up", torch.zeros(2, 0, 16)),
                             t.__setitem__("key.1.block_down.0", torch.zeros(2, 16, 0))), 3, "'key.1.block_up'"),
    "rank above C/G": (lambda t, m: (t.__setitem__("key.1.block_up", torch.zeros(2, 17, 16)),
                                     t.__setitem__("key.1.block_down.0", torch.zeros(2, 16, 17))), 3, "C/G = 16"),
    "down and up ranks differ": (_set("value.2.block_up", (2, 4, 16)), 3, "value.2.block_down.0"),
    "up of another G": (_set("value.2.block_up", (1, 3, 32)), 3, "'value.2.block_up'"),
    "weight beside down": (_set("key.2.block_weight.0", (2, 16, 16)), 3, "key.2"),
    "block_up without down": (lambda t, m: t.__setitem__("key.3.block_up", torch.zeros(2, 3, 16)), None, "key.3"),
    "nan block": (lambda t, m: t["key.1.block_weight.0"].__setitem__((1, 0, 0), float("nan")), None,
                  "'key.1.block_weight.0'"),
    "block index 10": (_set("key.1.block_weight.10", (2, 16, 16)), None, "'key.1.block_weight.10'"),
}


@pytest.mark.parametrize("case", sorted(BLOCK_CORRUPTIONS))
def test_load_refuses_bad_block_diagonal_maps_naming_path_and_field(model, tmp_path, case):
    from test_predictors import _write

    mutate, rank, field = BLOCK_CORRUPTIONS[case]
    tensors, meta = _saved_per_head(model, tmp_path, rank)
    mutate(tensors, meta)
    path = _write(tmp_path, tensors, meta)
    with pytest.raises(ValueError) as err:
        AquaKVPredictors.load(path)
    assert str(err.value).startswith(str(path)) and field in str(err.value), err.value
    assert "\n" not in str(err.value)


def test_unmutated_block_files_load(model, tmp_path):
    """The refusals above are about their mutation: the same files untouched load, at both ranks."""
    from test_predictors import _write

    for rank in (None, 3):
        tensors, meta = _saved_per_head(model, tmp_path, rank)
        loaded = AquaKVPredictors.load(_write(tmp_path, tensors, meta))
        assert loaded.key_maps[1].groups == 2 and loaded.key_maps[1].rank == rank
