"""SFT examples -> token ids, a deterministic data order, and micro-batches (packed or padded).

Used by `bin/train`. An example is prompt tokens + response tokens + EOS; only the response
(EOS included) is trained on. Prompt and response are tokenized separately, so the prompt tokens
are exactly those the eval daemon feeds the model at inference time (tokenizing the concatenation
could merge tokens across the boundary).

Data order: epoch e visits the examples in the permutation drawn from (seed, e); the position in
the data is (epoch, index into that permutation). The stream runs on across epochs, so an optimizer
step may take its last examples from the next epoch. Resuming at a saved position reproduces the
order of an uninterrupted run exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from common.data import DatasetError, SftPair

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of positions that carry no loss (prompt, padding)


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]  # prompt + response + EOS
    labels: list[int]  # Hugging Face convention (unshifted): IGNORE_INDEX over the prompt, the token itself over the response


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [rows, length]
    position_ids: torch.Tensor | None  # packed: restarts at 0 for each example (marks the boundaries)
    attention_mask: torch.Tensor | None  # padded: 1 on real tokens, 0 on padding; None when packed
    target_index: torch.Tensor  # flat positions (into rows * length) whose next token is a response token
    target_ids: torch.Tensor  # the token to predict at each of those positions
    num_tokens: int  # non-pad tokens (throughput, tokens seen)
    # packed: cumulative example lengths [0, n1, n1+n2, ...] (int32) and the longest example, for
    # padding-free attention kernels (train_daemon.attention); None when padded
    cu_seq_lens: torch.Tensor | None = None
    max_length: int = 0

    @property
    def num_target_tokens(self) -> int:
        return int(self.target_ids.numel())

    def to(self, device: torch.device) -> MicroBatch:
        # From pinned memory the copy is truly asynchronous; from pageable memory CUDA may wait for
        # the stream first, which would stall the host until the GPU has drained its queue.
        pin = device.type == "cuda"

        def move(tensor):
            if tensor is None:
                return None
            return (tensor.pin_memory() if pin else tensor).to(device, non_blocking=True)

        return MicroBatch(move(self.input_ids), move(self.position_ids), move(self.attention_mask),
                          move(self.target_index), move(self.target_ids), self.num_tokens,
                          move(self.cu_seq_lens), self.max_length)


# ---- tokenization --------------------------------------------------------------------------------


def tokenize_pairs(pairs: list[SftPair], tokenizer, max_seq_length: int) -> list[TokenizedExample]:
    """Tokenize prompt/response pairs; drop (with one warning) those longer than max_seq_length."""
    eos = tokenizer.eos_token_id
    prompts = tokenizer([p.prompt for p in pairs], add_special_tokens=False)["input_ids"]
    responses = tokenizer([p.response for p in pairs], add_special_tokens=False)["input_ids"]
    examples, too_long = [], []
    for prompt_ids, response_ids in zip(prompts, responses):
        input_ids = list(prompt_ids) + list(response_ids) + [eos]
        if len(input_ids) > max_seq_length:
            too_long.append(len(input_ids))
            continue
        labels = [IGNORE_INDEX] * len(prompt_ids) + list(response_ids) + [eos]
        examples.append(TokenizedExample(input_ids=input_ids, labels=labels))
    if too_long:
        logger.warning("dropped %d of %d examples longer than model.max_seq_length=%d tokens (longest %d); "
                       "raise model.max_seq_length to train on them", len(too_long), len(pairs), max_seq_length, max(too_long))
    if not examples:
        raise DatasetError(f"no training example fits in model.max_seq_length={max_seq_length} tokens; raise it")
    return examples


def shifted_targets(labels: list[int]) -> list[int]:
    """Per position, the label of the next token (what the model predicts there).

    Shifting per example, before packing, keeps the last token of one example from being
    trained to predict the first token of the next one.
    """
    return list(labels[1:]) + [IGNORE_INDEX]


# ---- data order ----------------------------------------------------------------------------------


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    return np.random.default_rng([seed, epoch]).permutation(num_examples).tolist()


class ExampleStream:
    """Endless, deterministic stream of example indices; (epoch, index) is its whole state."""

    def __init__(self, num_examples: int, seed: int, epoch: int = 0, index: int = 0):
        self.num_examples, self.seed = num_examples, seed
        self.epoch, self.index = epoch, index
        self._order = epoch_order(num_examples, seed, epoch)

    def take(self, count: int) -> list[int]:
        taken = []
        while len(taken) < count:
            if self.index == self.num_examples:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = epoch_order(self.num_examples, self.seed, self.epoch)
            step = min(count - len(taken), self.num_examples - self.index)
            taken.extend(self._order[self.index:self.index + step])
            self.index += step
        return taken

    @property
    def epoch_progress(self) -> float:
        """Epochs completed, fractional (e.g. 1.25)."""
        return self.epoch + self.index / self.num_examples


# ---- micro-batches -------------------------------------------------------------------------------


def packed_micro_batch(examples: list[TokenizedExample]) -> MicroBatch:
    """All examples concatenated into one row, no padding. position_ids restart at 0 for each
    example and there is no attention_mask: transformers then builds attention that stays inside
    each example (as long as the model is called with use_cache=False)."""
    input_ids, position_ids, targets = [], [], []
    for example in examples:
        input_ids.extend(example.input_ids)
        position_ids.extend(range(len(example.input_ids)))
        targets.extend(shifted_targets(example.labels))
    batch = _micro_batch([input_ids], [targets], position_ids=torch.tensor([position_ids]), attention_mask=None)
    lengths = torch.tensor([len(e.input_ids) for e in examples], dtype=torch.int32)
    batch.cu_seq_lens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    batch.max_length = int(lengths.max())
    return batch


def padded_micro_batch(examples: list[TokenizedExample], pad_token_id: int) -> MicroBatch:
    """One row per example, right-padded to the longest; the plain reference path."""
    length = max(len(e.input_ids) for e in examples)
    input_ids, targets, mask = [], [], []
    for example in examples:
        pad = length - len(example.input_ids)
        input_ids.append(example.input_ids + [pad_token_id] * pad)
        targets.append(shifted_targets(example.labels) + [IGNORE_INDEX] * pad)
        mask.append([1] * len(example.input_ids) + [0] * pad)
    return _micro_batch(input_ids, targets, position_ids=None, attention_mask=torch.tensor(mask))


def _micro_batch(input_ids, targets, position_ids, attention_mask) -> MicroBatch:
    flat_targets = torch.tensor(targets).flatten()
    # Positions are chosen here, on the CPU, so the loss can gather them without a device sync.
    target_index = torch.nonzero(flat_targets != IGNORE_INDEX).flatten()
    num_tokens = int(attention_mask.sum()) if attention_mask is not None else len(input_ids[0])
    return MicroBatch(input_ids=torch.tensor(input_ids), position_ids=position_ids, attention_mask=attention_mask,
                      target_index=target_index, target_ids=flat_targets[target_index], num_tokens=num_tokens)


def build_micro_batches(examples: list[TokenizedExample], indices: list[int], micro_batch_size: int,
                        packing: bool, pad_token_id: int, max_tokens: int = 0) -> list[MicroBatch]:
    """The micro-batches of one optimizer step's examples (see group_examples for the split)."""
    groups = group_examples(examples, indices, micro_batch_size, packing, max_tokens)
    return [packed_micro_batch(g) if packing else padded_micro_batch(g, pad_token_id) for g in groups]


def group_examples(examples: list[TokenizedExample], indices: list[int], micro_batch_size: int,
                   packing: bool, max_tokens: int = 0) -> list[list[TokenizedExample]]:
    """Split the examples of one optimizer step, in order, into micro-batches of at most
    micro_batch_size examples and (packed, max_tokens > 0) at most max_tokens tokens; an example
    longer than max_tokens goes alone. The split changes peak memory, not the step's gradient."""
    groups, group, group_tokens = [], [], 0
    for i in indices:
        length = len(examples[i].input_ids)
        over_budget = packing and max_tokens > 0 and group_tokens + length > max_tokens
        if group and (len(group) == micro_batch_size or over_budget):
            groups.append(group)
            group, group_tokens = [], 0
        group.append(examples[i])
        group_tokens += length
    if group:
        groups.append(group)
    return groups


def target_token_count(example: TokenizedExample) -> int:
    """Response tokens the example contributes to the loss (its micro-batch's num_target_tokens share)."""
    return sum(label != IGNORE_INDEX for label in shifted_targets(example.labels))
