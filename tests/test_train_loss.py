"""The loss of the trainer: exact masking, whole-step normalisation, and the fast (packed, chunked)
path against the plain (padded, full logits) path on the tiny Qwen2 model, in float32 on CPU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.data import SftPair
from train_daemon.batching import build_micro_batches, packed_micro_batch, padded_micro_batch, tokenize_pairs
from train_daemon.loss import response_loss_sum
from train_daemon.step import forward_backward

PAIRS = [
    SftPair("What is $2+3$? <think>", " We add: 2+3=5. </think> <answer> 5 </answer>"),
    SftPair("Solve $x+1=4$. <think>", " x=3 </think> <answer> 3 </answer>"),
    SftPair("What is $10-7$? Show the steps. <think>", " 10-7=3 </think> <answer> 3 </answer>"),
    SftPair("gcd(12, 18)? <think>", " 6 </think> <answer> 6 </answer>"),
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, use_safetensors=True)
    model.train()
    return model


@pytest.fixture(scope="module")
def examples(tokenizer):
    return tokenize_pairs(PAIRS, tokenizer, max_seq_length=256)


def _hand_masked_token_losses(model, tokenizer, pair):
    """Per-token losses of the response (EOS included), computed the textbook way: full logits of
    the unpacked sequence, each response token predicted from the position before it."""
    prompt = tokenizer(pair.prompt, add_special_tokens=False)["input_ids"]
    response = tokenizer(pair.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        log_probs = model(input_ids=ids).logits[0].log_softmax(-1)
    return [-log_probs[len(prompt) + i - 1, token].item() for i, token in enumerate(response)]


@pytest.mark.parametrize("packing", [True, False])
def test_step_loss_is_the_masked_mean_over_all_response_tokens_of_the_step(model, tokenizer, examples, packing):
    # Two micro-batches of different token counts: the step loss is the mean over all their
    # response tokens, not the mean of the two micro-batch means.
    micro_batches = build_micro_batches(examples, [0, 1, 2, 3], micro_batch_size=2, packing=packing,
                                        pad_token_id=tokenizer.eos_token_id)
    step_tokens = sum(mb.num_target_tokens for mb in micro_batches)
    token_losses = [loss for pair in PAIRS for loss in _hand_masked_token_losses(model, tokenizer, pair)]
    assert step_tokens == len(token_losses)
    sums = [forward_backward(model, mb, step_tokens)[0] for mb in micro_batches]
    model.zero_grad(set_to_none=True)
    assert (sum(sums) / step_tokens).item() == pytest.approx(sum(token_losses) / len(token_losses), abs=1e-5)
    per_batch_means = [s.item() / mb.num_target_tokens for s, mb in zip(sums, micro_batches)]
    assert micro_batches[0].num_target_tokens != micro_batches[1].num_target_tokens
    assert sum(per_batch_means) / 2 != pytest.approx(sum(token_losses) / len(token_losses), abs=1e-4)


def _loss_and_grads(model, micro_batch):
    model.zero_grad(set_to_none=True)
    loss_sum, tokens = forward_backward(model, micro_batch, micro_batch.num_target_tokens)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss_sum.item() / tokens, grads


def test_the_loss_of_the_fast_path_equals_the_plain_paths_loss_on_the_same_batch(model, tokenizer, examples):
    packed_loss, packed_grads = _loss_and_grads(model, packed_micro_batch(examples))
    padded_loss, padded_grads = _loss_and_grads(model, padded_micro_batch(examples, tokenizer.eos_token_id))
    assert packed_loss == pytest.approx(padded_loss, abs=1e-5)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def _per_example_losses(model, batch, spans):
    """Mean response loss of each example, from the hidden states of one forward pass."""
    with torch.no_grad():
        hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             position_ids=batch.position_ids, use_cache=False).last_hidden_state
    losses = []
    for low, high in spans:  # flat position range of the example
        keep = (batch.target_index >= low) & (batch.target_index < high)
        total = response_loss_sum(hidden, model.lm_head, batch.target_index[keep], batch.target_ids[keep])
        losses.append(total.item() / int(keep.sum()))
    return losses


@pytest.mark.slow  # a real model trains (seconds)
def test_packed_loss_equals_padded_loss_per_example(model, tokenizer, examples):
    lengths = [len(e.input_ids) for e in examples]
    padded = padded_micro_batch(examples, tokenizer.eos_token_id)
    width = padded.input_ids.shape[1]
    padded_losses = _per_example_losses(model, padded, [(i * width, i * width + n) for i, n in enumerate(lengths)])
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    packed = packed_micro_batch(examples)
    packed_losses = _per_example_losses(model, packed, [(s, s + n) for s, n in zip(starts, lengths)])
    assert packed_losses == pytest.approx(padded_losses, abs=1e-5)
    # And the same as each example alone (no neighbours at all).
    alone = [_per_example_losses(model, packed_micro_batch([e]), [(0, len(e.input_ids))])[0] for e in examples]
    assert packed_losses == pytest.approx(alone, abs=1e-5)

    # Control: without restarting positions the examples attend to each other and losses change,
    # so the equality above is evidence, not an accident.
    leaky = copy.copy(packed)
    leaky.position_ids = torch.arange(packed.input_ids.shape[1])[None]
    leaky_losses = _per_example_losses(model, leaky, [(s, s + n) for s, n in zip(starts, lengths)])
    assert leaky_losses[1:] != pytest.approx(padded_losses[1:], abs=1e-3)


def test_chunked_loss_equals_one_big_cross_entropy(model, examples):
    batch = packed_micro_batch(examples)
    hidden = torch.randn(1, batch.input_ids.shape[1], model.config.hidden_size, requires_grad=True)
    chunked = response_loss_sum(hidden, model.lm_head, batch.target_index, batch.target_ids, chunk_tokens=5)
    (chunk_grad,) = torch.autograd.grad(chunked, hidden)
    logits = model.lm_head(hidden[0, batch.target_index])
    whole = F.cross_entropy(logits, batch.target_ids, reduction="sum")
    (whole_grad,) = torch.autograd.grad(whole, hidden)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(chunk_grad, whole_grad)
