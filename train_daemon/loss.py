"""Cross-entropy over response tokens, fused with the lm_head: full-vocabulary logits exist one chunk at a time.

Used by train_daemon.step. Normalisation (documented choice): the loss of an optimizer step is the
mean over every response token of the step, i.e. sum of token losses / number of response tokens
across ALL its gradient-accumulation micro-batches. Each token weighs the same whatever micro-batch
it landed in, so the gradient does not depend on how examples are split into micro-batches (a
mean of per-micro-batch means would give tokens of short micro-batches more weight). This module
returns sums; train_daemon.step divides by the step's token count.
"""

from __future__ import annotations

import torch

# Response positions per lm_head + cross-entropy chunk. Qwen2.5's vocabulary is ~152k, so one
# chunk's float32 logits are 4096 * 152k * 4 B = 2.5 GB; the whole step's would be tens of GB.
LOSS_CHUNK_TOKENS = 4096


def response_loss_sum(hidden: torch.Tensor, lm_head: torch.nn.Module, target_index: torch.Tensor,
                      target_ids: torch.Tensor, chunk_tokens: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """Sum of token cross-entropies at the positions `target_index` (flat into rows * length).

    Only response positions go through the lm_head, in chunks; each chunk's gradients (towards
    the hidden states and the lm_head weight) are computed in the forward, right after its loss, so
    its logits are freed at once and never recomputed (see LinearCrossEntropy).
    """
    if getattr(lm_head, "bias", None) is not None:
        raise ValueError("the fused loss expects an lm_head without bias (Qwen2, Llama)")
    selected = hidden.flatten(0, 1).index_select(0, target_index)
    device_type = selected.device.type
    # Under autocast the matmuls run in its dtype (bf16); the softmax always runs in float32.
    compute_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else selected.dtype)
    return LinearCrossEntropy.apply(selected, lm_head.weight, target_ids, chunk_tokens, compute_dtype)


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i) with its gradients computed chunk by chunk in the forward.

    The backward only scales the stored gradients by the incoming gradient (a scalar). Versus
    recomputing each chunk's logits in the backward (activation checkpointing), this saves one
    lm_head matmul per chunk and never holds more than one chunk of logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens, compute_dtype):
        w = weight.to(compute_dtype)
        want_grads = any(ctx.needs_input_grad[:2])  # False under torch.no_grad(): loss only
        grad_hidden = torch.empty_like(hidden) if want_grads else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grads else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        chunk_loss = _compiled_chunk_loss() if hidden.is_cuda else _chunk_loss_and_grad
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start:start + chunk_tokens].to(compute_dtype)
            loss, grad_logits = chunk_loss(h, w, targets[start:start + chunk_tokens])
            total += loss
            if want_grads:
                grad_hidden[start:start + chunk_tokens] = grad_logits @ w
                grad_weight += grad_logits.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_total, (grad_weight * grad_total).to(ctx.weight_dtype), None, None, None


def _chunk_loss_and_grad(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor):
    """Loss sum of one chunk and d(loss)/d(logits) = softmax - onehot, in h's dtype."""
    logits = (h @ w.t()).float()
    lse = torch.logsumexp(logits, dim=-1)
    loss = (lse - logits.gather(1, targets[:, None]).squeeze(1)).sum()
    grad_logits = torch.exp(logits - lse[:, None])
    grad_logits.scatter_add_(1, targets[:, None], torch.full_like(lse[:, None], -1.0))
    return loss, grad_logits.to(h.dtype)


_COMPILED_CHUNK = None


def _compiled_chunk_loss():
    """torch.compile fuses the softmax, gather and one-hot passes over the chunk's logits (GPU)."""
    global _COMPILED_CHUNK
    if _COMPILED_CHUNK is None:
        _COMPILED_CHUNK = torch.compile(_chunk_loss_and_grad, dynamic=True)
    return _COMPILED_CHUNK
