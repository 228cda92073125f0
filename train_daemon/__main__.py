"""The trainer daemon: SFT on MATH, publishing a checkpoint every training.eval_every steps.

    bin/train --config config/sft_config.yaml [section.key=value ...]
    bin/train --config config/sft_config.yaml training.run_id=<id>     # resume that run

Reads top to bottom: parse and validate -> load -> resume -> train loop -> clean up. Start-up
problems (config, dataset, model path, resume state) exit 2 with one line on stderr. SIGTERM and
Ctrl-C finish the current step, save resume state and wait for the in-flight publish (exit 0).
Filesystem contract: common/contract.py; run directory layout: train_daemon/run.py.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch
from tqdm import tqdm

from common import cli
from common.config import Config, ConfigError, load_config, to_dict
from common.contract import Sidecar, is_evaluated, load_or_new_manifest, remove_stale_temp_dirs
from common.data import DatasetError
from common.tracking import start_tracking
from train_daemon.batching import ExampleStream, build_micro_batches, tokenize_pairs
from train_daemon.loading import check_model_source, choose_device, load_model, load_tokenizer, load_training_pairs
from train_daemon.metrics import LogWindow
from train_daemon.publisher import CheckpointPublisher
from train_daemon.resume import (ResumeError, ResumeWriter, TrainerState, load_resume_state, remove_stale_resume_temps,
                                 trim_log)
from train_daemon.run import Run, resolve_run, write_run_files
from train_daemon.schedule import make_scheduler, total_optimizer_steps
from train_daemon.shutdown import StopRequest
from train_daemon.step import make_optimizer, train_step

logger = logging.getLogger("train_daemon")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_config:
        return cli.print_config("train", args)
    cli.setup_logging()

    try:
        # ---- parse and validate (nothing heavy is touched before this passes)
        config = load_config(args.config, args.overrides)
        check_model_source(config.model)
        run = resolve_run(config)
        t = config.training

        # ---- load: data, tokenizer, model
        pairs = load_training_pairs(config.data)
        tokenizer = load_tokenizer(config.model)
        examples = tokenize_pairs(pairs, tokenizer, config.model.max_seq_length)
        setup = choose_device(config)
        model = load_model(config, setup.device)
        examples_per_step = t.batch_size * t.gradient_accumulation_steps
        total_steps = total_optimizer_steps(t.max_steps, t.epochs, len(examples), examples_per_step)
        optimizer = make_optimizer(model, t.learning_rate, (t.adam_beta1, t.adam_beta2), t.weight_decay, setup.device)
        scheduler = make_scheduler(optimizer, t.warmup_steps, total_steps, t.min_lr_ratio)
    except (ConfigError, DatasetError) as exc:
        return cli.fail("train", exc)

    # ---- resume (or start fresh): crash leftovers go first
    write_run_files(run, config)
    if run.checkpoints_dir.exists():
        remove_stale_temp_dirs(run.checkpoints_dir)
    remove_stale_resume_temps(run.resume_dir)
    publisher = CheckpointPublisher(run.checkpoints_dir, run.run_id, model, tokenizer, setup.save_dtype,
                                    t.keep_last_checkpoints)
    done_steps = set(load_or_new_manifest(run.checkpoints_dir, run.run_id).steps())
    state, stream = TrainerState(), ExampleStream(len(examples), t.seed)

    def publish_if_due(loss) -> None:
        step = state.step
        due = step == 0 or step % t.eval_every == 0 or step == total_steps
        # A step already listed (or evaluated and then deleted by retention) is not re-published.
        if not due or step in done_steps or is_evaluated(run.checkpoints_dir, step):
            return
        state.last_loss = None if loss is None else float(loss)
        metrics = {"train_loss": state.last_loss, "learning_rate": state.last_learning_rate,
                   "tokens_seen": state.tokens_seen, "epoch": stream.epoch_progress}
        publisher.publish(model, step, _sidecar(config, run, step, metrics), metrics)
        done_steps.add(step)

    # Step 0 is the base model, still in memory here even when resuming (a crash may have cut its
    # publish short); the snapshot is taken before the resume state overwrites the weights.
    publish_if_due(None)
    try:
        resumed = load_resume_state(run.resume_dir, model, optimizer, scheduler, setup.device)
    except ResumeError as exc:
        publisher.wait()
        return cli.fail("train", exc)
    if resumed is not None:
        state, stream = resumed, ExampleStream(len(examples), t.seed, resumed.data_epoch, resumed.data_index)
        publish_if_due(state.last_loss)  # the resumed step, if a crash cut its publish short
    trim_log(run.log_path, state.step)  # steps after the resume point are redone, not duplicated
    logger.info("run %s: %s from step %d of %d; %d examples, %d per step; device %s; checkpoints in %s",
                run.run_id, "resuming" if resumed else "starting", state.step, total_steps, len(examples),
                examples_per_step, setup.device, run.checkpoints_dir)
    if t.warmup_steps >= total_steps:
        logger.warning("training.warmup_steps=%d >= %d total steps: the learning rate never reaches its peak",
                       t.warmup_steps, total_steps)
    tracker = start_tracking(config, run.run_name, "train", run.log_path)

    stop = StopRequest()
    stop.install()
    window = LogWindow(setup.device)
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", file=sys.stderr,
               dynamic_ncols=True, disable=not config.logging.progress_bar)
    resume_writer = ResumeWriter(run.resume_dir, saved_step=state.step)
    out_of_memory = False

    # ---- train
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    while state.step < total_steps and not stop.requested:
        micro_batches = build_micro_batches(examples, stream.take(examples_per_step), t.batch_size, t.packing, pad_id,
                                            t.max_tokens_per_micro_batch)
        try:
            result = train_step(model, micro_batches, optimizer, scheduler, t.max_grad_norm, setup.device,
                                setup.autocast_dtype)
        except torch.OutOfMemoryError:
            logger.error("out of GPU memory at step %d; lower training.max_tokens_per_micro_batch (same effective "
                         "batch) or set training.gradient_checkpointing=true, then resume", state.step + 1)
            out_of_memory = True
            break
        state.step += 1
        state.tokens_seen += result.num_tokens
        state.data_epoch, state.data_index = stream.epoch, stream.index
        state.last_learning_rate = result.learning_rate
        window.add(result)
        bar.update(1)

        if state.step % config.logging.log_every == 0 or state.step == total_steps:
            metrics = window.flush(stream.epoch_progress, state.tokens_seen)
            tracker.log(metrics, state.step)
            bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['train/learning_rate']:.2e}")

        # result.loss stays on the device; it is read only when a checkpoint or resume state needs it.
        publish_if_due(result.loss)
        if state.step % t.save_resume_every == 0:
            state.last_loss = float(result.loss)
            resume_writer.save(state, model, optimizer, scheduler)

    # ---- clean up: resume state, the in-flight publish, trackers
    bar.close()
    if state.step != resume_writer.requested_step:
        state.last_loss = float(result.loss)
        resume_writer.save(state, model, optimizer, scheduler)
    resume_failed = not resume_writer.wait()
    publisher.wait()
    tracker.finish()
    stop.restore()
    if stop.requested:
        logger.info("stopped at step %d; resume with: bin/train %s training.run_id=%s", state.step,
                    f"--config {args.config}" if args.config else "", run.run_id)
    final_lost = state.step == total_steps and total_steps in publisher.failed_steps
    if final_lost or resume_failed or out_of_memory:
        problem = ("out of GPU memory" if out_of_memory else
                   "the final checkpoint was not published" if final_lost else "resume state not saved")
        logger.error("stopped with errors (%s); fix them and run again with training.run_id=%s", problem, run.run_id)
        return 1
    logger.info("run %s done at step %d", run.run_id, state.step)
    return 0


EXAMPLES = """examples:
  bin/train --config config/sft_config.yaml data.train_source=/data/MATH
  bin/train --config config/sft_config.yaml training.max_steps=200 training.eval_every=20
  bin/train --config config/sft_config.yaml --print-config      # the resolved config, then exit

resume: after a crash, Ctrl-C or kill -9, run the same command with training.run_id=<id> (the id is
logged at start, "run <id>: starting ...", and names results/runs/<id>/): weights, optimizer,
scheduler, RNG and data position continue from the last saved step (training.save_resume_every).

""" + cli.CONFIG_HELP


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.ToolParser("train", description=__doc__.splitlines()[0], epilog=EXAMPLES)
    cli.add_config_arguments(parser, example="training.learning_rate=1e-5")
    return parser.parse_intermixed_args(argv)  # overrides may come before or after the options


def _sidecar(config: Config, run: Run, step: int, metrics: dict) -> Sidecar:
    """checkpoint.json: what the eval daemon and the analysis need to know about a checkpoint."""
    return Sidecar(run_id=run.run_id, step=step, run_name=run.run_name, wandb_group=run.wandb_group,
                   base_model=config.model.name_or_path, metrics=metrics, config=to_dict(config))


if __name__ == "__main__":
    sys.exit(main())
