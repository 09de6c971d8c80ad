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
        self._metadata = None
        self._plan: ForwardPlan | None = None
        self._chain: Chain | None = None

    def plan(self, attn_metadata, block_size: int) -> ForwardPlan:
        if attn_metadata is not self._metadata:
            n = attn_metadata.num_actual_tokens
            self._plan = plan_forward(attn_metadata.seq_lens, attn_metadata.block_table,
                                      attn_metadata.slot_mapping[:n], block_size)
            self._metadata, self._chain = attn_metadata, None
        return self._plan

    def chain_of(self, source: int | None) -> Chain | None:
        """The reconstruction of layer `source` in this forward (None for a chain start); refuses a stale one."""
        if source is None:
            return None
        if self._chain is None or self._chain.layer != source:
            have = "none" if self._chain is None else f"layer {self._chain.layer}'s"
            raise RuntimeError(f"aquakv (vLLM): this layer is predicted from layer {source}, but the scratch holds "
                               f"{have} reconstruction (layers ran out of order or a layer was skipped)")
        return self._chain

    def keep(self, chain: Chain | None) -> None:
        if chain is not None:
            self._chain = chain

    @property
    def nbytes(self) -> int:
        return 0 if self._chain is None else self._chain.nbytes


SCRATCH = ForwardScratch()  # one per worker process
