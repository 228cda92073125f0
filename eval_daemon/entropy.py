"""Mean token entropy of responses: which responses are scored, and the one definition both engines use.

Asking vLLM for logprobs of every generated token made generation 7x slower on an H100, so a
fixed, seeded subsample of the responses (`evaluation.entropy_sample_size`, the same problems for
every checkpoint) is scored after generation, by the engine that already holds the model (no
second copy of the weights), in a teacher-forced forward pass over prompt + response:

- hf engine:   the transformers model's decoder, then its LM head (eval_daemon/engines/hf.py).
- vllm engine: the same inside vLLM's worker, on the weights it serves
               (eval_daemon/engines/vllm_worker.py, called through `LLM.collective_rpc`).

Both reduce the hidden states to entropy with `response_entropies` below: the full-vocabulary
entropy (nats, temperature 1, no top-p) of the next-token distribution at every position that
predicts a response token, averaged over the response's positions (method EXACT_METHOD). The
logits exist CHUNK_POSITIONS positions at a time, never [all tokens x vocabulary] at once.
Evaluations recorded before this (vLLM) carry "vllm_prompt_logprobs_top20_lower_bound": a lower
bound from the top-20 prompt logprobs, far below the exact value (0.33 vs 6.6 nats on the demo, issue 17).
The method and the sample size are stored with each number. Used by eval_daemon/engines/ and
eval_daemon/evaluate.py.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

EXACT_METHOD = "exact_full_vocab"
CHUNK_POSITIONS = 256  # [256 x 152k] float32 logits: 155 MB, inside what vLLM reserves for its sampler


def sample_indices(num_examples: int, sample_size: int, seed: int) -> list[int]:
    """A fixed, seeded choice of example indices (ascending); all when sample_size >= num_examples."""
    if sample_size <= 0:
        return []
    if sample_size >= num_examples:
        return list(range(num_examples))
    return sorted(random.Random(seed).sample(range(num_examples), sample_size))


def response_positions(prompt_length: int, response_length: int) -> slice:
    """The positions of prompt + response whose next-token distributions predict the response's
    tokens: from the last prompt token to the one before the last response token."""
    return slice(prompt_length - 1, prompt_length - 1 + response_length)


def position_entropies(states, logits_of: Callable):
    """Full-vocabulary entropy (nats, float32) of each position of `states` ([positions, hidden]);
    `logits_of(chunk)` is the model's LM head, applied to CHUNK_POSITIONS positions at a time."""
    import torch

    values = []
    for start in range(0, len(states), CHUNK_POSITIONS):
        logp = torch.log_softmax(logits_of(states[start:start + CHUNK_POSITIONS]).float(), dim=-1)
        values.append(-(logp.exp() * logp).sum(dim=-1))
    return torch.cat(values) if values else torch.zeros(0)


def response_entropies(response_states: Sequence, logits_of: Callable) -> list[float]:
    """Mean token entropy of each response from its `response_positions` hidden states
    ([response length, hidden] each, none empty); the responses' positions share the chunks."""
    import torch

    entropies = position_entropies(torch.cat(list(response_states)), logits_of)
    return [float(part.mean()) for part in entropies.split([len(s) for s in response_states])]
