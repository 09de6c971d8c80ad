"""The GGUF conversion cache of aquakv.models on a tiny model standing in for a GGUF file (the real SmolLM2 GGUF
is compared in test_smollm2.py)."""
import json
import logging

import pytest
import torch
from aquakv import models
from tiny_llama import make_tiny_llama


def tiny_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(200)}}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A model directory holding m.gguf (any bytes: its hash keys the cache) whose 'conversion' is the tiny Llama;
    returns (dir, calls) where calls counts conversions."""
    monkeypatch.setenv("AQUAKV_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "model"
    src.mkdir()
    (src / "m.gguf").write_bytes(b"GGUF fake model v1")
    calls = []

    def convert(path, dtype):
        calls.append(path)
        return make_tiny_llama(seed=0).to(dtype), tiny_tokenizer()

    monkeypatch.setattr(models, "load_gguf", convert)
    return src, calls


def logits(model):
    ids = torch.tensor([[1, 5, 9, 33, 7, 100]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_converted_once_then_loaded_from_the_cache_with_identical_logits(fake_gguf, caplog):
    src, calls = fake_gguf
    direct, _ = models.load_model(src, "m.gguf", use_cache=False)
    with caplog.at_level(logging.INFO, logger="aquakv"):
        first, tok1 = models.load_model(src, "m.gguf")
    assert "converting" in caplog.text and "once" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="aquakv"):
        second, tok2 = models.load_model(src, "m.gguf")
    assert "from the conversion cache" in caplog.text
    assert len(calls) == 2  # the direct load and the first cached one; the second read the cache
    assert torch.equal(logits(direct), logits(first)) and torch.equal(logits(first), logits(second))
    assert tok2("w1 w7 w3")["input_ids"] == tok1("w1 w7 w3")["input_ids"]
    entries = list((models.cache_root() / "gguf").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")  # no temporary directory left
    assert entries[0].name.startswith(models.file_sha256(src / "m.gguf"))


def test_another_file_content_is_another_entry(fake_gguf):
    src, calls = fake_gguf
    models.load_model(src, "m.gguf")
    (src / "m.gguf").write_bytes(b"GGUF fake model v2")
    models.load_model(src, "m.gguf")
    assert len(calls) == 2 and len(list((models.cache_root() / "gguf").iterdir())) == 2


@pytest.mark.parametrize("damage", ["truncate", "manifest", "garbage"])
def test_a_damaged_entry_is_rebuilt_not_used(fake_gguf, damage):
    src, calls = fake_gguf
    models.load_model(src, "m.gguf")
    entry = models.conversion_dir(src / "m.gguf")
    weights = entry / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "manifest":
        (entry / models.MANIFEST).unlink()
    else:  # same size, wrong content: only loading it can tell
        weights.write_bytes(b"\xff" * weights.stat().st_size)
    model, _ = models.load_model(src, "m.gguf")
    assert len(calls) == 2
    assert models._complete(entry)
    assert torch.equal(logits(model), logits(make_tiny_llama(seed=0)))


def test_an_interrupted_build_leaves_no_entry(fake_gguf, monkeypatch):
    src, _ = fake_gguf

    def broken(path, dtype):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "load_gguf", broken)
    with pytest.raises(KeyboardInterrupt):
        models.load_model(src, "m.gguf")
    assert list((models.cache_root() / "gguf").iterdir()) == []


def test_manifest_lists_the_saved_files(fake_gguf):
    src, _ = fake_gguf
    models.load_model(src, "m.gguf")
    entry = models.conversion_dir(src / "m.gguf")
    files = json.loads((entry / models.MANIFEST).read_text())["files"]
    assert "config.json" in files and "model.safetensors" in files and "tokenizer.json" in files


def test_cache_root_default(monkeypatch, tmp_path):
    monkeypatch.delenv("AQUAKV_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.cache_root() == tmp_path / ".cache" / "aquakv"
