"""Resume state: everything needed to continue a run exactly where it stopped.

Used by `bin/train`. Layout under `<results_dir>/runs/<run_id>/resume/` (private to the trainer):

    latest.json           {"step": N, "dir": "step_00000N"}: the only pointer readers follow
    step_00000N/          model.safetensors (float32 master weights), optimizer.pt,
                          trainer.pt (scheduler + RNG states), state.json (step, data position, tokens)

Written atomically: a temporary directory is filled and fsynced, renamed into place, then
latest.json is replaced (temp file + fsync + os.replace), then older states are deleted. A kill -9
at any moment leaves latest.json pointing at a complete state. The daemon snapshots the state to
host memory and writes it in the background (ResumeWriter), as the publisher does checkpoints.

On several ranks (torchrun, train_daemon.distributed) a state is sharded instead, and written by
all ranks together, in the training thread (each rank writes only its shard):

    step_00000N/          shards/ (torch.distributed.checkpoint: the weights and AdamW moments,
                          each rank its part), trainer_rank<r>.pt (scheduler + that rank's RNG),
                          state.json (as above, with "ranks": N)

with the same temporary directory, rename and pointer, done by rank 0 once every rank has written.
It resumes on any number of ranks > 1 (torch.distributed.checkpoint reshards on load).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from common.contract import step_dir_name
from common.durable import TEMP_PREFIX, atomic_write_json, atomic_write_text, fsync_dir, fsync_tree
from train_daemon import distributed
from train_daemon.background import BackgroundWriter, copy_to_host, host_bytes, inject_test_fault, pinned_buffers
from train_daemon.distributed import World
from train_daemon.weights import load_weights, unique_state_dict

logger = logging.getLogger(__name__)

POINTER_NAME = "latest.json"


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    data_epoch: int = 0  # data position: epoch ...
    data_index: int = 0  # ... and examples of that epoch's order already consumed
    tokens_seen: int = 0  # non-pad tokens trained on
    last_loss: float | None = None  # loss and learning rate of the last step (checkpoint metrics)
    last_learning_rate: float | None = None


@dataclass
class ResumeSnapshot:
    """Host copies of everything in a resume state, taken at one step."""
    state: TrainerState
    weights: dict[str, torch.Tensor]
    optimizer: dict
    trainer: dict  # scheduler state + RNG states


def snapshot_resume_state(state: TrainerState, model, optimizer, scheduler, buffers: dict[str, torch.Tensor],
                          copy_tensors: Callable[..., dict[str, torch.Tensor]] = copy_to_host) -> ResumeSnapshot:
    """Host copies of the state at this step; training may change the originals right after.
    The optimizer's tensors (AdamW moments, step counts) are copied like the weights."""
    optimizer_state = optimizer.state_dict()
    tensors = _tensors(optimizer_state["state"])
    copies = copy_tensors({**{f"model.{k}": v for k, v in unique_state_dict(model).items()},
                           **{f"optimizer.{k}": v for k, v in tensors.items()}}, buffers)
    host_state = {index: {key: copies.get(f"optimizer.{index}.{key}", value) for key, value in entry.items()}
                  for index, entry in optimizer_state["state"].items()}
    return ResumeSnapshot(
        state=replace(state),
        weights={k[len("model."):]: v for k, v in copies.items() if k.startswith("model.")},
        optimizer={"state": host_state, "param_groups": copy.deepcopy(optimizer_state["param_groups"])},
        trainer={"scheduler": scheduler.state_dict(), "rng": _rng_state()},
    )


def write_resume_state(resume_dir: Path, snapshot: ResumeSnapshot) -> float:
    """Write a snapshot atomically (see module docstring); returns the seconds it took."""
    start = time.monotonic()
    resume_dir.mkdir(parents=True, exist_ok=True)
    final = resume_dir / step_dir_name(snapshot.state.step)
    tmp = resume_dir / f"{TEMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        inject_test_fault(snapshot.state.step, tmp)
        save_file(snapshot.weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        torch.save(snapshot.optimizer, tmp / "optimizer.pt")
        torch.save(snapshot.trainer, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(snapshot.state), indent=2) + "\n")
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write (disk full) leaves nothing behind
        raise
    _publish_state_dir(resume_dir, tmp, final, snapshot.state.step)
    return time.monotonic() - start


