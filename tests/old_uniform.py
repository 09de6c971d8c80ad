"""The KIVI min/max quantizer as it was before aquakv.uniform: the reference the shared quantizer is held to."""
import torch


def old_kivi_quantize(x: torch.Tensor, bits: int):
    """x [..., g] -> (codes uint8 unpacked, scale fp16 [..., 1], zero fp16 [..., 1]), per row of g values."""
    levels = (1 << bits) - 1
    xf = x.float()
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    zero = lo.half()
    scale = ((hi - zero.float()) / levels).half()
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    codes = torch.round((xf - zero.float()) / safe).clamp_(0, levels).to(torch.uint8)
    return codes, scale, zero
