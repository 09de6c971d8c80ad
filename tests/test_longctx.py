"""Long-context quality: passkey task construction and scoring, retrieval through every cache, the chunked
long-window perplexity protocol, heatmaps, and `aquakv longctx` end to end, all on the tiny random Llama."""
import argparse
import json
import sys

import pytest
import torch
from aquakv.cli import common
from aquakv.cli.longctx import add_longctx, cache_factories
from aquakv.evaluation.nll import window_nll
from aquakv.kv import AquaKVCache, Fp16Cache, HiggsCache, KiviCache, calibrate
from aquakv.longctx import (
    Haystack,
    answer_matches,
    build_task,
    build_tasks,
    evaluate_long_perplexity,
    feed_schedule,
    format_needle_table,
    long_window_nll,
    retrieval,
    run_needle,
    split_sentences,
    write_heatmaps,
)
from aquakv.longctx.passkey import NEEDLE, draw_sample, prompt_frame
from tiny_llama import make_tiny_llama, random_token_windows
from transformers.cache_utils import DynamicCache


class ByteTokenizer:
    """Bytes -> ids 3..255 (0..2 are pad/bos/eos), with decode; no chat template."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + b % 253 for b in text.encode()]}

    def decode(self, ids, skip_special_tokens=True):
        return bytes((i - 3) % 256 for i in ids if i >= 3).decode("latin-1")


class ChatByteTokenizer(ByteTokenizer):
    chat_template = "<u>{content}</u><a>"

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        assert not tokenize and add_generation_prompt
        return self.chat_template.format(content=messages[0]["content"])


def dynamic(model):
    return DynamicCache(config=model.config)


def find(seq: list, sub: list) -> list[int]:
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def hay(tok):
    return Haystack(tok)


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(seed=0)


# ---- task construction ---------------------------------------------------------------------------------------
def test_sentences_rebuild_the_text_and_end_at_boundaries():
    text = "One. Two is here!  Three?\n\ncode block\nmore code\n\nLast without stop"
    pieces = split_sentences(text)
    assert "".join(pieces) == text
    assert pieces[:3] == ["One.", " Two is here!", "  Three?"]
    assert pieces[-1] == "\nLast without stop"


@pytest.mark.parametrize("length", [300, 517, 1200, 3000])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_task_has_the_exact_length_and_one_needle_at_the_nearest_boundary(tok, hay, length, depth):
    task = build_task(tok, hay, length, depth, seed=3, sample=1)
    ids = task.input_ids.tolist()
    assert task.input_ids.dtype == torch.long and len(ids) == length
    needle = tok(" " + NEEDLE.format(key=task.key))["input_ids"]
    assert find(ids, needle) == [task.needle_start]
    assert task.key not in hay.text
    # recompute the excerpt: the needle sits at its boundary nearest to depth * filler, and nowhere inside a sentence
    _, start = draw_sample(hay, 3, 1)
    filler, boundaries = hay.excerpt(start, task.haystack_tokens)
    offset = task.needle_start - task.haystack_start
    assert offset in boundaries
    assert abs(offset - depth * len(filler)) == min(abs(b - depth * len(filler)) for b in boundaries)
    assert ids[task.haystack_start:task.needle_start] + ids[task.needle_start + task.needle_tokens:][
        :len(filler) - offset] == filler
    if depth in (0.0, 1.0):
        assert task.placed_depth == depth


def test_excerpts_are_real_text_ending_at_a_sentence_end(tok, hay):
    text = hay.text.encode()  # the byte tokenizer is lossless on UTF-8 (bytes 253..255 never occur in it)
    ends = set()
    offset = 0
    for piece in hay.pieces:
        offset += len(piece.encode())
        ends.add(offset)
    for start, n in [(10, 200), (10, 900), (len(hay) // 2, 333)]:
        ids, boundaries = hay.excerpt(start, n)
        raw = bytes(i - 3 for i in ids)
        at = text.find(raw)
        assert len(ids) == n and at >= 0 and at + n in ends
        assert boundaries[0] == 0 and boundaries[-1] == n and all(at + b in ends for b in boundaries[1:])


def test_tasks_are_deterministic_per_seed_and_differ_across_seeds_and_samples(tok, hay):
    a = build_tasks(tok, [400, 800], [0.0, 0.5], samples=3, seed=7, haystack=hay)
    b = build_tasks(tok, [400, 800], [0.0, 0.5], samples=3, seed=7, haystack=hay)
    c = build_tasks(tok, [400, 800], [0.0, 0.5], samples=3, seed=8, haystack=hay)
    assert len(a) == 2 * 2 * 3
    assert [(t.length, t.depth, t.sample) for t in a[:4]] == [(400, 0.0, 0), (400, 0.0, 1), (400, 0.0, 2),
                                                              (400, 0.5, 0)]
    assert all(torch.equal(x.input_ids, y.input_ids) and x.key == y.key for x, y in zip(a, b))
    assert [t.key for t in a] != [t.key for t in c]
    assert not all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, c))
    assert len({t.key for t in a[:3]}) == 3  # each sample has its own key...
    assert len({t.key for t in a if t.sample == 0}) == 1  # ...shared by every length and depth


def test_chat_template_when_the_tokenizer_has_one(hay):
    chat = ChatByteTokenizer()
    before, after = prompt_frame(chat)
    assert chat.decode(before).startswith("<u>There is a pass key") and chat.decode(after).endswith(
        "pass key?</u><a>The pass key is")
    task = build_task(chat, hay, 500, 0.5)
    assert len(task.input_ids) == 500 and chat.decode(task.input_ids[:3].tolist()) == "<u>"
    plain_before, _ = prompt_frame(chat, chat=False)
    assert plain_before[0] == chat.bos_token_id and "<u>" not in chat.decode(plain_before)
    with pytest.raises(ValueError, match="no chat template"):
        prompt_frame(ByteTokenizer(), chat=True)


def test_bad_task_arguments_are_refused(tok, hay):
    with pytest.raises(ValueError, match="too short"):
        build_task(tok, hay, 150, 0.5)
    with pytest.raises(ValueError, match="depth must be in"):
        build_task(tok, hay, 500, 1.5)
    with pytest.raises(ValueError, match="samples must be"):
        build_tasks(tok, [500], samples=0, haystack=hay)
    with pytest.raises(ValueError, match="empty"):
        Haystack(tok, ["  ", ""])


# ---- scoring ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,ok", [
    ("48213", True), (" 48213. Remember it.", True), ("is 48213", True), ("48213 is the pass key", True),
    (":48213\n", True), ("4821", False), ("482130", False), ("48 213", False), ("the key", False), ("", False),
    ("12345 then 48213", False), ("048213", False),
])
def test_exact_match_of_the_digits(text, ok):
    assert answer_matches(text, "48213") is ok


def test_accuracy_is_aggregated_per_cell_and_cache(model, tok, hay, monkeypatch):
    tasks = build_tasks(tok, [400, 600], [0.0, 1.0], samples=2, haystack=hay)
    # a stand-in model that answers correctly only for depth 0 (and only under cache "b" for sample 1)
    def fake_answer(model, tokenizer, task, cache, **kw):
        right = task.depth == 0.0 and (task.sample == 0 or cache.name == "b")
        return f" {task.key}. Remember" if right else " 1"

    class Named:
        def __init__(self, name):
            self.name = name

    monkeypatch.setattr(retrieval, "answer", fake_answer)
    result = run_needle(model, tok, [("a", lambda m: Named("a")), ("b", lambda m: Named("b"))], [400, 600],
                        [0.0, 1.0], 2, tasks=tasks, progress=False)
    assert result.caches == ["a", "b"] and len(result.records) == 16
    assert result.grid("a") == [[0.5, 0.5], [0.0, 0.0]] and result.grid("b") == [[1.0, 1.0], [0.0, 0.0]]
    assert result.accuracy("a") == 0.25 and result.accuracy("b", depth=0.0) == 1.0
    table = format_needle_table(result)
    assert "| a | 0.00 | 50% (1/2) | 50% (1/2) | 50% (2/4) | |" in table
    assert "| b | all | 50% (2/4) | 50% (2/4) | 50% (4/8) |" in table
    with pytest.raises(KeyError, match="no needle results for cache 'c'"):
        result.accuracy("c")


# ---- retrieval through real caches ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def preds(model):
    return calibrate(model, random_token_windows(4, 160, seed=5), bits=2, window=160, progress=False)


def test_retrieval_runs_through_every_cache_and_fp16_answers_like_dynamic_cache(model, tok, hay, preds):
    caches = [("dynamic", dynamic), ("fp16", Fp16Cache), ("kivi2", lambda m: KiviCache(m, 2)),
              ("higgs2", lambda m: HiggsCache(m, 2)), ("aquakv2", lambda m: AquaKVCache(m, preds))]
    result = run_needle(model, tok, caches, [380], [0.0, 1.0], 1, haystack=hay, prefill_chunk=160,
                        max_new_tokens=5, progress=False)
    assert result.caches == [name for name, _ in caches] and len(result.records) == 10
    answers = {name: [r.answer for r in result.records if r.cache == name] for name, _ in caches}
    assert answers["fp16"] == answers["dynamic"]
    assert all(len(a) > 0 for a in answers["dynamic"])
    assert answers["kivi2"] != answers["dynamic"] or answers["higgs2"] != answers["dynamic"]  # 2 bits show
    assert all(r.seconds > 0 for r in result.records) and set(result.seconds) == set(answers)
    assert all(0.0 <= result.accuracy(name) <= 1.0 for name in answers)


def test_chunked_prefill_answers_like_one_pass_with_an_exact_cache(model, tok, hay):
    task = build_task(tok, hay, 380, 0.5, seed=1)
    one_pass = retrieval.answer(model, tok, task, dynamic(model), prefill_chunk=None, max_new_tokens=6)
    chunked = retrieval.answer(model, tok, task, dynamic(model), prefill_chunk=100, max_new_tokens=6)
    assert one_pass == chunked and len(one_pass) > 0


def test_retrieval_refuses_lengths_beyond_the_model(model, tok):
    with pytest.raises(ValueError, match="exceeds the model's 4096 positions"):
        run_needle(model, tok, [("d", dynamic)], [4090], [0.5], max_new_tokens=8, progress=False)


# ---- long-window perplexity ------------------------------------------------------------------------------------
def test_feed_schedule():
    assert feed_schedule(10, 6, 4, 3) == [(0, 4), (4, 6), (6, 9), (9, 10)]
    assert feed_schedule(5, 0, 4, 2) == [(0, 2), (2, 4), (4, 5)]
    for bad in [dict(prefill=10), dict(prefill=-1), dict(chunk=0), dict(step=0)]:
        with pytest.raises(ValueError):
            feed_schedule(10, **{"prefill": 4, "chunk": 2, "step": 2, **bad})


@pytest.mark.parametrize("factory", [dynamic, lambda m: HiggsCache(m, 2)], ids=["dynamic", "higgs2"])
def test_long_protocol_equals_stepped_window_nll_when_chunk_equals_step(model, factory):
    ids = torch.stack(random_token_windows(2, 301, seed=3))
    want = window_nll(model, ids, factory(model), step=20)
    total, tail = long_window_nll(model, ids, factory(model), prefill=200, chunk=20, step=20)
    assert torch.equal(total, want)  # the same forwards, the same sums in the same order: bit for bit
    total0, tail0 = long_window_nll(model, ids, factory(model), prefill=0, chunk=64, step=20)
    assert torch.equal(total0, want) and torch.equal(tail0, want)
    assert (tail < total).all() and (tail > 0).all()


def test_chunked_prefix_matters_only_for_a_lossy_cache(model):
    ids = random_token_windows(1, 300, seed=4)[0][None]
    exact = [long_window_nll(model, ids, dynamic(model), prefill=p, chunk=128, step=32)[0] for p in (0, 256)]
    torch.testing.assert_close(exact[0], exact[1], rtol=1e-5, atol=0)  # only float rounding moves
    lossy = [long_window_nll(model, ids, HiggsCache(model, 2), prefill=p, chunk=128, step=32)[0] for p in (0, 256)]
    assert not torch.allclose(lossy[0], lossy[1], rtol=1e-4, atol=0)  # chunk-mates attend to exact states


def test_evaluate_long_perplexity_counts_and_sizes(model):
    ids = torch.cat(random_token_windows(2, 200, seed=6))
    r = evaluate_long_perplexity(model, ids, Fp16Cache, window=192, prefill=128, chunk=64, step=32, progress=False)
    assert (r.n_windows, r.n_tokens, r.n_tail_tokens) == (2, 2 * 191, 2 * 63)
    assert r.bits_per_value == 16.0 and r.window == 192 and r.prefill == 128
    assert 1 < r.ppl < 1e4 and 1 < r.tail_ppl < 1e4
    d = evaluate_long_perplexity(model, ids, None, window=192, prefill=128, chunk=64, step=32, max_windows=1,
                                 progress=False)
    assert d.n_windows == 1 and d.bits_per_value == 32.0  # an fp32 model's DynamicCache holds fp32
    with pytest.raises(ValueError, match="exceeds the model's 4096 positions"):
        evaluate_long_perplexity(model, ids, None, window=8192, progress=False)


# ---- heatmaps --------------------------------------------------------------------------------------------------
def _result(model, tok, hay, monkeypatch):
    monkeypatch.setattr(retrieval, "answer", lambda m, t, task, c, **kw: task.key if task.depth else "")
    return run_needle(model, tok, [("fp16", Fp16Cache), ("AQUA-KV 2/bits", Fp16Cache)], [400, 500],
                      [0.0, 0.5, 1.0], 1, haystack=hay, progress=False)


def test_heatmap_png_per_cache(model, tok, hay, monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    paths = write_heatmaps(_result(model, tok, hay, monkeypatch), tmp_path / "plots")
    assert [p.name for p in paths] == ["needle_fp16.png", "needle_AQUA-KV_2_bits.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    assert sorted(x.name for x in (tmp_path / "plots").iterdir()) == sorted(p.name for p in paths)  # no temp files


def test_heatmap_without_matplotlib_names_the_install(model, tok, hay, monkeypatch, tmp_path):
    result = _result(model, tok, hay, monkeypatch)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        write_heatmaps(result, tmp_path / "plots")
    assert not (tmp_path / "plots").exists()


# ---- the command line ------------------------------------------------------------------------------------------
def parse(*argv):
    parser = argparse.ArgumentParser(prog="aquakv")
    add_longctx(parser.add_subparsers(dest="command"))
    return parser.parse_args(["longctx", *argv])


def run_cli(capsys, *argv):
    args = parse(*argv, "--device", "cpu", "-q")
    common.setup(args)
    code = args.func(args)
    return code, capsys.readouterr().out


@pytest.fixture
def tiny_cli(monkeypatch, model):
    monkeypatch.setattr(common, "load", lambda args: (model, ByteTokenizer()))


def test_cli_needle_end_to_end(capsys, tmp_path, tiny_cli):
    pytest.importorskip("matplotlib")
    code, out = run_cli(capsys, "--context", "400", "--depths", "0", "1", "--samples", "1", "--caches", "fp16",
                        "kivi2", "--max-new-tokens", "4", "--heatmap-dir", str(tmp_path / "h"), "--json",
                        str(tmp_path / "r.json"))
    assert code == 0
    assert "| cache | depth | 400 tok | all | eval time |" in out and "| kivi2 | all |" in out
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["needle_fp16.png", "needle_kivi2.png"]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["task"] == "needle" and len(saved["records"]) == 4 and set(saved["accuracy"]) == {"fp16", "kivi2"}


def test_cli_ppl_end_to_end(capsys, tmp_path, tiny_cli):
    text = tmp_path / "t.txt"
    text.write_text("The cache holds keys and values. " * 40)
    code, out = run_cli(capsys, "--task", "ppl", "--context", "256", "--prefill", "128", "--chunk", "64",
                        "--max-windows", "1", "--caches", "fp16", "higgs2", "--text", str(text))
    assert code == 0
    assert "| fp16 | 256 |" in out and "| +0.00% |" in out and "| higgs2 | 256 |" in out


def test_cli_defaults_and_user_errors(capsys, tmp_path, tiny_cli, preds, model):
    args = parse()
    assert (args.task, args.context, args.depths, args.samples) == ("needle", [1024, 2048, 4096, 8192],
                                                                   [0.0, 0.25, 0.5, 0.75, 1.0], 3)
    with pytest.raises(SystemExit):
        parse("--depths", "1.5")
    with pytest.raises(common.UserError, match="needs --predictors"):
        run_cli(capsys, "--caches", "aquakv2")
    with pytest.raises(common.UserError, match="'kivi3' is not a cache name"):
        run_cli(capsys, "--caches", "kivi3")
    with pytest.raises(common.UserError, match="exceeds the model's 4096 positions"):
        run_cli(capsys, "--context", "8192", "--caches", "fp16")
    preds.save(tmp_path / "p.safetensors")
    with pytest.raises(common.UserError, match="calibrated at 2 bits"):
        cache_factories(["aquakv3"], preds)
    assert [n for n, _ in cache_factories(["aquakv2", "dynamic"], preds)] == ["aquakv2", "dynamic"]
    (name, factory), = cache_factories(["aquakv2-bf16"], preds)
    assert name == "aquakv2-bf16" and factory(model).codec.predictor_dtype == torch.bfloat16
    with pytest.raises(common.UserError, match="calibrated at 2 bits"):
        cache_factories(["aquakv3-bf16"], preds)


def test_cli_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        parse("--help")
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--task", "--context", "--depths", "--samples", "--caches", "--predictors", "--heatmap-dir",
                   "--prefill-chunk", "--prefill", "--chunk", "--step", "--max-windows", "--json", "--text",
                   "aquakv2", "aquakvB", "kivi2", "dynamic"):
        assert option in out


def test_filler_defaults_to_the_repeated_sentences_and_text_files_win(tmp_path):
    from aquakv.cli.longctx import _filler_texts
    from aquakv.longctx.haystack import REPEATED_FILLER

    assert _filler_texts(parse()) == [REPEATED_FILLER]
    assert _filler_texts(parse("--filler", "docs")) is None  # Haystack's default: the bundled docs
    text = tmp_path / "t.txt"
    text.write_text("One sentence. Another one.")
    assert _filler_texts(parse("--filler", "docs", "--text", str(text))) == ["One sentence. Another one."]


def test_cli_ppl_blockwise_gives_the_materialized_numbers(capsys, tmp_path, tiny_cli):
    text = tmp_path / "t.txt"
    text.write_text("The cache holds keys and values. " * 40)
    argv = ("--task", "ppl", "--context", "256", "--prefill", "128", "--chunk", "64", "--max-windows", "1",
            "--caches", "fp16", "higgs2", "kivi2", "--text", str(text), "--json")
    ppl = {}
    for mode in ("materialize", "blockwise"):
        assert run_cli(capsys, *argv, str(tmp_path / f"{mode}.json"), "--attention", mode)[0] == 0
        ppl[mode] = [r["ppl"] for r in json.loads((tmp_path / f"{mode}.json").read_text())["rows"]]
    # The same caches read blockwise: float order only (tiny model, fp32).
    assert len(ppl["blockwise"]) == 3 and ppl["blockwise"] == pytest.approx(ppl["materialize"], rel=1e-5)
