"""The trainer's work, after bin/train has parsed its arguments (train_daemon/__main__.py):
setup (validate -> load -> resume) -> train loop -> finish. Imports torch; __main__ imports this
module only after parsing, so `bin/train --help` answers without it. Under torchrun every rank runs
this same sequence (train_daemon.distributed); only rank 0 writes files."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from common.config import Config, load_config, to_dict
from common.contract import Sidecar, is_evaluated, load_or_new_manifest, remove_stale_temp_dirs
from common.tracking import Tracker, start_tracking
from train_daemon import distributed
from train_daemon.batching import ExampleStream, build_micro_batches, tokenize_pairs
from train_daemon.distributed import World
from train_daemon.loading import (DeviceSetup, check_model_source, choose_device, load_model, load_tokenizer,
                                  load_training_pairs)
from train_daemon.metrics import LogWindow
from train_daemon.publisher import CheckpointPublisher
from train_daemon.resume import (ResumeError, ResumeWriter, TrainerState, load_resume_state,
                                 remove_stale_resume_temps, trim_log)
from train_daemon.run import Run, resolve_run, write_run_files
from train_daemon.schedule import make_scheduler, total_optimizer_steps
from train_daemon.shutdown import StopRequest
from train_daemon.step import make_optimizer, train_step
from train_daemon.weights import unique_state_dict

logger = logging.getLogger("train_daemon")


@dataclass
class Trainer:
    """Everything the loop works with, built by setup(); `state` and `stream` are its progress."""
    config: Config
    run: Run
    model: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    device: DeviceSetup
    examples: list
    total_steps: int
    publisher: CheckpointPublisher
    resume_writer: ResumeWriter
    state: TrainerState
    stream: ExampleStream
    published: set[int]  # steps in the manifest (or evaluated and deleted): never published again
    world: World  # this process's rank among torchrun's (one process: rank 0 of 1)
    aliases: set[str]  # names of tied weights stored once in a checkpoint (gathered weights list them all)
    tracker: Tracker | None = None
    last_loss: torch.Tensor | None = None  # the last step's loss, on the device
    stopped_by: str = ""  # "" (ran to the end) | "signal" | "out of GPU memory" | "disk full"


def setup(config_path: str | None, overrides: list[str]) -> Trainer:
    """Validate, load, clean crash leftovers, publish step 0, resume: everything before step 1."""
    config = load_config(config_path, overrides)
    check_model_source(config.model)
    t = config.training
    world = distributed.world_from_env()
    distributed.check_world(world, t.batch_size * t.gradient_accumulation_steps)
    if not world.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 tells the story; the others only warn
    distributed.init_process_group(world, t.device)
    run = distributed.resolve_run_on_all(world, config, resolve_run)
    tokenizer = load_tokenizer(config.model)
    examples = tokenize_pairs(load_training_pairs(config.data), tokenizer, config.model.max_seq_length)
    device = choose_device(config, world.local_rank if world.distributed else None)
    model = load_model(config, device.device)
    aliases = set(model.state_dict()) - set(unique_state_dict(model))
    if world.distributed:
        distributed.shard_model(model, device.device)
    total_steps = total_optimizer_steps(t.max_steps, t.epochs, len(examples), t.batch_size * t.gradient_accumulation_steps)
    optimizer = make_optimizer(model, t.learning_rate, (t.adam_beta1, t.adam_beta2), t.weight_decay, device.device)
    scheduler = make_scheduler(optimizer, t.warmup_steps, total_steps, t.min_lr_ratio)

    if world.is_main:
        write_run_files(run, config)
        if run.checkpoints_dir.exists():
            remove_stale_temp_dirs(run.checkpoints_dir)
        remove_stale_resume_temps(run.resume_dir)
    distributed.barrier(world)  # the leftovers are gone before any rank writes
    trainer = Trainer(
        config=config, run=run, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
        device=device, examples=examples, total_steps=total_steps,
        publisher=CheckpointPublisher(run.checkpoints_dir, run.run_id, model, tokenizer, device.save_dtype,
                                      t.keep_last_checkpoints),
        resume_writer=ResumeWriter(run.resume_dir, saved_step=0, world=world), state=TrainerState(),
        stream=ExampleStream(len(examples), t.seed),
        published=set(load_or_new_manifest(run.checkpoints_dir, run.run_id).steps()), world=world, aliases=aliases)
    # Step 0 is the base model, still in memory here even when resuming (a crash may have cut its
    # publish short); the snapshot is taken before the resume state overwrites the weights.
    publish_if_due(trainer, None)
    trainer.publisher.writer.fence()  # loading the resume state changes the weights being copied
    try:
        resumed = load_resume_state(run.resume_dir, model, optimizer, scheduler, device.device, world)
    except ResumeError:
        trainer.publisher.wait()
        raise
    if resumed is not None:
        trainer.state = resumed
        trainer.stream = ExampleStream(len(examples), t.seed, resumed.data_epoch, resumed.data_index)
        trainer.resume_writer = ResumeWriter(run.resume_dir, saved_step=resumed.step, world=world)
        publish_if_due(trainer, resumed.last_loss)  # the resumed step, if a crash cut its publish short
    if world.is_main:
        trim_log(run.log_path, trainer.state.step)  # steps after the resume point are redone, not duplicated
    logger.info("run %s: %s from step %d of %d; %d examples, %d per step; device %s%s; checkpoints in %s",
                run.run_id, "resuming" if resumed else "starting", trainer.state.step, total_steps, len(examples),
                t.batch_size * t.gradient_accumulation_steps, device.device,
                f" on each of {world.size} ranks (FSDP2)" if world.distributed else "", run.checkpoints_dir)
    if t.warmup_steps >= total_steps:
        logger.warning("training.warmup_steps=%d >= %d total steps: the learning rate never reaches its peak",
                       t.warmup_steps, total_steps)
    trainer.resume_writer.allocate(model, optimizer)
    trainer.tracker = (start_tracking(config, run.run_name, "train", run.log_path) if world.is_main
                       else Tracker(None, None))
    return trainer


def train_loop(trainer: Trainer, stop: StopRequest) -> None:
    """Optimizer steps until the end of the run, a stop signal, out of memory or a full disk."""
    t, state, writers, world = trainer.config.training, trainer.state, _writers(trainer), trainer.world
    window = LogWindow(trainer.device.device)
    bar = tqdm(total=trainer.total_steps, initial=state.step, desc="train", unit="step", file=sys.stderr,
               dynamic_ncols=True, disable=not trainer.config.logging.progress_bar or not world.is_main)
    pad_id = trainer.tokenizer.pad_token_id
    pad_id = trainer.tokenizer.eos_token_id if pad_id is None else pad_id
    while state.step < trainer.total_steps and not trainer.stopped_by:
        indices = trainer.stream.take(t.batch_size * t.gradient_accumulation_steps)
        share = (distributed.step_share(trainer.examples, indices, world, t.batch_size, t.packing,
                                        t.max_tokens_per_micro_batch) if world.distributed else None)
        micro_batches = build_micro_batches(trainer.examples, distributed.rank_slice(indices, world), t.batch_size,
                                            t.packing, pad_id, t.max_tokens_per_micro_batch)
        try:
            result = train_step(trainer.model, micro_batches, trainer.optimizer, trainer.scheduler, t.max_grad_norm,
                                trainer.device.device, trainer.device.autocast_dtype,
                                before_update=lambda: [writer.fence() for writer in writers], share=share)
        except torch.OutOfMemoryError:
            if world.distributed:
                raise  # the other ranks wait in a collective: this rank's exit makes torchrun stop them all
            logger.error("out of GPU memory at step %d; lower training.max_tokens_per_micro_batch (same effective "
                         "batch) or set training.gradient_checkpointing=true, then resume", state.step + 1)
            trainer.stopped_by = "out of GPU memory"
            break
        state.step += 1
        state.tokens_seen += result.num_tokens
        state.data_epoch, state.data_index = trainer.stream.epoch, trainer.stream.index
        state.last_learning_rate = result.learning_rate
        trainer.last_loss = result.loss  # stays on the device; read only when a checkpoint or resume state needs it
        bar.update(1)
        last = state.step == trainer.total_steps
        _log(trainer, bar, window.add(result, state.step, state.step % trainer.config.logging.log_every == 0 or last,
                                      trainer.stream.epoch_progress, state.tokens_seen, last))
        for writer in writers:
            writer.poll()  # a failed write is reported now, not at the next save
        # Rank 0's verdict, so that all ranks stop after the same step (one small broadcast on several ranks).
        verdict = distributed.from_main(world, lambda: "disk full" if any(w.disk_full for w in writers)
                                        else "signal" if stop.requested else "")
        if verdict == "disk full":
            trainer.stopped_by = verdict  # nothing more can be saved: training on would be lost
            break
        saving = state.step % t.save_resume_every == 0
        if saving or publish_due(trainer):  # both read the loss (a sync) and may wait for a write:
            _log(trainer, bar, window.drain())  # this step's metrics go out first
        publish_if_due(trainer, result.loss)
        if saving:
            save_resume_state(trainer)
        trainer.stopped_by = verdict
    _log(trainer, bar, window.drain())
    bar.close()


def _log(trainer: Trainer, bar: tqdm, windows: list[tuple[int, dict]]) -> None:
    for step, metrics in windows:
        trainer.tracker.log(metrics, step)
        bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['train/learning_rate']:.2e}")


def publish_if_due(trainer: Trainer, loss: torch.Tensor | float | None) -> None:
    """Publish the current step if it is step 0, a multiple of eval_every or the last step."""
    step, run = trainer.state.step, trainer.run
    if not publish_due(trainer):
        return
    trainer.state.last_loss = None if loss is None else float(loss)
    metrics = {"train_loss": trainer.state.last_loss, "learning_rate": trainer.state.last_learning_rate,
               "tokens_seen": trainer.state.tokens_seen, "epoch": trainer.stream.epoch_progress}
    sidecar = Sidecar(run_id=run.run_id, step=step, run_name=run.run_name, wandb_group=run.wandb_group,
                      base_model=trainer.config.model.name_or_path, metrics=metrics, config=to_dict(trainer.config))
    if trainer.world.distributed:  # every rank takes part in the gather; rank 0 receives and writes
        weights = distributed.full_state_dict(trainer.model, trainer.aliases)
        if trainer.world.is_main:
            trainer.publisher.publish(trainer.model, step, sidecar, metrics, weights)
    else:
        trainer.publisher.publish(trainer.model, step, sidecar, metrics)
    trainer.published.add(step)


def publish_due(trainer: Trainer) -> bool:
    step = trainer.state.step
    due = step == 0 or step % trainer.config.training.eval_every == 0 or step == trainer.total_steps
    # A step already listed (or evaluated and then deleted by retention) is not re-published.
    return due and step not in trainer.published and not distributed.from_main(
        trainer.world, lambda: is_evaluated(trainer.run.checkpoints_dir, step))


def save_resume_state(trainer: Trainer) -> None:
    trainer.state.last_loss = float(trainer.last_loss)
    trainer.resume_writer.save(trainer.state, trainer.model, trainer.optimizer, trainer.scheduler)


def finish(trainer: Trainer, config_path: str | None) -> int:
    """Save the resume state of the last step (not into a full disk), wait for both writers, report."""
    run, step, writers = trainer.run, trainer.state.step, _writers(trainer)
    trainer.publisher.wait()  # its outcome decides whether the disk can take the resume state
    disk_full = distributed.from_main(trainer.world, lambda: any(writer.disk_full for writer in writers))
    if not disk_full and trainer.last_loss is not None and step != trainer.resume_writer.requested_step:
        save_resume_state(trainer)
    for writer in writers:
        writer.close()
    trainer.tracker.finish()
    distributed.destroy(trainer.world)
    failures = [f for writer in writers for f in writer.failures]
    launcher = f"bin/train --nproc {trainer.world.size}" if trainer.world.distributed else "bin/train"
    resume_with = f"{launcher} {f'--config {config_path} ' if config_path else ''}training.run_id={run.run_id}"
    if trainer.stopped_by == "signal":
        logger.info("stopped at step %d; resume with: %s", step, resume_with)
    if failures or trainer.stopped_by == "out of GPU memory":
        lost = "; ".join(f"{f.what} of step {f.step}" for f in failures) or "nothing"
        reason = "disk full" if any(w.disk_full for w in writers) else trainer.stopped_by or "write errors"
        logger.error("stopped at step %d of %d (%s); not saved: %s; the latest resume state is step %d: fix the cause, "
                     "then resume with: %s", step, trainer.total_steps, reason, lost,
                     trainer.resume_writer.saved_step, resume_with)
        return 1
    logger.info("run %s done at step %d", run.run_id, step)
    return 0


def _writers(trainer: Trainer) -> list:
    return [trainer.publisher.writer, trainer.resume_writer.writer]