def _publish_state_dir(resume_dir: Path, tmp: Path, final: Path, step: int) -> None:
    """Rename a complete, fsynced state into place, point latest.json at it, delete the older ones."""
    if final.exists():  # the same step saved before a crash: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(resume_dir)
    atomic_write_json(resume_dir / POINTER_NAME, {"step": step, "dir": final.name})
    for old in resume_dir.glob("step_*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def write_sharded_resume_state(resume_dir: Path, state: TrainerState, model, optimizer, scheduler,
                               world: World) -> float:
    """Every rank calls it: each writes its shards and RNG, then rank 0 publishes the directory
    (module docstring). A failure on any rank raises on every rank, after the temporary directory
    is removed, so that all ranks go on (or stop) alike; latest.json still names the previous
    state. Returns the seconds it took."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    start = time.monotonic()
    final = resume_dir / step_dir_name(state.step)
    tmp = resume_dir / f"{TEMP_PREFIX}{final.name}-sharded"  # one name for all ranks

    def write_shards() -> None:
        inject_test_fault(state.step, tmp)
        model_state, optimizer_state = get_state_dict(model, optimizer)
        # A rank's failure inside dcp.save reaches every rank (DCP gathers the outcomes).
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp / "shards")
        torch.save({"scheduler": scheduler.state_dict(), "rng": _rng_state()}, tmp / f"trainer_rank{world.rank}.pt")

    def publish() -> None:
        (tmp / "state.json").write_text(json.dumps({**asdict(state), "ranks": world.size}, indent=2) + "\n")
        fsync_tree(tmp)
        _publish_state_dir(resume_dir, tmp, final, state.step)

    def make_directory() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    # Each stage ends with every rank knowing every failure so far (and waiting for the stage).
    failure = distributed.from_main(world, lambda: _attempt(make_directory))
    if failure is None:
        failure = distributed.first_failure(world, _attempt(write_shards))
    if failure is None:
        failure = distributed.from_main(world, lambda: _attempt(publish))
    if failure is not None:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed write (disk full) leaves nothing behind
        raise failure
    return time.monotonic() - start


def _attempt(work: Callable[[], object]) -> Exception | None:
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        work()
    except CheckpointException as exc:  # a BaseException: the first rank's own error (an ENOSPC OSError, ...)
        return next((error for error, _ in exc.failures.values() if isinstance(error, Exception)), RuntimeError(str(exc)))
    except Exception as exc:  # noqa: BLE001 (handed to every rank, then raised there: see write_sharded_resume_state)
        return exc
    return None


def _load_sharded(directory: Path, model, optimizer, scheduler, world: World) -> TrainerState:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    saved = json.loads((directory / "state.json").read_text())
    ranks = saved.pop("ranks", 1)
    if (ranks == 1) != (world.size == 1):  # the one-process format is not sharded
        raise ValueError(f"saved by {ranks} ranks: resume with bin/train --nproc N (N > 1)"
                         if ranks > 1 else "saved by one process: resume without torchrun")
    if ranks != world.size:  # DCP reshards the weights and moments; the data order does not depend on N
        logger.warning("resume state of %d ranks loaded on %d: same run, summed in another order (float rounding)",
                       ranks, world.size)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state_dicts = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state_dicts, checkpoint_id=directory / "shards")
    set_state_dict(model, optimizer, model_state_dict=state_dicts["model"], optim_state_dict=state_dicts["optimizer"])
    # The RNG draws nothing the run depends on (data order comes from the seed); a rank the state
    # had not takes the last saved rank's.
    trainer = torch.load(directory / f"trainer_rank{min(world.rank, ranks - 1)}.pt", weights_only=True)
    scheduler.load_state_dict(trainer["scheduler"])
    _set_rng_state(trainer["rng"])
    return TrainerState(**saved)


def save_resume_state(resume_dir: Path, state: TrainerState, model, optimizer, scheduler) -> float:
    """Snapshot and write in the calling thread (tests, tools); the daemon uses ResumeWriter."""
    return write_resume_state(resume_dir, snapshot_resume_state(state, model, optimizer, scheduler, {}))


class ResumeWriter:
    """Saves resume state in the background: a 1.5B model's state is ~18 GB (float32 weights and
    two AdamW moments) and writing it takes tens of seconds; the snapshot takes about one.
    A failed write reaches the training thread (`writer.failures`); the previous state stays valid."""

    def __init__(self, resume_dir: Path, saved_step: int, world: World = World()):
        self.resume_dir, self.world = resume_dir, world
        self.requested_step = saved_step  # step of the latest save asked for (or loaded)
        self.saved_step = saved_step  # step of the latest state on disk
        self.writer = BackgroundWriter("resume state", resume_dir)
        self._buffers: dict[str, torch.Tensor] = {}

    def allocate(self, model, optimizer) -> None:
        """Pin the host buffers of the first snapshot now, before training (on a GPU). The names and
        shapes are those snapshot_resume_state copies: the weights, and AdamW's two moments and
        step count per parameter (its state exists only after the first step)."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        cuda = params and params[0].device.type == "cuda"
        if not cuda or not isinstance(optimizer, torch.optim.AdamW) or self.world.distributed:
            return
        step_dtype = torch.float32  # AdamW's step count when it lives on the device (fused/capturable)
        specs = {f"model.{name}": (t.shape, t.dtype) for name, t in unique_state_dict(model).items()}
        for index, param in enumerate(params):  # the indices of optimizer.state_dict()
            specs.update({f"optimizer.{index}.exp_avg": (param.shape, param.dtype),
                          f"optimizer.{index}.exp_avg_sq": (param.shape, param.dtype),
                          f"optimizer.{index}.step": (torch.Size([]), step_dtype)})
        start = time.monotonic()
        self._buffers.update(pinned_buffers(specs))
        logger.info("resume state: %.1f GB of pinned host memory allocated in %.1f s",
                    host_bytes(self._buffers) / 1e9, time.monotonic() - start)

    def save(self, state: TrainerState, model, optimizer, scheduler) -> None:
        if self.world.distributed:
            self.requested_step = state.step
            seconds = self.writer.run_here(state.step, 0, write_sharded_resume_state, self.resume_dir, state, model,
                                           optimizer, scheduler, self.world)  # 0 bytes: ENOSPC says disk full
            if seconds is not None:
                self.saved_step = state.step
                logger.info("sharded resume state saved at step %d (%.1f s, training waited)", state.step, seconds)
            return
        stalled = self.writer.wait()
        if stalled > 0.1:
            logger.warning("step %d: training waited %.1f s for the previous resume-state write", state.step, stalled)
        start = time.monotonic()
        snapshot = snapshot_resume_state(state, model, optimizer, scheduler, self._buffers, self.writer.snapshot)
        logger.info("step %d: resume state copied to host memory in %.1f s", state.step, time.monotonic() - start)
        self.requested_step = state.step
        nbytes = host_bytes(snapshot.weights) + host_bytes(_tensors(snapshot.optimizer["state"]))
        self.writer.submit(state.step, nbytes, self._write, snapshot)

    def wait(self) -> bool:
        """Wait for the in-flight write; True when the latest save asked for is on disk."""
        self.writer.wait()
        return self.saved_step == self.requested_step

    def _write(self, snapshot: ResumeSnapshot) -> None:
        seconds = write_resume_state(self.resume_dir, snapshot)  # raises to the training thread
        self.saved_step = snapshot.state.step
        logger.info("resume state saved at step %d (%.1f s in the background)", snapshot.state.step, seconds)


