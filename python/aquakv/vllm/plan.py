"""What one forward of a vLLM batch reads and writes, worked out once per forward and shared by every layer.

vLLM hands each layer a batch of requests: their block tables (physical page ids, in sequence order), their
lengths, and the page slot of every new token. AQUA-KV decodes a layer from the previous layer's reconstruction
of the same tokens, so the plugin decodes the batch's *unique* pages once per layer, into a scratch in the order
of `ForwardPlan.blocks`, and attends through a block table renumbered into that scratch. A page shared by several
requests (prefix caching) is decoded once; it sits at the same position in every sequence that shares it, so its
tokens have one rotary position each. Nothing here imports vLLM.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ForwardPlan:
    blocks: torch.Tensor  # [U] int64: physical page ids the batch reads, ascending
    table: torch.Tensor  # [R, max_blocks] int32: each request's block table renumbered into scratch blocks
    positions: torch.Tensor  # [U * block_size] int64: the rotary position of every scratch token
    new_tokens: torch.Tensor  # [N] bool over the forward's tokens: those vLLM writes (slot >= 0)
    new_rows: torch.Tensor  # [n_new] int64: the scratch row of each written token
    new_slots: torch.Tensor  # [n_new] int64: its page slot (page id * block_size + offset)
    owner: torch.Tensor  # [U] int64: request * max_blocks + index of a sequence that reads each scratch block
    block_size: int

    @property
    def num_rows(self) -> int:
        return self.blocks.numel() * self.block_size

    def rows_in(self, other: "ForwardPlan") -> torch.Tensor:
        """[num_rows] int64: where each of this plan's scratch rows sits in `other`, a plan of the same forward for
        another group of layers (vLLM gives layers with another page size their own pages and block tables)."""
        if other.block_size != self.block_size:
            raise RuntimeError(f"aquakv: layer groups with block sizes {self.block_size} and {other.block_size}")
        width = other.table.shape[1]
        blocks = other.table.view(-1)[(self.owner // self.table.shape[1]) * width + self.owner % self.table.shape[1]]
        rows = (blocks.to(torch.int64)[:, None] * self.block_size + torch.arange(self.block_size)[None, :]).view(-1)
        if not torch.equal(other.positions[rows], self.positions):
            raise RuntimeError("aquakv: two layer groups of one forward disagree on the positions of their tokens")
        return rows


def plan_forward(seq_lens: torch.Tensor, block_table: torch.Tensor, slot_mapping: torch.Tensor,
                 block_size: int) -> ForwardPlan:
    """seq_lens [R] (tokens of each request after this forward), block_table [R, max_blocks], slot_mapping [N]
    (page slot of each of this forward's tokens, -1 for padding) -> the ForwardPlan."""
    seq_lens = seq_lens.to(torch.int64)
    num_blocks = (seq_lens + block_size - 1) // block_size
    if num_blocks.numel() and int(num_blocks.max()) > block_table.shape[1]:
        raise RuntimeError(f"aquakv: a request spans {int(num_blocks.max())} pages but its block table has "
                           f"{block_table.shape[1]} columns")
    used = torch.arange(block_table.shape[1])[None, :] < num_blocks[:, None]  # [R, max_blocks]
    pages = block_table.to(torch.int64)[used]
    index_in_sequence = torch.arange(block_table.shape[1]).expand_as(block_table)[used]
    flat_index = torch.arange(block_table.numel()).view(block_table.shape)[used]
    blocks, scratch_of = torch.unique(pages, sorted=True, return_inverse=True)
    owner = torch.full((blocks.numel(),), block_table.numel(), dtype=torch.int64)
    owner.scatter_reduce_(0, scratch_of, flat_index, "amin")
    first = torch.full((blocks.numel(),), block_table.shape[1], dtype=torch.int64)
    last = torch.full((blocks.numel(),), -1, dtype=torch.int64)
    first.scatter_reduce_(0, scratch_of, index_in_sequence, "amin")
    last.scatter_reduce_(0, scratch_of, index_in_sequence, "amax")
    if not torch.equal(first, last):
        bad = int(blocks[(first != last).nonzero()[0, 0]])
        raise RuntimeError(f"aquakv: page {bad} sits at two different positions in the batch's sequences; its keys "
                           f"cannot be re-rotated for both")
    table = torch.zeros(block_table.shape, dtype=torch.int32)
    table[used] = scratch_of.to(torch.int32)
    positions = (first[:, None] * block_size + torch.arange(block_size)[None, :]).reshape(-1)

    slots = slot_mapping.to(torch.int64)
    new_tokens = slots >= 0
    new_slots = slots[new_tokens]
    page_of_new = new_slots // block_size
    scratch_block = torch.searchsorted(blocks, page_of_new)
    if bool((scratch_block >= blocks.numel()).any()) or not torch.equal(blocks[scratch_block.clamp_max(
            max(blocks.numel() - 1, 0))], page_of_new):
        raise RuntimeError("aquakv: a new token's slot lies in a page outside every request's block table")
    new_rows = scratch_block * block_size + new_slots % block_size
    return ForwardPlan(blocks, table, positions, new_tokens, new_rows, new_slots, owner, block_size)
