"""One optimizer step: forward/backward over the micro-batches, clip, AdamW, scheduler.

Used by `bin/train`; `forward_backward` is the unit a throughput benchmark times.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from train_daemon.attention import packed_attention_kwargs
from train_daemon.batching import MicroBatch
from train_daemon.loss import response_loss_sum


@dataclass
class StepResult:
    loss: torch.Tensor  # mean CE over the step's response tokens (0-dim, on the device: read it only when logging)
    grad_norm: torch.Tensor  # total gradient norm before clipping
    learning_rate: float  # the rate this step used
    num_tokens: int  # non-pad tokens
    num_target_tokens: int  # response tokens (the loss denominator)


def forward_backward(model, micro_batch: MicroBatch, step_target_tokens: int,
                     autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, int]:
    """Forward and backward of one micro-batch; returns (detached loss sum, response tokens).

    The backward pass uses loss_sum / step_target_tokens, so after all micro-batches of a step
    the gradients are those of the mean over the whole step (see train_daemon.loss).
    """
    device_type = micro_batch.input_ids.device.type
    autocast = (torch.autocast(device_type=device_type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        # use_cache=False matters: with a cache transformers ignores position_ids when building the
        # attention mask, and packed examples would attend to each other.
        hidden = model.model(input_ids=micro_batch.input_ids, attention_mask=micro_batch.attention_mask,
                             position_ids=micro_batch.position_ids, use_cache=False,
                             **packed_attention_kwargs(model, micro_batch)).last_hidden_state
        loss_sum = response_loss_sum(hidden, model.lm_head, micro_batch.target_index, micro_batch.target_ids)
    (loss_sum / step_target_tokens).backward()
    return loss_sum.detach(), micro_batch.num_target_tokens


def train_step(model, micro_batches: list[MicroBatch], optimizer, scheduler, max_grad_norm: float,
               device: torch.device, autocast_dtype: torch.dtype | None,
               before_update: Callable[[], None] | None = None) -> StepResult:
    """Accumulate gradients over the micro-batches, clip, step the optimizer and the schedule.
    `before_update` runs right before the weights change (a snapshot copy in flight waits there)."""
    step_target_tokens = sum(mb.num_target_tokens for mb in micro_batches)
    loss_sum = torch.zeros((), device=device)
    on_device = [micro_batch.to(device) for micro_batch in micro_batches]  # all copies queued up front
    for micro_batch in on_device:
        part, _ = forward_backward(model, micro_batch, step_target_tokens, autocast_dtype)
        loss_sum += part
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    learning_rate = optimizer.param_groups[0]["lr"]
    if before_update is not None:
        before_update()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss_sum / step_target_tokens, grad_norm=grad_norm.detach(), learning_rate=learning_rate,
                      num_tokens=sum(mb.num_tokens for mb in micro_batches), num_target_tokens=step_target_tokens)


def make_optimizer(model, learning_rate: float, betas: tuple[float, float], weight_decay: float,
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (decaying norms and biases only hurts); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device.type == "cuda")
