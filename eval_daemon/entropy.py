"""Mean token entropy of responses: which responses are scored, and the two estimators.

Asking vLLM for top-20 logprobs of every generated token made generation 7x slower on an H100,
so a fixed, seeded subsample of the responses (`evaluation.entropy_sample_size`, the same problems
for every checkpoint) is scored in a prefill over prompt + response, by the engine that already
holds the model (no second copy of the weights), at the end of the engine's generate():

- hf engine:   a teacher-forced forward pass after the batches; entropy over the full vocabulary
               (exact).
               method "hf_forward_full_vocab".
- vllm engine: one more engine call with max_tokens=1 and prompt_logprobs=20 (prefill only).
               The entropy is computed from the top-20 probabilities plus the remaining mass as
               one bucket, a lower bound on the full-vocabulary entropy that is exact when the top
               20 hold all the mass. method "vllm_prompt_logprobs_top20_lower_bound".

The entropy is that of the model's own distribution (temperature 1, no top-p), averaged over the
response's positions, then over responses. The method and the sample size are stored with each
number. Used by eval_daemon/engines/base.py and eval_daemon/evaluate.py.
"""

from __future__ import annotations

import math
import random

TOP_K = 20  # vLLM's default max_logprobs; larger needs a bigger max_logprobs at engine start


def sample_indices(num_examples: int, sample_size: int, seed: int) -> list[int]:
    """A fixed, seeded choice of example indices (ascending); all when sample_size >= num_examples."""
    if sample_size <= 0:
        return []
    if sample_size >= num_examples:
        return list(range(num_examples))
    return sorted(random.Random(seed).sample(range(num_examples), sample_size))


def entropy_from_top_logprobs(logprobs: list[float]) -> float:
    """Entropy (nats) of one position from its top-k log-probabilities (normalised over the full
    vocabulary); the mass outside the top k counts as a single outcome, so this is a lower bound."""
    probs = [math.exp(lp) for lp in logprobs]
    entropy = -sum(p * lp for p, lp in zip(probs, logprobs) if p > 0)
    rest = 1.0 - sum(probs)
    if rest > 1e-12:
        entropy -= rest * math.log(rest)
    return entropy


def mean_entropy_from_logits(logits) -> float:
    """Mean entropy (nats) over positions of a [positions, vocab] logits tensor, in float32."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    return float(-(logp.exp() * logp).sum(dim=-1).mean())
