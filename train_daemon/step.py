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

LOSS_METHOD = "mathsft_loss_sum"  # set on a sharded model by train_daemon.distributed.shard_model


@dataclass
class StepResult:
    loss: torch.Tensor  # mean CE over the step's response tokens (0-dim, on the device: read it only when logging)
    grad_norm: torch.Tensor  # total gradient norm before clipping
    learning_rate: float  # the rate this step used
    num_tokens: int  # non-pad tokens of the step (on several ranks: of all ranks)
    num_target_tokens: int  # response tokens of the step (the loss denominator)


def forward_backward(model, micro_batch: MicroBatch, step_target_tokens: int,
                     autocast_dtype: torch.dtype | None = None, weight: float = 1.0) -> tuple[torch.Tensor, int]:
    """Forward and backward of one micro-batch; returns (detached loss sum, response tokens).

    The backward pass uses loss_sum / step_target_tokens, so after all micro-batches of a step
    the gradients are those of the mean over the whole step (see train_daemon.loss). `weight` 0
    runs a filler micro-batch that adds nothing (train_step, on several ranks).
    """
    device_type = micro_batch.input_ids.device.type
    autocast = (torch.autocast(device_type=device_type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    # A sharded model (train_daemon.distributed) runs the same function through FSDP's gather hooks.
    loss_of = getattr(model, LOSS_METHOD, None) or (lambda mb: micro_batch_loss_sum(model, mb))
    with autocast:
        loss_sum = loss_of(micro_batch)
    (loss_sum * (weight / step_target_tokens)).backward()
    return loss_sum.detach(), micro_batch.num_target_tokens


def micro_batch_loss_sum(model, micro_batch: MicroBatch) -> torch.Tensor:
    """Sum of the response-token cross-entropies of one micro-batch: the decoder, then the fused loss."""
    # use_cache=False matters: with a cache transformers ignores position_ids when building the
    # attention mask, and packed examples would attend to each other.
    hidden = model.model(input_ids=micro_batch.input_ids, attention_mask=micro_batch.attention_mask,
                         position_ids=micro_batch.position_ids, use_cache=False,
                         **packed_attention_kwargs(model, micro_batch)).last_hidden_state
    return response_loss_sum(hidden, model.lm_head, micro_batch.target_index, micro_batch.target_ids)


@dataclass(frozen=True)
class StepShare:
    """One rank's view of a step run on several ranks (train_daemon.distributed.step_share)."""
    target_tokens: int  # response tokens of the whole step, over all ranks (the loss denominator)
    micro_batches: int  # micro-batches each rank runs: the most any rank has (FSDP's collectives pair up)
    tokens: int  # non-pad tokens of the whole step


def train_step(model, micro_batches: list[MicroBatch], optimizer, scheduler, max_grad_norm: float,
               device: torch.device, autocast_dtype: torch.dtype | None,
               before_update: Callable[[], None] | None = None, share: StepShare | None = None) -> StepResult:
    """Accumulate gradients over the micro-batches, clip, step the optimizer and the schedule.
    `before_update` runs right before the weights change (a snapshot copy in flight waits there).
    `share`: this rank's micro-batches are its slice of a step on several ranks; the loss, the
    gradients and their norm are then those of the whole step."""
    step_target_tokens = share.target_tokens if share else sum(mb.num_target_tokens for mb in micro_batches)
    loss_sum = torch.zeros((), device=device)
    on_device = [micro_batch.to(device) for micro_batch in micro_batches]  # all copies queued up front
    for micro_batch in on_device:
        part, _ = forward_backward(model, micro_batch, step_target_tokens, autocast_dtype)
        loss_sum += part
    for _ in range((share.micro_batches if share else 0) - len(on_device)):
        # A rank with fewer micro-batches than another still runs as many (FSDP gathers and reduces
        # per micro-batch, every rank must take part); weight 0: its gradients add nothing.
        forward_backward(model, on_device[0], step_target_tokens, autocast_dtype, weight=0.0)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)  # DTensor-aware
    if share is not None:
        grad_norm = grad_norm.full_tensor()  # a replicated DTensor: the norm over all shards
        torch.distributed.all_reduce(loss_sum)
    learning_rate = optimizer.param_groups[0]["lr"]
    if before_update is not None:
        before_update()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss_sum / step_target_tokens, grad_norm=grad_norm.detach(), learning_rate=learning_rate,
                      num_tokens=share.tokens if share else sum(mb.num_tokens for mb in micro_batches),
                      num_target_tokens=step_target_tokens)


def make_optimizer(model, learning_rate: float, betas: tuple[float, float], weight_decay: float,
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (decaying norms and biases only hurts); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device.type == "cuda")