def _tensors(optimizer_state: dict) -> dict[str, torch.Tensor]:
    return {f"{index}.{key}": value for index, entry in optimizer_state.items()
            for key, value in entry.items() if isinstance(value, torch.Tensor)}


class ResumeError(ValueError):
    """Resume state that cannot be loaded (one-line message naming the fix)."""


def load_resume_state(resume_dir: Path, model, optimizer, scheduler, device: torch.device,
                      world: World = World()) -> TrainerState | None:
    """Restore model, optimizer, scheduler and RNG from the latest state; None when there is none.
    On several ranks every rank calls it and reads its own shards."""
    pointer = resume_dir / POINTER_NAME
    if not pointer.exists():
        return None
    try:
        directory = resume_dir / json.loads(pointer.read_text())["dir"]
        if world.distributed or (directory / "shards").is_dir():
            return _load_sharded(directory, model, optimizer, scheduler, world)
        state = TrainerState(**json.loads((directory / "state.json").read_text()))
        load_weights(model, directory / "model.safetensors")
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location=device, weights_only=True))
        trainer = torch.load(directory / "trainer.pt", weights_only=True)
        scheduler.load_state_dict(trainer["scheduler"])
        _set_rng_state(trainer["rng"])
    # Missing/corrupt files, or state from another model or optimizer layout.
    except (OSError, KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
        raise ResumeError(f"cannot resume from {resume_dir} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                          f"delete that directory to restart the run from step 0, or set a new training.run_id") from exc
    return state


def remove_stale_resume_temps(resume_dir: Path) -> None:
    """Delete half-written states left by a crash (start-up only)."""
    for child in resume_dir.glob(f"{TEMP_PREFIX}*"):
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trim_log(path: Path, last_step: int) -> int:
    """Drop log lines past `last_step` (steps a crash made us redo), so the curve stays continuous.
    A torn last line (kill -9 mid-write) is dropped too. Returns the number of lines dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            keep = json.loads(line).get("train_step", 0) <= last_step
        except (json.JSONDecodeError, AttributeError):  # a torn or foreign line
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return dropped
