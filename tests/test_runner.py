"""aquakv.runner on the tiny Llama: finding the parts, capturing block inputs, replaying blocks k.. exactly."""
from __future__ import annotations

import pytest
import torch
from aquakv.runner import LayerRunner, decoder_layers, final_norm, output_head
from tiny_llama import make_tiny_llama, random_token_windows
from torch import nn


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(seed=3)


@pytest.fixture(scope="module")
def ids():
    return torch.stack(random_token_windows(2, 24, seed=3))


def test_finds_the_llama_parts(model):
    assert decoder_layers(model) is model.model.layers
    assert final_norm(model) is model.model.norm
    assert output_head(model) is model.lm_head
    runner = LayerRunner(model)
    assert runner.num_layers == 4 and runner.can_replay_logits
    assert runner.block_of(model.model.layers[2].mlp.up_proj) == 2
    assert runner.block_of(model.lm_head) == 4
    assert runner.block_of(model.model.embed_tokens) is None


def test_refuses_a_model_without_decoder_layers():
    with pytest.raises(ValueError, match="decoder layers"):
        LayerRunner(nn.Linear(2, 2))
    assert final_norm(nn.Linear(2, 2)) is None


def test_replay_from_every_block_equals_the_forward(model, ids):
    runner = LayerRunner(model)
    trace = runner.record(ids)
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    # same ops in the same order as the model's own forward, on the same inputs: nothing to reassociate
    assert torch.equal(trace.logits, want)
    for start in range(runner.num_layers + 1):
        assert torch.equal(runner.replay(trace, start), want), start


def test_replay_sees_a_changed_block_only_downstream(model, ids):
    runner = LayerRunner(model)
    trace = runner.record(ids)
    weight = model.model.layers[2].mlp.down_proj.weight
    original = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.5)
            want = model(input_ids=ids, use_cache=False).logits
        assert torch.equal(runner.replay(trace, 2), want)  # blocks 0, 1 are unchanged: their recorded output holds
        # from block 3 on, the recorded input is the unchanged model's: the change upstream is not seen
        assert torch.equal(runner.replay(trace, 3), trace.logits) and not torch.equal(trace.logits, want)
    finally:
        with torch.no_grad():
            weight.copy_(original)


def test_partial_replay_returns_the_next_blocks_input(model, ids):
    runner = LayerRunner(model)
    trace = runner.record(ids)
    hidden = runner.replay(trace, 1, 3, logits=False)
    assert torch.equal(hidden, trace.blocks[3].hidden)
    with pytest.raises(ValueError, match="start <= stop"):
        runner.replay(trace, 3, 2)
    with pytest.raises(ValueError, match="logits need every block"):
        runner.replay(trace, 0, 2)


def test_first_block_inputs_are_the_embeddings_and_the_forwards_arguments(model, ids):
    runner = LayerRunner(model)
    inputs = runner.first_block_inputs(ids[:1], use_cache=False)
    assert torch.equal(inputs.hidden, model.model.embed_tokens(ids[:1]))
    assert "position_embeddings" in inputs.kwargs and "hidden_states" not in inputs.kwargs
    out = inputs.hidden
    for i in range(runner.num_layers):
        out = runner.run_block(i, out, inputs.kwargs)
    with torch.no_grad():
        want = model.model(input_ids=ids[:1], use_cache=False).last_hidden_state
    assert torch.equal(model.model.norm(out), want)


def test_blocks_called_with_positional_arguments_are_refused(model, ids):
    runner = LayerRunner(model)
    class Positional(nn.Module):  # a decoder whose first block gets a second argument positionally
        def forward(self, input_ids):
            return model.model.layers[0](model.model.embed_tokens(input_ids), None)

    runner.decoder = Positional()
    with pytest.raises(ValueError, match="positional arguments"):
        runner.first_block_inputs(ids[:1])
