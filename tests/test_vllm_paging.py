"""The vLLM plugin's engine-free parts: the forward plan over a batch's pages, a token row's bytes, and a layer step
(write codes, read pages) against the codec's own store path. vLLM itself is exercised in tests/vllm/."""
import math

import pytest
import torch
from aquakv.kv.aqua_codec import AquaKVCodec
from aquakv.kv.affine_map import AffineMap
from aquakv.kv.higgs_store import to_heads, to_rows
from aquakv.kv.predictors import AquaKVPredictors, AquaKVSettings
from aquakv.kv.rope import rotate
from aquakv.vllm.layer_step import read_pages, write_new_tokens
from aquakv.vllm.pages import RowLayout, layer_layouts
from aquakv.vllm.plan import plan_forward
from tiny_llama import make_tiny_llama


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama()


def _predictors(model, layer0_bits=4, adapters=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    info = AquaKVPredictors.model_info_of(model)
    c, n = info["kv_width"], info["num_layers"]
    settings = AquaKVSettings(bits=2, grid_dim=2, group_size=16, seed=3, layer0_bits=layer0_bits)
    if not adapters:
        return AquaKVPredictors([None] * n, [None] * n, settings, info)

    def amap(c_in):
        return AffineMap(bias=torch.randn(c, generator=gen), weight=0.3 * torch.randn(c_in, c, generator=gen))
    keys = [AffineMap(bias=torch.randn(c, generator=gen))] + [amap(c) for _ in range(n - 1)]
    values = [AffineMap(bias=torch.randn(c, generator=gen))] + [amap(2 * c) for _ in range(n - 1)]
    return AquaKVPredictors(keys, values, settings, info)


def _rope(head_dim, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)

    def tables(positions):
        ang = positions.float()[:, None] * inv[None, :]
        return torch.cat([ang.cos(), ang.cos()], 1), torch.cat([ang.sin(), ang.sin()], 1)
    return tables


# ---- the plan --------------------------------------------------------------------------------------------------
def _plan_reference(seq_lens, table, slots, bs):
    """The plan by loops: pages read, each one's index in its sequence, renumbered table, new tokens' rows."""
    pages = {}
    for r, length in enumerate(seq_lens.tolist()):
        for j in range(math.ceil(length / bs)):
            pages.setdefault(int(table[r, j]), set()).add(j)
    blocks = sorted(pages)
    rank = {p: i for i, p in enumerate(blocks)}
    renumbered = torch.zeros(table.shape, dtype=torch.int32)
    for r, length in enumerate(seq_lens.tolist()):
        for j in range(math.ceil(length / bs)):
            renumbered[r, j] = rank[int(table[r, j])]
    positions = [next(iter(pages[p])) * bs + o for p in blocks for o in range(bs)]
    rows = [rank[s // bs] * bs + s % bs for s in slots.tolist() if s >= 0]
    return blocks, renumbered, positions, rows


@pytest.mark.parametrize("seed", range(12))
def test_plan_matches_a_loop_over_requests(seed):
    gen = torch.Generator().manual_seed(seed)
    bs = [4, 8, 16][seed % 3]
    reqs = int(torch.randint(1, 6, (1,), generator=gen))
    max_blocks = 6
    free = torch.randperm(64, generator=gen).tolist()
    shared = [free.pop() for _ in range(2)]  # a cached prefix of up to two pages, shared by some requests
    table = torch.zeros(reqs, max_blocks, dtype=torch.int32)
    seq_lens, slots = [], []
    for r in range(reqs):
        length = int(torch.randint(1, max_blocks * bs + 1, (1,), generator=gen))
        prefix = min(len(shared), (length - 1) // bs) if r % 2 == 0 else 0
        row = shared[:prefix] + [free.pop() for _ in range(max_blocks - prefix)]
        table[r] = torch.tensor(row, dtype=torch.int32)
        new = int(torch.randint(1, length - prefix * bs + 1, (1,), generator=gen))
        seq_lens.append(length)
        slots += [int(table[r, p // bs]) * bs + p % bs for p in range(length - new, length)]
        slots += [-1] * int(torch.randint(0, 2, (1,), generator=gen))  # padding
    seq_lens, slots = torch.tensor(seq_lens), torch.tensor(slots)
    plan = plan_forward(seq_lens, table, slots, bs)
    blocks, renumbered, positions, rows = _plan_reference(seq_lens, table, slots, bs)
    assert plan.blocks.tolist() == blocks
    assert torch.equal(plan.table, renumbered)
    assert plan.positions.tolist() == positions
    assert plan.new_rows.tolist() == rows
    assert plan.new_tokens.tolist() == [s >= 0 for s in slots.tolist()]


def test_plan_refuses_a_page_at_two_positions():
    table = torch.tensor([[5, 6], [6, 5]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="page 5 sits at two different positions"):
        plan_forward(torch.tensor([8, 8]), table, torch.tensor([20, 21]), 4)


def test_plan_refuses_a_slot_outside_the_block_tables():
    with pytest.raises(RuntimeError, match="outside every request's block table"):
        plan_forward(torch.tensor([3]), torch.tensor([[2]], dtype=torch.int32), torch.tensor([4 * 7]), 4)


# ---- a token row -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer0_bits", [4, None])
def test_rows_round_trip_to_the_same_decode(model, layer0_bits):
    codec = AquaKVCodec(_predictors(model, layer0_bits=layer0_bits))
    gen = torch.Generator().manual_seed(1)
    c, h = codec.predictors.kv_width, codec.num_kv_heads
    for layer, layout in enumerate(layer_layouts(codec)):
        k, v = (to_heads(torch.randn(1, 9, c, generator=gen), h) for _ in range(2))
        chain = None if layer == 0 else tuple(to_heads(torch.randn(1, 9, c, generator=gen), h) for _ in range(2))
        store, _, _ = codec.encode(layer, k, v, chain)
        rows = layout.pack(store)
        assert rows.dtype == torch.uint8 and rows.shape == (9, layout.row_bytes)
        again = layout.unpack(rows)
        for a, b in zip(codec.decode(layer, store, chain), codec.decode(layer, again, chain)):
            assert torch.equal(a, b)


def test_row_bytes_are_the_codec_bits(model):
    codec = AquaKVCodec(_predictors(model, layer0_bits=None))
    c = codec.predictors.kv_width  # 32 values, groups of 16: 2-bit codes 8 bytes + 2 fp16 scales, per part
    assert [layout.row_bytes for layout in layer_layouts(codec)] == [4 * c] + [2 * (8 + 4)] * 3
    assert RowLayout.of_layer(codec, 1).quantizer is codec.quantizers[1]


# ---- a layer step against the codec's store path -----------------------------------------------------------------
@pytest.mark.parametrize("adapters", [True, False])
def test_paged_layers_decode_like_the_store_path(model, adapters):
    """Two requests sharing a prefix page, fed in two forwards; every layer's decoded pages equal the codec's own
    decode of the same tokens encoded in the same runs (re-rotated keys, values and the chain)."""
    codec = AquaKVCodec(_predictors(model, adapters=adapters))
    layouts = layer_layouts(codec)
    h, d, c = codec.num_kv_heads, codec.predictors.head_dim, codec.predictors.kv_width
    bs, rope, gen = 4, _rope(d), torch.Generator().manual_seed(7)
    table = torch.tensor([[3, 9, 4, 0], [3, 1, 6, 0]], dtype=torch.int32)
    pages = [torch.zeros(12, 1, bs, layout.row_bytes, dtype=torch.uint8) for layout in layouts]
    # states[layer] = un-rotated keys, values [T, C] of request 0 (prefix 0..3 shared) and request 1's own tokens
    truth = [tuple(torch.randn(10, c, generator=gen) for _ in range(2)) for _ in layouts]
    other = [tuple(torch.randn(10, c, generator=gen) for _ in range(2)) for _ in layouts]
    for r1 in range(len(layouts)):  # request 1 shares request 0's first page
        other[r1][0][:4], other[r1][1][:4] = truth[r1][0][:4], truth[r1][1][:4]
    stores = {}  # (request, layer) -> the store path's HiggsStore
    for start, stop in ((0, 6), (6, 10)):  # forward 1: both requests' first 6 tokens; forward 2: the rest
        lens = torch.tensor([stop, stop])
        tokens = [(r, p) for r in range(2) for p in range(start, stop) if not (r == 1 and p < 4)]
        slots = torch.tensor([int(table[r, p // bs]) * bs + p % bs for r, p in tokens])
        plan = plan_forward(lens, table, slots, bs)
        chain = store_chain = None
        for layer, layout in enumerate(layouts):
            src = [truth, other]
            k_new = torch.stack([src[r][layer][0][p] for r, p in tokens]).view(-1, h, d)
            v_new = torch.stack([src[r][layer][1][p] for r, p in tokens]).view(-1, h, d)
            cos, sin = rope(torch.tensor([p for _, p in tokens]))
            k_rot = rotate(k_new.transpose(0, 1).unsqueeze(0), cos[None], sin[None])[0].transpose(0, 1)
            tables = rope(plan.positions)
            write_new_tokens(codec, layout, layer, plan, k_rot, v_new, pages[layer], chain, tables)
            keys, values, chain = read_pages(codec, layout, layer, plan, pages[layer], chain, tables, torch.float32,
                                             keep_chain=True)
            # the store path: request 0 encodes [start, stop) with its own chain; decode everything so far
            prev = None if layer == 0 else store_chain
            kk = to_heads(truth[layer][0][start:stop][None], h)
            vv = to_heads(truth[layer][1][start:stop][None], h)
            chain_new = None if prev is None else tuple(x[:, :, start:stop] for x in prev)
            new, _, _ = codec.encode(layer, kk, vv, chain_new)
            stores[layer] = codec.append(stores.get(layer), new)
            out = (torch.empty(1, h, stop, d), torch.empty(1, h, stop, d))
            cos_all, sin_all = rope(torch.arange(stop))
            k_ref, v_ref = codec.decode(layer, stores[layer], prev, cos=cos_all[None], sin=sin_all[None],
                                        chain_out=out)
            store_chain = out
            rows0 = [int(plan.table[0, p // bs]) * bs + p % bs for p in range(stop)]
            torch.testing.assert_close(keys[rows0], k_ref[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(values[rows0], v_ref[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(chain.keys[rows0], to_rows(out[0])[0], rtol=1e-5, atol=1e-5)


def test_a_plan_finds_its_rows_in_another_groups_plan():
    """Layers with another page size get their own pages and block table from vLLM; the chain crosses by (request,
    index in sequence), so both plans agree on every token's position."""
    bs = 4
    seq_lens, slots_a = torch.tensor([7, 5]), torch.tensor([4 * 8 + 2, 4 * 9 + 0])
    a = plan_forward(seq_lens, torch.tensor([[5, 8], [2, 9]], dtype=torch.int32), slots_a, bs)
    b = plan_forward(seq_lens, torch.tensor([[11, 3], [7, 4]], dtype=torch.int32), torch.tensor([14, 16]), bs)
    rows = b.rows_in(a)
    assert torch.equal(a.positions[rows], b.positions)
    chain = torch.arange(a.num_rows)
    for r, length in enumerate(seq_lens.tolist()):
        for p in range(length):  # the same (request, position) reads the same chain row, whichever group
            row_b = int(b.table[r, p // bs]) * bs + p % bs
            assert int(chain[rows][row_b]) == int(a.table[r, p // bs]) * bs + p % bs
