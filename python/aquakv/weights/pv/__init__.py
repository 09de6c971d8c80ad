"""PV-Tuning of HIGGS-quantized weights (docs/pv_tuning.md): one module per job.

    tune        pv_tune: the loop, its settings and its result
    guard       the validation guard: held-out perplexity at intervals, the best state kept, early stop
    step        the V step of one layer (which codes change, and to what); encode_with_scales
    layer       TunedHiggsLinear: one HiggsLinear while it trains (master scales, the straight-through buffer)
    loss        KL(teacher || student) over a window, memory bounded in the vocabulary
    data        training windows and the seeded order they are drawn in
    checkpoint  atomic checkpoints a run resumes from bit for bit
    plot        the curves as one PNG
"""
from aquakv.weights.pv.step import encode_with_scales
from aquakv.weights.pv.tune import PVTuneConfig, PVTuneResult, pv_tune

__all__ = ["PVTuneConfig", "PVTuneResult", "encode_with_scales", "pv_tune"]
