"""The plugin's per-worker scratch: the current forward's plan and the chain one layer hands the next.

vLLM runs a forward's layers in order, each with the same attention-metadata object. The first layer to see a new
metadata object starts a new forward: the plan is made once and the previous forward's chain is dropped, so no
state outlives a forward and the pages are the only memory of a request (prefix caching, preemption and
recompute need nothing else). Its size: two reconstructions (the previous layer's and this one's) of every token
the batch reads, 2 x 2 x C float32 values per token, released when the next forward starts.
"""
from __future__ import annotations

import torch

from aquakv.vllm.layer_step import Chain
from aquakv.vllm.plan import ForwardPlan, plan_forward


class ForwardScratch:
    def __init__(self):
        self._forward = None  # the vLLM forward context these belong to
        self._plans: dict[int, tuple[object, ForwardPlan]] = {}  # id(attention metadata) -> (it, its plan)
        self._tables: dict[int, tuple] = {}  # id(plan) -> (plan, (cos, sin) of its rows)
        self._chain: Chain | None = None
        self.sink_keys: tuple[list, list] = ([], [])  # this forward's sinks (aquakv.vllm.sinks.sink_keys)

    def plan(self, forward, attn_metadata, block_size: int) -> ForwardPlan:
        """The plan of this forward for the layers that share `attn_metadata` (one per group of layers with one
        page size); a new `forward` drops everything of the previous one."""
        if forward is not self._forward:
            self._forward, self._plans, self._chain, self.sink_keys = forward, {}, None, ([], [])
            self._tables = {}
        held = self._plans.get(id(attn_metadata))
        if held is None or held[0] is not attn_metadata:
            n = attn_metadata.num_actual_tokens
            held = (attn_metadata, plan_forward(attn_metadata.seq_lens, attn_metadata.block_table,
                                                attn_metadata.slot_mapping[:n], block_size))
            self._plans[id(attn_metadata)] = held
        return held[1]

    def tables(self, plan: ForwardPlan, rope) -> tuple:
        """The rotary (cos, sin) of every row of `plan`, evaluated once per forward (rope: aquakv.vllm.rope_tables)."""
        held = self._tables.get(id(plan))
        if held is None or held[0] is not plan:
            held = self._tables[id(plan)] = (plan, rope(plan.positions))
        return held[1]

    def chain_of(self, source: int | None, plan: ForwardPlan) -> Chain | None:
        """The reconstruction of layer `source` in this forward, in `plan`'s rows (None for a chain start); refuses
        a stale one."""
        if source is None:
            return None
        chain = self._chain
        if chain is None or chain.layer != source:
            have = "none" if chain is None else f"layer {chain.layer}'s"
            raise RuntimeError(f"aquakv (vLLM): this layer is predicted from layer {source}, but the scratch holds "
                               f"{have} reconstruction (layers ran out of order or a layer was skipped)")
        if chain.plan is not plan:  # the source layer has pages of another size: its rows are ordered otherwise
            rows = plan.rows_in(chain.plan)
            chain = self._chain = Chain(chain.layer, chain.keys[rows], chain.values[rows], plan)
        return chain

    def keep(self, chain: Chain | None) -> None:
        if chain is not None:
            self._chain = chain

    @property
    def nbytes(self) -> int:
        return 0 if self._chain is None else self._chain.nbytes


SCRATCH = ForwardScratch()  # one per worker process
