"""HIGGS for weights: data-free quantization of linear layers, bit-width allocation, PV-Tuning (docs/weights.md).

    from aquakv.weights import quantize_model, save_quantized, load_quantized
    quantize_model(model, bits=4)                       # every linear but the head -> HiggsLinear (2, 256) grid
    save_quantized(model, "out/"); load_quantized(fresh_model, "out/")

    from aquakv.weights import measure_layer_errors, measure_sensitivities, allocate_bits
    table = measure_layer_errors(model)                 # e_ij and sizes for every layer x candidate grid
    sens = measure_sensitivities(model, windows)        # alpha_i, noise injection on calibration windows
    alloc = allocate_bits(table, sens, average_bits=3.0625)
    quantize_model(model, grid_per_layer=alloc.grid_per_layer)

    from aquakv.weights import WeightSettings, plan_weights, compare_weights, quantize_and_save, quantize_weights
    report = quantize_weights(model, tokenizer, budget=3.0625, out="q3", evaluate=True)   # what the CLI runs

    from aquakv.weights import pv_tune                  # PV-Tuning of a quantized student (docs/pv_tuning.md)
    result = pv_tune(student, teacher, ids, steps=30, batch_size=4)   # guarded: never worse on its validation

Perplexity of weight-quantized models: aquakv.evaluation.evaluate_perplexity(model, ids, window=..., step=None).
"""
from aquakv.weights.allocate import (
                                     Allocation,
                                     InfeasibleBudget,
                                     allocate_bits,
                                     check_budget,
                                     predicted_delta_nll,
                                     solve_allocation,
)
from aquakv.weights.compare import compare_weights
from aquakv.weights.checkpoint import load_quantized, save_quantized
from aquakv.weights.layer_errors import LayerTable, layer_costs, measure_layer_errors
from aquakv.weights.linear import (
                                     DEFAULT_GROUP_SIZE,
                                     HiggsLinear,
                                     higgs_quantize_dequantize_weight,
                                     higgs_weight_cost,
)
from aquakv.weights.pipeline import WeightsReport, quantize_and_save, quantize_weights
from aquakv.weights.plan import WeightPlan, WeightSettings, plan_weights
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
    # quantizing and storing
    "DEFAULT_GROUP_SIZE", "HiggsLinear", "average_bits", "candidate_grids", "default_grid", "higgs_quantize_dequantize_weight",
    "higgs_weight_cost", "load_quantized", "quantizable_linears", "quantize_model", "save_quantized",
    # the RTN baseline
    "rtn_bits_per_weight", "rtn_quantize_dequantize", "rtn_quantize_model",
    # bit allocation
    "Allocation", "InfeasibleBudget", "LayerTable", "Sensitivities", "allocate_bits", "check_budget", "layer_costs",
    "measure_layer_errors", "measure_sensitivities", "predicted_delta_nll", "solve_allocation",
    # the pipeline: plan, compare, quantize and save
    "WeightPlan", "WeightSettings", "WeightsReport", "compare_weights", "plan_weights", "quantize_and_save",
    "quantize_weights",
    # PV-Tuning
    "PVTuneConfig", "PVTuneResult", "encode_with_scales", "pv_tune",
]
