"""AQUA-KV under tensor parallelism: the predictors one rank serves.

vLLM gives each of T ranks KV heads [r H/T, (r+1) H/T). A full-rank predictor mixes every head into every other,
so a rank would need the other ranks' reconstructions (an all-gather per layer and step). A block-diagonal file
(`aquakv calibrate --structure per-head`: G blocks of whole heads, each predicted from the same heads of the
previous layer) does not: when T divides G, a rank's heads are whole blocks, and its slice of each map predicts
them exactly as the whole map would. So such a file serves every T that divides G, and a dense file serves T = 1.
"""
from __future__ import annotations

from aquakv.kv.affine_map import AffineMap
from aquakv.kv.predictors import AquaKVPredictors


def served_tp_sizes(preds: AquaKVPredictors) -> list[int]:
    """The tensor-parallel sizes a predictors file serves: the divisors of its blocks count (1 for dense maps)."""
    maps = [m for m in preds.key_maps + preds.value_maps if m is not None and m.in_features is not None]
    groups = {m.groups for m in maps} or {preds.num_kv_heads}  # intercept-only maps split by any whole head
    if len(groups) != 1:
        return [1]
    (g,) = groups
    return [t for t in range(1, g + 1) if g % t == 0 and preds.num_kv_heads % t == 0]


def shard_predictors(preds: AquaKVPredictors, tp_size: int, rank: int) -> AquaKVPredictors:
    """The predictors of rank `rank` of `tp_size`: every map cut to that rank's heads (ValueError naming the sizes
    the file serves when `tp_size` is not one of them)."""
    if tp_size == 1:
        return preds
    served = served_tp_sizes(preds)
    if tp_size not in served:
        raise ValueError(f"it serves tensor_parallel_size {' or '.join(map(str, served))}, not {tp_size}: its maps "
                         f"mix KV heads that tensor parallelism places on different ranks (calibrate with "
                         f"`--structure per-head`, whose blocks serve every size that divides the KV heads)")
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} is outside tensor_parallel_size {tp_size}")
    info = dict(preds.model_info)
    info["num_kv_heads"] = preds.num_kv_heads // tp_size
    info["kv_width"] = preds.kv_width // tp_size

    def cut(m: AffineMap | None) -> AffineMap | None:
        return None if m is None else _rank_slice(m, tp_size, rank)

    return AquaKVPredictors([cut(m) for m in preds.key_maps], [cut(m) for m in preds.value_maps], preds.settings,
                            info, report=preds.report, calibration=preds.calibration,
                            exact_layers=preds.exact_layers)


def _rank_slice(m: AffineMap, tp_size: int, rank: int) -> AffineMap:
    """Output columns (and, for blocks, the groups that make them) of one rank: rank r of T holds 1/T of each."""
    width = m.bias.shape[0] // tp_size
    bias = m.bias[rank * width:(rank + 1) * width].clone()
    if m.blocks is None:  # intercept only (a chain start): the rank's channels of the calibrated means
        return AffineMap(bias=bias)
    per_rank = m.groups // tp_size
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    return AffineMap(bias=bias, blocks=tuple(b[part].clone() for b in m.blocks),
                     block_up=None if m.block_up is None else m.block_up[part].clone())
