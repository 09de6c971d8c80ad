"""Long-context quality: passkey retrieval (a needle in a haystack) and perplexity over long windows, through any
KV cache, with tables and depth x length heatmaps. See docs/long_context.md.

    tasks = build_tasks(tokenizer, lengths=[1024, 4096], depths=DEPTHS, samples=3)
    result = run_needle(model, tokenizer, [("fp16", Fp16Cache), ("AQUA-KV-2", lambda m: AquaKVCache(m, p))],
                        lengths=[1024, 4096], tasks=tasks)
    print(format_needle_table(result)); write_heatmaps(result, "plots/")
    ppl = evaluate_long_perplexity(model, ids, Fp16Cache, window=8192, prefill=7168, chunk=512, step=32)
"""
from aquakv.longctx.haystack import Haystack, split_sentences
from aquakv.longctx.heatmap import save_heatmap, write_heatmaps
from aquakv.longctx.longppl import (
    LongPerplexityResult,
    evaluate_long_perplexity,
    feed_schedule,
    format_long_ppl_table,
    long_window_nll,
)
from aquakv.longctx.passkey import (
    DEPTHS,
    NeedleTask,
    answer_matches,
    build_task,
    build_tasks,
)
from aquakv.longctx.retrieval import (
    NeedleRecord,
    NeedleResult,
    format_needle_table,
    run_needle,
)

__all__ = ["DEPTHS", "Haystack", "LongPerplexityResult", "NeedleRecord", "NeedleResult", "NeedleTask",
           "answer_matches", "build_task", "build_tasks", "evaluate_long_perplexity", "feed_schedule",
           "format_long_ppl_table", "format_needle_table", "long_window_nll", "run_needle", "save_heatmap",
           "split_sentences", "write_heatmaps"]
