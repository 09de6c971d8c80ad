"""One layer of one vLLM forward, on plain tensors: write the new tokens into the pages, then decode every page the
batch reads. Nothing here imports vLLM (the backend in `aquakv.vllm.backend` calls this, then vLLM's attention).

    write   the new tokens' keys are un-rotated, predicted from the chain's reconstruction of the same tokens,
            and only the residual is coded into their page rows (`KVCodec.encode`);
    read    every page the batch reads is decoded (`KVCodec.decode`: one fused `aquakv.ops.aqua_reconstruct` per
            part) into the scratch rows of `ForwardPlan`, keys re-rotated, in the model's dtype; its un-rotated
            reconstruction is the next layer's chain.

The new tokens themselves are attended exact, as the transformers cache does for the tokens of the forward that
compresses them; every later forward reads them decoded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from aquakv.kv.aqua_codec import AquaKVCodec
from aquakv.kv.higgs_store import to_heads
from aquakv.kv.rope import unrotate
from aquakv.vllm.pages import RowLayout
from aquakv.vllm.plan import ForwardPlan

# positions [T] int64 -> (cos, sin) [T, R] float32, the model's rotary tables
RopeTables = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# (cos, sin) [rows, R] of every scratch row of a plan: evaluated once per forward, read by every layer
RowTables = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Chain:
    """One layer's reconstruction of every scratch row (un-rotated keys and values [rows, C], float32): what the
    next layer is predicted from. Lives for one forward (`aquakv.vllm.scratch.ForwardScratch` owns it)."""

    layer: int
    keys: torch.Tensor
    values: torch.Tensor
    plan: ForwardPlan  # whose scratch rows these are

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


def write_new_tokens(codec: AquaKVCodec, layout: RowLayout, layer: int, plan: ForwardPlan, keys: torch.Tensor,
                     values: torch.Tensor, pages: torch.Tensor, chain: Chain | None, tables: RowTables) -> None:
    """keys/values [N, H, D] of this forward's tokens (keys after RoPE, as vLLM hands them); pages: the layer's
    cache, any shape whose last dim is the row bytes and whose rows are slots. Codes the tokens with slot >= 0."""
    if plan.new_rows.numel() == 0:
        return
    h = keys.shape[1]
    k = keys[plan.new_tokens].float().transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
    v = values[plan.new_tokens].float().transpose(0, 1).unsqueeze(0)
    cos, sin = tables[0][plan.new_rows], tables[1][plan.new_rows]
    k = unrotate(k, cos.unsqueeze(0), sin.unsqueeze(0))
    prev = None
    if chain is not None:
        prev = (to_heads(chain.keys[plan.new_rows].unsqueeze(0), h), to_heads(chain.values[plan.new_rows].unsqueeze(0), h))
    store, _, _ = codec.encode(layer, k, v, prev)
    pages.view(-1, layout.row_bytes)[plan.new_slots] = layout.pack(store)


def read_pages(codec: AquaKVCodec, layout: RowLayout, layer: int, plan: ForwardPlan, pages: torch.Tensor,
               chain: Chain | None, tables: RowTables, dtype: torch.dtype, keep_chain: bool
               ) -> tuple[torch.Tensor, torch.Tensor, Chain | None]:
    """Decode every page the batch reads -> (keys re-rotated, values) [rows, H, D] in `dtype`, in scratch-row order,
    and this layer's Chain (None unless keep_chain)."""
    rows = pages.view(-1, plan.block_size, layout.row_bytes).index_select(0, plan.blocks)
    store = layout.unpack(rows.view(-1, layout.row_bytes))
    h = codec.num_kv_heads
    cos, sin = tables
    prev = None if chain is None else (to_heads(chain.keys.unsqueeze(0), h), to_heads(chain.values.unsqueeze(0), h))
    mine = None
    if keep_chain:
        mine = Chain(layer, torch.empty(plan.num_rows, layout.width), torch.empty(plan.num_rows, layout.width), plan)
    chain_out = None if mine is None else (to_heads(mine.keys.unsqueeze(0), h), to_heads(mine.values.unsqueeze(0), h))
    # written straight into [rows, H, D], the layout vLLM's attention takes: no transposed copy afterwards
    keys = torch.empty((plan.num_rows, h, layout.width // h), dtype=dtype)
    values = torch.empty_like(keys)
    out = (keys.permute(1, 0, 2).unsqueeze(0), values.permute(1, 0, 2).unsqueeze(0))
    codec.decode(layer, store, prev, cos=cos.unsqueeze(0), sin=sin.unsqueeze(0), dtype=dtype, chain_out=chain_out,
                 out=out)
    return keys, values, mine
