"""Long-context quality: passkey retrieval (a needle in a haystack) and perplexity over long windows, through any
KV cache, with tables and depth x length heatmaps. See docs/long_context.md.

    tasks = build_tasks(tokenizer, lengths=[1024, 4096], depths=DEPTHS, samples=3)
    result = run_needle(model, tokenizer, [("fp16", Fp16Cache), ("AQUA-KV-2", lambda m: AquaKVCache(m, p))],
                        lengths=[1024, 4096], tasks=tasks)
    print(format_needle_table(result)); write_heatmaps(result, "plots/")
    ppl = evaluate_long_perplexity(model, ids, Fp16Cache, window=8192, prefill=7168, chunk=512, step=32)
"""
from aquakv.lazy import lazy_exports

# Names load on first use: the tables and tasks need no model, and `aquakv longctx --help` no torch.
__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "Haystack": ".haystack", "split_sentences": ".haystack",
    "save_heatmap": ".heatmap", "write_heatmaps": ".heatmap",
    "LongPerplexityResult": ".longppl", "evaluate_long_perplexity": ".longppl", "feed_schedule": ".longppl",
    "format_long_ppl_table": ".longppl", "long_window_nll": ".longppl",
    "DEPTHS": ".passkey", "NeedleTask": ".passkey", "answer_matches": ".passkey", "build_task": ".passkey",
    "build_tasks": ".passkey",
    "NeedleRecord": ".retrieval", "NeedleResult": ".retrieval", "format_needle_table": ".retrieval",
    "run_needle": ".retrieval",
})
