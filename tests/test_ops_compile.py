"""The ops are well-formed custom ops: opcheck passes (schema, fake kernel, dispatch) and torch.compile
traces them without graph breaks."""
from __future__ import annotations

import aquakv.ops as ops
import pytest
import torch
from aquakv import reference as ref
from sweeps import devices, random_grid, random_values


def sample_inputs(device: str) -> list[tuple[object, tuple, dict]]:
    """(op, args, kwargs) covering every op, every float dtype, leading dims and an empty batch."""
    signs64 = torch.from_numpy(ref.random_signs(64, seed=0)).to(device)
    grid = random_grid(16, 2, seed=1).to(device)
    grid1 = random_grid(4, 1, seed=2).to(device)
    samples = []
    for i, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16)):
        x = random_values((3, 2, 128), dtype, seed=i).to(device)
        samples.append((torch.ops.aquakv.hadamard.default, (x, signs64.repeat(2), 128**-0.5), {}))
        samples.append((torch.ops.aquakv.hadamard.default, (x, None, 1.0), {}))
        samples.append((torch.ops.aquakv.higgs_quantize.default, (x, grid, signs64, 64), {}))
        codes, scales = ops.higgs_quantize(x, grid1, signs64, 64)
        samples.append((torch.ops.aquakv.higgs_dequantize.default, (codes, scales, grid1, signs64, 64, dtype), {}))
    empty = torch.empty((0, 128), device=device)
    samples.append((torch.ops.aquakv.higgs_quantize.default, (empty, grid, signs64, 64), {}))
    for bits, count in [(1, 9), (3, 99), (8, 4), (16, 5)]:
        codes = torch.randint(0, 2**bits, (2, count), dtype=torch.int32, device=device)
        samples.append((torch.ops.aquakv.pack_bits.default, (codes, bits), {}))
        samples.append((torch.ops.aquakv.unpack_bits.default, (ops.pack_bits(codes, bits), bits, count), {}))
    return samples


def sample_id(sample: tuple) -> str:
    op, args, _ = sample
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    shapes = "-".join("x".join(map(str, a.shape)) for a in tensors)
    return f"{op.name().split('::')[1]}-{str(tensors[0].dtype)[6:]}-{shapes}"


SAMPLES = [(device, s) for device in devices() for s in sample_inputs(device)]


@pytest.mark.parametrize("device,sample", SAMPLES, ids=[f"{d}-{sample_id(s)}" for d, s in SAMPLES])
def test_opcheck(device: str, sample: tuple) -> None:
    op, args, kwargs = sample
    torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize("device", devices())
def test_compiled_round_trip_matches_eager(device: str) -> None:
    grid = random_grid(16, 2, seed=3).to(device)
    signs = torch.from_numpy(ref.random_signs(64, seed=4)).to(device)

    def round_trip(x: torch.Tensor) -> torch.Tensor:
        rotated = ops.hadamard(x, signs.repeat(4), 256**-0.5)
        codes, scales = ops.higgs_quantize(rotated, grid, signs, 64)
        x_hat = ops.higgs_dequantize(codes, scales, grid, signs, 64, x.dtype)
        packed = ops.pack_bits(ops.unpack_bits(codes, 4, 128 * x.shape[-1] // 256), 4)
        return ops.hadamard(x_hat, signs.repeat(4), 256**-0.5) + (packed != codes).sum()

    compiled = torch.compile(round_trip, fullgraph=True, backend="inductor")
    for rows in (5, 3):  # a second shape: recompiles or goes dynamic, never breaks the graph
        x = random_values((rows, 256), torch.float16, seed=rows).to(device)
        torch.testing.assert_close(compiled(x), round_trip(x), rtol=0, atol=0)
