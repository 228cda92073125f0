"""Tokenization, masking, data order and micro-batches of the trainer (train_daemon.batching)."""

from __future__ import annotations

import logging

import pytest
from transformers import AutoTokenizer

from common.data import DatasetError, SftPair, load_math, load_prompt_template, math_to_sft_pairs
from train_daemon.batching import (IGNORE_INDEX, ExampleStream, build_micro_batches, epoch_order, packed_micro_batch,
                                   padded_micro_batch, shifted_targets, tokenize_pairs)
from train_daemon.schedule import lr_multiplier, total_optimizer_steps


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_response_is_labelled_and_ends_with_eos_prompt_is_masked(tokenizer):
    pair = SftPair(prompt="What is $2+3$? <think>", response=" We add. </think> <answer> 5 </answer>")
    (example,) = tokenize_pairs([pair], tokenizer, max_seq_length=256)
    prompt_ids = tokenizer(pair.prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(pair.response, add_special_tokens=False)["input_ids"]
    assert example.input_ids == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]
    assert tokenizer.decode(example.input_ids[len(prompt_ids):]).endswith("</answer>" + tokenizer.eos_token)


def test_math_examples_become_r1_zero_prompt_and_answer_response(tokenizer, math_dir):
    pairs = math_to_sft_pairs(load_math(str(math_dir), "train"), load_prompt_template("config/r1_zero.prompt"))
    examples = tokenize_pairs(pairs, tokenizer, max_seq_length=512)
    assert len(examples) == len(pairs) == 7
    first = examples[0]
    response_start = first.labels.index(next(label for label in first.labels if label != IGNORE_INDEX))
    prompt_text = tokenizer.decode(first.input_ids[:response_start])
    response_text = tokenizer.decode(first.input_ids[response_start:])
    assert prompt_text.endswith("Assistant: <think>")
    assert "</think> <answer>" in response_text and response_text.endswith("</answer>" + tokenizer.eos_token)


def test_over_length_examples_are_dropped_with_one_warning(tokenizer, caplog):
    pairs = [SftPair("short?", " yes"), SftPair("long " * 200, " no"), SftPair("long " * 300, " no")]
    with caplog.at_level(logging.WARNING, logger="train_daemon.batching"):
        examples = tokenize_pairs(pairs, tokenizer, max_seq_length=64)
    assert len(examples) == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dropped 2 of 3" in warnings[0].getMessage()


def test_no_example_fitting_is_a_dataset_error_naming_the_key(tokenizer):
    with pytest.raises(DatasetError, match="model.max_seq_length=16"):
        tokenize_pairs([SftPair("long " * 50, " answer")], tokenizer, max_seq_length=16)


def test_targets_are_shifted_per_example():
    assert shifted_targets([IGNORE_INDEX, IGNORE_INDEX, 7, 8, 0]) == [IGNORE_INDEX, 7, 8, 0, IGNORE_INDEX]


def _example(tokenizer, prompt, response):
    return tokenize_pairs([SftPair(prompt, response)], tokenizer, 256)[0]


def test_packed_micro_batch_restarts_positions_and_never_predicts_across_examples(tokenizer):
    a = _example(tokenizer, "What is 2+3?", " 5")
    b = _example(tokenizer, "Solve x.", " x = 3")
    batch = packed_micro_batch([a, b])
    assert batch.attention_mask is None and batch.input_ids.shape == (1, len(a.input_ids) + len(b.input_ids))
    assert batch.position_ids[0].tolist() == list(range(len(a.input_ids))) + list(range(len(b.input_ids)))
    # The last token of a (EOS) predicts nothing: a's targets end with IGNORE, b's first target is prompt.
    assert (len(a.input_ids) - 1) not in batch.target_index.tolist()
    response_tokens = sum(label != IGNORE_INDEX for label in a.labels + b.labels)
    assert batch.num_target_tokens == response_tokens and batch.num_tokens == batch.input_ids.numel()


def test_padded_micro_batch_masks_padding(tokenizer):
    a = _example(tokenizer, "What is 2+3?", " 5")
    b = _example(tokenizer, "Solve the equation x + 1 = 4 for x.", " x = 3")
    batch = padded_micro_batch([a, b], pad_token_id=tokenizer.eos_token_id)
    length = max(len(a.input_ids), len(b.input_ids))
    assert batch.input_ids.shape == (2, length) and batch.position_ids is None
    assert batch.attention_mask.sum().item() == batch.num_tokens == len(a.input_ids) + len(b.input_ids)
    packed = packed_micro_batch([a, b])
    assert batch.target_ids.tolist() == packed.target_ids.tolist()  # same targets, same order


def test_micro_batches_split_a_step(tokenizer):
    examples = [_example(tokenizer, f"Problem {i}?", f" answer {i}") for i in range(5)]
    batches = build_micro_batches(examples, [4, 0, 2, 1, 3], micro_batch_size=2, packing=True, pad_token_id=0)
    assert [b.input_ids.shape[0] for b in batches] == [1, 1, 1]
    assert batches[0].input_ids[0].tolist() == examples[4].input_ids + examples[0].input_ids
    assert batches[2].input_ids[0].tolist() == examples[3].input_ids


def test_data_order_is_a_seeded_permutation_per_epoch():
    assert sorted(epoch_order(10, seed=1, epoch=0)) == list(range(10))
    assert epoch_order(10, 1, 0) == epoch_order(10, 1, 0)
    assert epoch_order(10, 1, 0) != epoch_order(10, 1, 1)
    assert epoch_order(10, 1, 0) != epoch_order(10, 2, 0)


def test_stream_crosses_epochs_and_resumes_at_its_position():
    uninterrupted = ExampleStream(7, seed=3)
    taken = [uninterrupted.take(4) for _ in range(5)]
    assert taken[0] + taken[1][:3] == epoch_order(7, 3, 0)
    assert taken[1][3:] == epoch_order(7, 3, 1)[:1]
    first = ExampleStream(7, seed=3)
    for _ in range(3):
        first.take(4)
    resumed = ExampleStream(7, seed=3, epoch=first.epoch, index=first.index)
    assert [resumed.take(4) for _ in range(2)] == taken[3:]
    assert first.epoch_progress == pytest.approx(12 / 7)


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    assert [lr_multiplier(s, 4, 12, 0.0) for s in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert lr_multiplier(5, 4, 12, 0.0) == 1.0
    decay = [lr_multiplier(s, 4, 12, 0.1) for s in range(5, 13)]
    assert all(a > b for a, b in zip(decay, decay[1:])) and decay[-1] > 0.1
    assert lr_multiplier(100, 4, 12, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(1, 0, 10, 0.0) == 1.0


def test_total_steps_from_epochs_rounds_up():
    assert total_optimizer_steps(0, 1.0, 7500, 80) == 94  # the reference configuration
    assert total_optimizer_steps(30, 1.0, 7500, 80) == 30
