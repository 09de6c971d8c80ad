"""The attention sink, kept exact: position 0's keys and values, per first token, for every layer.

A sequence's first token is its attention sink: most heads park their attention there, and coding it at 2 bits
costs far more than any other token (SmolLM2, AQUA-KV-2 through the transformers cache fed 128 at a time: +22%
perplexity with no exact token, +0.26% with position 0 exact). vLLM's pages hold one fixed-size row per token, so
the exact sink lives beside them, in this per-worker table.

Position 0 attends only to itself, so its keys and values in every layer are a function of the first token alone:
the table caches that function. It is keyed by the token's layer-0 row of codes (which identifies the token: a row
is its codes plus fp16 group norms), filled when a position-0 token is written, and read for every page that starts
a sequence. Its codes are still written, so a sequence whose entry was evicted (beyond `capacity` distinct first
tokens, least recently used first) reads its sink decoded, as every other token, and the eviction is logged.
Bytes: entries x layers x 2 x C x the model dtype's size (SmolLM2 in float32: 23 KiB per distinct first token).
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch

log = logging.getLogger("vllm.aquakv")


class SinkTable:
    def __init__(self, num_layers: int, capacity: int = 1024):
        self.num_layers, self.capacity = num_layers, capacity
        self._entries: OrderedDict[bytes, list] = OrderedDict()
        self.evicted = 0

    @staticmethod
    def key(layer0_row: torch.Tensor) -> bytes:
        return layer0_row.contiguous().numpy().tobytes()

    def record(self, key: bytes, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys/values [H, D] of position 0 at `layer`, exact (RoPE at position 0 is the identity)."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = [None] * self.num_layers
            if len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
                self.evicted += 1
                if self.evicted in (1, 10, 100) or self.evicted % 1000 == 0:
                    log.warning("aquakv: %d exact attention sinks evicted (more than %d distinct first tokens); "
                                "those sequences read their first token decoded", self.evicted, self.capacity)
        self._entries.move_to_end(key)
        entry[layer] = (keys.detach().clone(), values.detach().clone())

    def lookup(self, key: bytes, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[layer]

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for entry in self._entries.values() for kv in entry if kv is not None
                   for k, v in (kv,))


def sink_keys(plan, layer0_pages: torch.Tensor, row_bytes: int) -> tuple[list, list]:
    """After layer 0 wrote this forward's tokens: ([(index among the new tokens, key)] of new position-0 tokens,
    [(request, key)] of the requests whose first page the batch reads)."""
    rows = layer0_pages.view(-1, row_bytes)
    new_positions = plan.positions[plan.new_rows]
    new = [(int(i), SinkTable.key(rows[plan.new_slots[i]])) for i in (new_positions == 0).nonzero().flatten()]
    starts = (plan.positions[::plan.block_size] == 0).nonzero().flatten()
    width = plan.table.shape[1]
    read = [(int(plan.owner[b]) // width, SinkTable.key(rows[plan.blocks[b] * plan.block_size])) for b in starts]
    return new, read


def keep_sinks_exact(table: SinkTable, keys_of_forward: tuple[list, list], layer: int, plan, new_keys: torch.Tensor,
                     new_values: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Record this layer's new position-0 tokens (new_keys/new_values [n_new, H, D]), then put every known sink
    into the decoded scratch rows (keys/values [rows, H, D])."""
    new, read = keys_of_forward
    for i, key in new:
        table.record(key, layer, new_keys[i], new_values[i])
    for request, key in read:
        row = int(plan.table[request, 0]) * plan.block_size
        exact = table.lookup(key, layer)
        if exact is not None:
            keys[row], values[row] = exact[0].to(keys.dtype), exact[1].to(values.dtype)
