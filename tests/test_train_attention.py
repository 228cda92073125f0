"""The trainer's fast path on CPU: padding-free (varlen) attention, the fused linear cross-entropy and
token-capped micro-batches give the same loss and gradients as the plain path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.config import load_config
from common.data import SftPair
from train_daemon.attention import ATTN_NAME
from train_daemon.batching import build_micro_batches, padded_micro_batch, tokenize_pairs
from train_daemon.loading import load_model
from train_daemon.loss import LinearCrossEntropy
from train_daemon.step import forward_backward

PAIRS = [
    SftPair("What is $2+3$? <think>", " We add: 2+3=5. </think> <answer> 5 </answer>"),
    SftPair("Solve $x+1=4$. <think>", " x=3 </think> <answer> 3 </answer>"),
    SftPair("What is $10-7$? Show the steps. <think>", " 10-7=3 </think> <answer> 3 </answer>"),
    SftPair("gcd(12, 18)? <think>", " 6 </think> <answer> 6 </answer>"),
    SftPair("What is $4 \\times 5$? <think>", " 4*5=20 </think> <answer> 20 </answer>"),
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def examples(tokenizer):
    return tokenize_pairs(PAIRS, tokenizer, max_seq_length=256)


def _loss_and_grads(model, micro_batches):
    model.zero_grad(set_to_none=True)
    step_tokens = sum(mb.num_target_tokens for mb in micro_batches)
    loss = sum(forward_backward(model, mb, step_tokens)[0] for mb in micro_batches) / step_tokens
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


@pytest.mark.slow  # a real model trains (seconds)
def test_varlen_packed_step_equals_the_plain_padded_step(tiny_model_dir, tokenizer, examples):
    config = load_config(None, [f"model.name_or_path={tiny_model_dir}", "training.device=cpu"])
    assert config.model.attn_implementation == "varlen"  # the default
    fast = load_model(config, torch.device("cpu"))
    assert fast.config._attn_implementation == ATTN_NAME
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    plain.train()
    indices = list(range(len(examples)))
    # Token-capped packed micro-batches (several per step) vs one padded micro-batch.
    packed = build_micro_batches(examples, indices, 40, True, tokenizer.eos_token_id, max_tokens=90)
    assert len(packed) > 1 and all(mb.cu_seq_lens is not None for mb in packed)
    padded = [padded_micro_batch(examples, tokenizer.eos_token_id)]
    fast_loss, fast_grads = _loss_and_grads(fast, packed)
    plain_loss, plain_grads = _loss_and_grads(plain, padded)
    assert fast_loss == pytest.approx(plain_loss, abs=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow  # a real model trains (seconds)
def test_varlen_attention_keeps_packed_examples_apart(tiny_model_dir, tokenizer, examples):
    # Control for the test above: the cu_seq_lens boundaries are what keeps examples apart.
    config = load_config(None, [f"model.name_or_path={tiny_model_dir}", "training.device=cpu"])
    model = load_model(config, torch.device("cpu"))
    (packed,) = build_micro_batches(examples, list(range(len(examples))), 40, True, tokenizer.eos_token_id)
    honest, _ = _loss_and_grads(model, [packed])
    packed.cu_seq_lens = torch.tensor([0, packed.input_ids.shape[1]], dtype=torch.int32)  # one long "example"
    packed.max_length = packed.input_ids.shape[1]
    leaky, _ = _loss_and_grads(model, [packed])
    assert leaky != pytest.approx(honest, abs=1e-4)


def test_token_cap_splits_a_step_without_dropping_or_reordering_examples(tokenizer, examples):
    lengths = [len(e.input_ids) for e in examples]
    batches = build_micro_batches(examples, [4, 2, 0, 1, 3], 3, True, tokenizer.eos_token_id, max_tokens=max(lengths) + 1)
    assert [mb.num_tokens for mb in batches] and all(mb.num_tokens <= max(lengths) + 1 for mb in batches)
    flat = torch.cat([mb.input_ids[0] for mb in batches]).tolist()
    assert flat == [t for i in [4, 2, 0, 1, 3] for t in examples[i].input_ids]
    assert all(mb.cu_seq_lens[-1] == mb.num_tokens for mb in batches)
    # An example longer than the cap goes alone instead of being dropped.
    alone = build_micro_batches(examples, [0, 1], 40, True, tokenizer.eos_token_id, max_tokens=1)
    assert [mb.num_tokens for mb in alone] == [lengths[0], lengths[1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_cross_entropy_matches_full_logits(dtype):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=generator)
    fused = LinearCrossEntropy.apply(hidden, weight, targets, 8, dtype)  # 5 chunks, the last one short
    (fused * 0.5).backward()
    fused_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = F.cross_entropy(hidden.double() @ weight.double().t(), targets, reduction="sum")
    (reference * 0.5).backward()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 operands: ~3 significant digits
    assert fused.item() == pytest.approx(reference.item(), rel=tolerance)
    for got, want in zip(fused_grads, (hidden.grad, weight.grad)):
        assert float((got - want).norm() / want.norm()) < tolerance
