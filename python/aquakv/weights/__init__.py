"""HIGGS for weights: data-free quantization of linear layers and bit-width allocation (docs/weights.md).

    from aquakv.weights import quantize_model, save_quantized, load_quantized
    quantize_model(model, bits=4)                       # every linear but the head -> HiggsLinear (2, 256) grid
    save_quantized(model, "out/"); load_quantized(fresh_model, "out/")

    from aquakv.weights import measure_layer_errors, measure_sensitivities, allocate_bits
    table = measure_layer_errors(model)                 # e_ij and sizes for every layer x candidate grid
    sens = measure_sensitivities(model, windows)        # alpha_i, noise injection on calibration windows
    alloc = allocate_bits(table, sens, average_bits=3.0625)
    quantize_model(model, grid_per_layer=alloc.grid_per_layer)

    from aquakv.weights.pipeline import quantize_weights   # all of the above + evaluation + files, as the CLI does
    report = quantize_weights(model, tokenizer, budget=3.0625, out=Path("q3"), evaluate=True)

    from aquakv.weights import pv_tune                     # PV-Tuning of a quantized student (docs/pv_tuning.md)
    result = pv_tune(student, teacher, ids, steps=40, batch_size=2, window=256, method="pv")

Perplexity of weight-quantized models: aquakv.evaluation.evaluate_perplexity(model, ids, window=..., step=None).
"""
from aquakv.weights.allocate import (
                                     Allocation,
                                     InfeasibleBudget,
                                     LayerTable,
                                     allocate_bits,
                                     check_budget,
                                     layer_costs,
                                     measure_layer_errors,
                                     predicted_delta_nll,
                                     solve_allocation,
)
from aquakv.weights.files import load_quantized, save_quantized
from aquakv.weights.linear import (
                                     DEFAULT_GROUP_SIZE,
                                     HiggsLinear,
                                     higgs_quantize_dequantize_weight,
                                     higgs_weight_cost,
)
from aquakv.weights.pv import PVTuneConfig, PVTuneResult, encode_with_scales, pv_tune
from aquakv.weights.quantize import (
                                     average_bits,
                                     candidate_grids,
                                     default_grid,
                                     quantizable_linears,
                                     quantize_model,
)
from aquakv.weights.rtn import (
                                     rtn_bits_per_weight,
                                     rtn_quantize_dequantize,
                                     rtn_quantize_model,
)
from aquakv.weights.sensitivities import Sensitivities, measure_sensitivities

__all__ = [
    "Allocation", "DEFAULT_GROUP_SIZE", "HiggsLinear", "InfeasibleBudget", "LayerTable", "PVTuneConfig",
    "PVTuneResult", "Sensitivities", "encode_with_scales", "pv_tune",
    "allocate_bits", "average_bits", "candidate_grids", "check_budget", "default_grid",
    "higgs_quantize_dequantize_weight", "higgs_weight_cost", "layer_costs", "load_quantized", "measure_layer_errors",
    "measure_sensitivities", "predicted_delta_nll", "quantizable_linears", "quantize_model", "rtn_bits_per_weight",
    "rtn_quantize_dequantize", "rtn_quantize_model", "save_quantized", "solve_allocation",
]
