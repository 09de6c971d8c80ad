"""Pure-NumPy reference implementations of the aquakv ops: the definition of correct.

Written for clarity, not speed; float64 inside. Each function mirrors a line of docs/method.md
and a schema in csrc/ops.cpp. The compiled kernels are tested against these.
"""
from aquakv.reference.aqua import aqua_prediction, aqua_reconstruct, rope
from aquakv.reference.bitpack import pack_bits, unpack_bits
from aquakv.reference.hadamard import hadamard, hadamard_matrix, random_signs
from aquakv.reference.linear import higgs_linear, higgs_linear_abs_terms
from aquakv.reference.higgs import (
    higgs_dequantize,
    higgs_quantize,
    higgs_quantize_scaled,
    nearest_grid_codes,
)

__all__ = [
    "aqua_prediction",
    "aqua_reconstruct",
    "rope",
    "hadamard",
    "hadamard_matrix",
    "random_signs",
    "higgs_quantize",
    "higgs_dequantize",
    "higgs_quantize_scaled",
    "higgs_linear",
    "higgs_linear_abs_terms",
    "nearest_grid_codes",
    "pack_bits",
    "unpack_bits",
]
