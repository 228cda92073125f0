"""Cross-entropy over response tokens, without materialising full-vocabulary logits for all tokens.

Used by train_daemon.step. Normalisation (documented choice): the loss of an optimizer step is the
mean over every response token of the step, i.e. sum of token losses / number of response tokens
across ALL its gradient-accumulation micro-batches. Each token weighs the same whatever micro-batch
it landed in, so the gradient does not depend on how examples are split into micro-batches (a
mean of per-micro-batch means would give tokens of short micro-batches more weight). This module
returns sums; train_daemon.step divides by the step's token count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Response positions per lm_head + cross-entropy chunk. Qwen2.5's vocabulary is ~152k, so one
# chunk's float32 logits are 4096 * 152k * 4 B = 2.5 GB; the whole step's would be tens of GB.
LOSS_CHUNK_TOKENS = 4096


def response_loss_sum(hidden: torch.Tensor, lm_head: torch.nn.Module, target_index: torch.Tensor,
                      target_ids: torch.Tensor, chunk_tokens: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """Sum of token cross-entropies at the positions `target_index` (flat into rows * length).

    Only response positions go through the lm_head. Each chunk runs under activation
    checkpointing, so its logits are freed after the forward and recomputed in the backward:
    at most one chunk of logits is alive at a time.
    """
    selected = hidden.flatten(0, 1).index_select(0, target_index)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, selected.shape[0], chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(_chunk_loss_sum, lm_head, selected[start:end], target_ids[start:end],
                                   use_reentrant=False)
    return total


def _chunk_loss_sum(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()  # bf16 logits under autocast; the softmax runs in float32
    return F.cross_entropy(logits, targets, reduction="sum")
