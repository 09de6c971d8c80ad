"""The affine map an AQUA-KV predictor is made of: y = [x_1 ; ...; x_n] @ W + bias, dense, reduced rank or block
diagonal (per KV head), in float32 or with bfloat16 matmuls; and its layout for `aquakv.ops.aqua_reconstruct`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class AffineMap:
    """y = x @ W + bias, the inputs xs = (x_1 [.., C_1], ..., x_n [.., C_n]) treated as their concatenation, W one of:

    - dense: `weight` [C_in, C_out], or reduced rank `down` [C_in, r] @ `up` [r, C_out];
    - block diagonal over G groups of channels (per KV head: heads are concatenated in a state row): output group g
      sees only group g of every input. `blocks[i]` [G, C_i/G, M] per input, M = C_out/G, or M = r with
      `block_up` [G, r, C_out/G] (reduced rank per group). Computed as batched matmuls over groups, never as a
      dense matrix;
    - absent (intercept only).
    A dense map is the G = 1 case of the block layout; `op_weights` returns either in that one layout.
    """

    bias: torch.Tensor  # [C_out]
    weight: torch.Tensor | None = None
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    blocks: tuple[torch.Tensor, ...] | None = None
    block_up: torch.Tensor | None = None
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.blocks is None:
            if self.block_up is not None:
                raise ValueError("AffineMap: block_up without blocks")
            return
        self.blocks = tuple(self.blocks)
        shapes = [tuple(b.shape) for b in self.blocks]
        up = None if self.block_up is None else tuple(self.block_up.shape)
        g, m = shapes[0][0] if shapes else 0, shapes[0][-1] if shapes else 0
        per_group = m if up is None else up[-1]
        if (self.weight is not None or self.down is not None or self.up is not None or not shapes
                or any(len(s) != 3 or s[0] != g or s[2] != m for s in shapes) or up not in (None, (g, m, per_group))
                or tuple(self.bias.shape) != (g * per_group,)):
            raise ValueError(f"AffineMap: blocks {shapes}, block_up {up}, bias {list(self.bias.shape)}: expected "
                             "blocks [G, C_i/G, M] (one G and M), block_up [G, M, C_out/G] or none, bias [C_out], "
                             "and no weight/down/up")

    @property
    def groups(self) -> int:
        """G: 1 for a dense (or intercept-only) map."""
        return 1 if self.blocks is None else self.blocks[0].shape[0]

    @property
    def in_features(self) -> int | None:
        if self.blocks is not None:
            return sum(b.shape[0] * b.shape[1] for b in self.blocks)
        w = self.weight if self.weight is not None else self.down
        return None if w is None else w.shape[0]

    @property
    def rank(self) -> int | None:
        """r of a reduced-rank map (per group for a block-diagonal one); None at full rank."""
        if self.block_up is not None:
            return self.block_up.shape[1]
        return None if self.up is None else self.up.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The map's tensors by their file names: bias, weight | down + up, block_weight.<i> | block_down.<i> +
        block_up."""
        named = {"bias": self.bias, "weight": self.weight, "down": self.down, "up": self.up}
        kind = "block_weight" if self.block_up is None else "block_down"
        named.update({f"{kind}.{i}": b for i, b in enumerate(self.blocks or ())})
        named["block_up"] = self.block_up
        return {k: v for k, v in named.items() if v is not None}

    @classmethod
    def from_tensors(cls, named: dict[str, torch.Tensor]) -> "AffineMap":
        """The inverse of `tensors`."""
        plain = {k: v for k, v in named.items() if "." not in k and k != "block_up"}
        blocks = [named[k] for k in sorted((k for k in named if "." in k), key=lambda k: int(k.split(".")[1]))]
        return cls(**plain, blocks=tuple(blocks) if blocks else None, block_up=named.get("block_up"))

    def placed(self, device: torch.device, dtype: torch.dtype = torch.float32) -> "AffineMap":
        """This map on `device` with its matrices in `dtype` (the matmuls' dtype) and its bias in float32; kept."""
        key = (device, dtype)
        if key not in self._on_device:
            moved = {k: v.to(device=device, dtype=torch.float32 if k == "bias" else dtype)
                     for k, v in self.tensors().items()}
            self._on_device[key] = AffineMap.from_tensors(moved)
        return self._on_device[key]

    def op_weights(self, in_widths: list[int] | None = None
                   ) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]:
        """The layout a fused op takes: ([G, C_i/G, M] per input, up [G, r, C_out/G] or None, bias [C_out]); a dense
        map comes out as G = 1 (views of its storage, no copy). in_widths: how a dense map's rows split over its
        inputs (default: inputs of width C_out each, as AQUA-KV's are); an intercept-only map gives no inputs."""
        if self.blocks is not None:
            return list(self.blocks), self.block_up, self.bias
        w = self.weight if self.weight is not None else self.down
        if w is None:
            return [], None, self.bias
        c_in, c_out = w.shape[0], self.bias.shape[0]
        if in_widths is None:
            in_widths = [c_out] * (c_in // c_out) if c_in % c_out == 0 else [c_in]
        if sum(in_widths) != c_in:
            raise ValueError(f"AffineMap.op_weights: in_widths {in_widths} do not add up to {c_in}")
        up = None if self.up is None else self.up.unsqueeze(0)
        return [part.unsqueeze(0) for part in w.split(list(in_widths))], up, self.bias

    def __call__(self, *xs: torch.Tensor, matmul_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """xs: tensors [..., C_i] whose last dims add up to C_in (none for an intercept-only map) -> [..., C_out]
        float32. matmul_dtype: float32, or bfloat16 (inputs and matrices rounded to it, one matmul over the
        concatenated inputs accumulating in float32 and rounded once, as `aquakv.ops.aqua_reconstruct` does it)."""
        if matmul_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"AffineMap: matmul_dtype must be torch.float32 or torch.bfloat16, got {matmul_dtype}")
        p = self.placed(xs[0].device if xs else self.bias.device, matmul_dtype)
        if p.blocks is not None:
            return p._block_diagonal(xs)
        if p.weight is None and p.down is None:
            if xs:
                return p.bias.expand(*xs[0].shape[:-1], -1)
            return p.bias
        w = p.weight if p.weight is not None else p.down
        if sum(x.shape[-1] for x in xs) != w.shape[0]:
            raise ValueError(f"AffineMap: inputs of widths {[x.shape[-1] for x in xs]} do not add up to {w.shape[0]}")
        if w.dtype == torch.float32:
            out, start = None, 0
            for x in xs:  # x_1 @ W[rows_1] + x_2 @ W[rows_2]: no concatenated copy of the inputs
                part = x.float() @ w[start:start + x.shape[-1]]
                out = part if out is None else out + part
                start += x.shape[-1]
        else:  # the inputs are converted (copied) anyway: one matmul over their concatenation, rounded once
            out = torch.cat([x.to(w.dtype) for x in xs], -1) @ w
        if p.up is not None:
            out = out @ p.up
        return out.float() + p.bias

    def _block_diagonal(self, xs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        g = self.groups
        widths = [b.shape[0] * b.shape[1] for b in self.blocks]
        if [x.shape[-1] for x in xs] != widths:
            raise ValueError(f"AffineMap: inputs of widths {[x.shape[-1] for x in xs]}, the blocks take {widths}")
        lead = xs[0].shape[:-1]
        rows = math.prod(lead)
        grouped = [x.to(b.dtype).reshape(rows, g, b.shape[1]) for x, b in zip(xs, self.blocks)]
        if self.blocks[0].dtype == torch.float32:
            out = None
            for x, b in zip(grouped, self.blocks):  # [G, N, C_i/G] @ [G, C_i/G, M]: one matmul per group, batched
                part = torch.bmm(x.transpose(0, 1), b)
                out = part if out is None else out + part
        else:  # one matmul over the concatenated inputs, rounded once, as for a dense map
            out = torch.bmm(torch.cat(grouped, -1).transpose(0, 1), torch.cat(self.blocks, 1))
        if self.block_up is not None:
            out = torch.bmm(out, self.block_up)
        return out.float().transpose(0, 1).reshape(*lead, self.bias.shape[0]) + self.bias
