"""Training on several processes: torchrun's process group, FSDP2 sharding, each rank's share of a step.

    torchrun --nproc_per_node 4 -m train_daemon --config config/sft_config.yaml     # 4 GPUs, one host

Used by train_daemon.trainer. Without torchrun (WORLD_SIZE unset or 1) nothing here is active and
the trainer runs as one process, exactly as before. Under torchrun each rank holds a shard of the
weights, gradients and AdamW moments (`torch.distributed.fsdp.fully_shard` per decoder layer, then
the root), trains on a contiguous slice of every step's examples, and takes part in every
collective: gathering the full weights for a checkpoint, and the sharded resume state
(train_daemon.resume). Only rank 0 writes run files, logs, checkpoints and W&B.

A step on N ranks is the same step as on one process: the same examples (the data stream is the
same on every rank; each takes its slice), gradients summed over ranks (not averaged) and every
token divided by the response-token count of the WHOLE step, which every rank computes from the
step's examples without communicating.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from common.config import Config, ConfigError
from train_daemon.batching import TokenizedExample, group_examples, target_token_count
from train_daemon.step import LOSS_METHOD, StepShare, micro_batch_loss_sum

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0  # the GPU of this rank on its host

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """The ranks torchrun describes in its environment (one process without it); starts nothing."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    return World(rank=int(os.environ["RANK"]), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init_process_group(world: World, wanted_device: str) -> None:
    """gloo on CPU; on GPUs NCCL for tensors and gloo for the few CPU objects (publish decisions).
    `wanted_device`: training.device (train_daemon.loading.choose_device picks the rank's device)."""
    if not world.distributed or dist.is_initialized():
        return
    _die_with_launcher()
    if wanted_device.startswith("cuda") and torch.cuda.is_available():
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {world.local_rank} but {torch.cuda.device_count()} GPU(s) visible on this host; "
                              f"start at most {torch.cuda.device_count()} processes (bin/train --nproc N)")
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=torch.device("cuda", world.local_rank))
    else:
        dist.init_process_group("gloo")


def _die_with_launcher() -> None:
    """torchrun starts each rank in a session of its own, so a kill -9 of torchrun (or of its process
    group) would leave the ranks training on, unsupervised, beside the next start. Linux delivers
    SIGKILL to this rank when its parent dies instead: as safe as a kill -9 of one trainer."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: no such call; the ranks outlive a killed torchrun there
        logger.warning("cannot tie this rank's life to torchrun's (no prctl): kill the ranks too if you kill torchrun")
        return
    if os.getppid() == 1:  # torchrun died before the call
        os._exit(137)


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2 in place: each decoder layer its own unit, then the root (embeddings, final norm, lm_head).
    Layers are compiled before this (train_daemon.loading), as torchtitan does."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    # On GPU the gathered weights and the matmuls are bf16 and gradients are reduced in float32 over
    # float32 master shards; gloo reduces in float32 (CPU tests, where the step must match 1 process).
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type == "cuda" else MixedPrecisionPolicy())
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Sum over ranks, not the mean: the loss already divides by the whole step's tokens. A plain
            # sum (gloo has no pre-multiplied sum, and there is nothing to multiply).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    # The trainer runs the decoder and the fused loss (train_daemon.step.micro_batch_loss_sum), never
    # model.forward, so the root's gather/reduce hooks are attached to that call instead.
    setattr(model, LOSS_METHOD, types.MethodType(micro_batch_loss_sum, model))
    register_fsdp_forward_method(model, LOSS_METHOD)
    return model


def rank_slice(indices: list[int], world: World, rank: int | None = None) -> list[int]:
    """The contiguous part of a step's examples that `rank` (default: this one) trains on."""
    rank = world.rank if rank is None else rank
    per, extra = divmod(len(indices), world.size)
    start = rank * per + min(rank, extra)
    return indices[start:start + per + (rank < extra)]


def step_share(examples: list[TokenizedExample], indices: list[int], world: World, micro_batch_size: int,
               packing: bool, max_tokens: int) -> StepShare:
    """Computed identically on every rank from the step's examples, without communicating."""
    counts = [len(group_examples(examples, rank_slice(indices, world, rank), micro_batch_size, packing, max_tokens))
              for rank in range(world.size)]
    return StepShare(target_tokens=sum(target_token_count(examples[i]) for i in indices), micro_batches=max(counts),
                     tokens=sum(len(examples[i].input_ids) for i in indices))


def from_main(world: World, value: Callable[[], Any]) -> Any:
    """Rank 0's `value()` on every rank: a decision from files or signals that ranks could see
    differently (they must all stop, publish and save at the same steps)."""
    if not world.distributed:
        return value()
    box = [value() if world.is_main else None]
    dist.broadcast_object_list(box, src=0)  # a CPU object: gloo, no GPU sync
    return box[0]


def first_failure(world: World, failure: Exception | None) -> Exception | None:
    """The first rank's exception, on every rank (None when no rank failed)."""
    if not world.distributed:
        return failure
    failures: list = [None] * world.size
    dist.all_gather_object(failures, failure)
    return next((f for f in failures if f is not None), None)


def check_world(world: World, examples_per_step: int) -> None:
    if world.size > examples_per_step:
        raise ConfigError(f"{world.size} ranks but {examples_per_step} examples per step (training.batch_size * "
                          f"training.gradient_accumulation_steps); every rank needs one: raise them or use fewer ranks")


def resolve_run_on_all(world: World, config: Config, resolve: Callable[[Config], Any]):
    """train_daemon.run.resolve_run on every rank, for the same run: a new run's id comes from the
    clock, so rank 0's is everyone's."""
    if world.distributed:
        run = resolve(config) if world.is_main else None
        config.training.run_id = from_main(world, lambda: run.run_id)
    return resolve(config)


def full_state_dict(model: torch.nn.Module, aliases: set[str]) -> dict[str, torch.Tensor]:
    """The complete float32 weights on rank 0's CPU (empty on the other ranks); every rank must call it.
    `aliases`: names of tied tensors that the unsharded model stores once (train_daemon.weights)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: tensor for name, tensor in state.items() if name not in aliases}


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def destroy(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
