"""bin/demo: the whole product on CPU in a few minutes, with nothing to download or configure.

Run by `bin/demo`, which execs `python -m common.demo.run "$@"`:

    bin/demo                          # set up .venv when missing, then train + evaluate the tiny demo model
    bin/demo evaluation.engine=vllm   # key=value overrides go to both daemons (on top of config/demo.yaml)
    bin/demo --rebuild                # also rebuild the embedded dataset and the tiny model

Reads top to bottom: config (config/demo.yaml + overrides, checked before anything runs) -> inputs
(the embedded dataset and a tiny Qwen2 model under results/demo/, built only when missing) -> start
`bin/train` and `bin/eval` as two separate processes, exactly as a user would -> follow their
progress (common/demo/follow.py: from their structured outputs) until training has finished and
every checkpoint in the run's manifest is recorded in the store -> stop the eval daemon with SIGTERM
(its normal shutdown) -> print the progression table (`bin/plot --summary`), write the charts
(`bin/plot`), and judge the run against the best constant answer.

Exit codes: 0 when format accuracy rose from near 0 at step 0 to a majority at the last checkpoint
and answer accuracy there beat the best constant answer by ABOVE_BASELINE; 1 when either did not,
or a daemon failed (the message names its log); 2 for a config error; 130 when interrupted. Ctrl-C
and SIGTERM stop both daemons through their own clean shutdown.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common.cli import ToolParser, add_config_arguments, fail, print_config
from common.config import Config, ConfigError, load_config
from common.contract import Layout, ManifestError, read_manifest
from common.demo.follow import Progress
from common.demo.inputs import DemoInputs, ensure_inputs
from common.store.schema import StoreError, StoreMissingError, connect_read_only

REPO = Path(__file__).resolve().parents[2]  # common/demo/ -> the repository root
DEFAULT_CONFIG = "config/demo.yaml"
POLL_S = 0.5
STORE_POLL_S = 3.0  # the store is also read after each evaluation result line
STALL_TIMEOUT_S = 600.0  # neither daemon wrote anything for this long: something hangs
# The demo has shown learning when format accuracy goes from below NEAR_ZERO to above MAJORITY, and
# answer accuracy at the last checkpoint is ABOVE_BASELINE over the best constant answer (a model
# guessing among the ~10 most common answers stays within a few points of it on 140 problems).
NEAR_ZERO, MAJORITY, ABOVE_BASELINE = 0.2, 0.5, 0.10


class DemoFailed(Exception):
    """The demo could not show what it is meant to show; the message says why and where to look."""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_config:
        return print_config("demo", args)
    logging.basicConfig(level=logging.INFO, format="[demo]  %(message)s", stream=sys.stdout)
    started = time.monotonic()
    os.chdir(REPO)  # config paths are relative to the repository root, as for bin/train and bin/eval

    # ---- config: config/demo.yaml + overrides, checked before anything is built or started
    try:
        config = load_config(args.config, args.overrides)
        check_demo_config(config, args.config)
    except ConfigError as exc:
        return fail("demo", exc)
    run_id = config.training.run_id or f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    layout = Layout.of(config)
    store, logs = layout.store, layout.root / "logs"  # logs/: the demo's own (the daemons' stdout)
    logs.mkdir(parents=True, exist_ok=True)

    # ---- inputs: the embedded dataset and the tiny model (only when missing)
    inputs = DemoInputs()
    data_dir, model_dir = ensure_inputs(config, inputs, rebuild=args.rebuild)
    say(f"data:   {data_dir} ({inputs.train_problems} train / {inputs.test_problems} test problems, common/demo/data.py)")
    say(f"model:  {model_dir} (tiny Qwen2, hidden {inputs.hidden_size}, {inputs.num_layers} layers, random weights)")
    threads = threads_per_daemon()
    say(f"engine: {config.evaluation.engine} ({engine_note(config.evaluation.engine)})")
    say(f"cores:  {threads} thread(s) per daemon (OMP_NUM_THREADS), so the two processes do not fight over cores")
    say(f"run:    {run_id}: {config.training.max_steps} steps, a checkpoint every {config.training.eval_every}; "
        f"full logs in {logs}/")

    # ---- start the two daemons as two processes; follow both until every published checkpoint is
    # ---- evaluated; then stop the eval daemon (SIGTERM: its normal shutdown)
    # Progress bars off: the daemons write to log files, and the demo prints their progress lines.
    quiet = ["--config", args.config, "logging.progress_bar=false"]
    progress = Progress(layout, logs, run_id, config.training.max_steps)
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM takes Ctrl-C's path
    daemons: list[subprocess.Popen] = []
    try:
        train = start(["bin/train", *quiet, *args.overrides, f"training.run_id={run_id}"], progress.logs["train"],
                      threads)
        daemons.append(train)
        evaluator = start(["bin/eval", *quiet, *args.overrides], progress.logs["eval"], threads)
        daemons.append(evaluator)
        rows = follow(config, run_id, train, evaluator, progress)
        stop(evaluator, "eval")
        progress.print_new()  # the last result line may follow the store commit that ended follow()
        if evaluator.returncode != 0:  # every result is already in the store; the shutdown itself failed
            say(f"WARNING: bin/eval exited with code {evaluator.returncode} on SIGTERM; see {logs}/eval-{run_id}.log")
    except KeyboardInterrupt:
        say("interrupted: stopping both daemons")
        unfinished = bool(daemons) and daemons[0].poll() is None
        stop_all(daemons)
        if unfinished:
            say(f"continue the training with: bin/train --config {args.config} training.run_id={run_id}")
        return 130
    except DemoFailed as exc:
        stop_all(daemons)
        return fail("demo", exc, 1)
    finally:
        signal.signal(signal.SIGTERM, previous_term)

    # ---- report: the progression table and the charts, from the store; then the verdict
    last = max(rows)
    try:
        run_tool(["bin/plot", "--summary", "--db", str(store), "--run", run_id])
        run_tool(["bin/plot", "--db", str(store), "--run", run_id, "--out", str(layout.root / "plots")])
        verdict = check_learning(rows, constant_baseline(store, run_id, last))
    except DemoFailed as exc:
        return fail("demo", f"{exc}; see {logs}/", 1)
    minutes, seconds = divmod(int(time.monotonic() - started), 60)
    say(f"{verdict}; finished in {minutes} min {seconds} s")
    db = shown_path(store)
    say("next, on the demo's store (the tools' default is results/results.duckdb, the GPU workflow's):")
    for command in (f"bin/query --db {db} progress", f"bin/plot --db {db} --summary", f"bin/report --db {db}"):
        say(f"  {command}")
    return 0


def shown_path(path: Path) -> str:
    """path relative to the repository when inside it (the demo runs there): shorter to copy."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:  # outside the repository (a test's temporary directory)
        return str(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ToolParser("demo", description=__doc__.splitlines()[0])
    add_config_arguments(parser, example="training.max_steps=20")
    parser.set_defaults(config=DEFAULT_CONFIG)
    parser.add_argument("--rebuild", action="store_true", help="rebuild the demo dataset and model")
    return parser.parse_intermixed_args(argv)


def say(text: str) -> None:
    print(f"[demo]  {text}", flush=True)


# ---- config --------------------------------------------------------------------------------------


def engine_note(engine: str) -> str:
    """Why this engine, for the demo's header. config/demo.yaml picks transformers: for the tiny
    model it generates as fast as vLLM's CPU build, which first spends ~20 s starting its engine."""
    if engine == "vllm":
        return "vLLM, the GPU workflow's engine; its start-up takes ~20 s here"
    if importlib.util.find_spec("vllm") is None:
        return "transformers; vLLM is not installed"
    return "transformers, the quickest to start for the tiny model; bin/demo evaluation.engine=vllm for vLLM"


def check_demo_config(config: Config, source: str) -> None:
    """What the demo relies on beyond common.config.validate: the run must end."""
    if config.training.max_steps <= 0:
        raise ConfigError(f"{source}: training.max_steps must be > 0 for the demo (it waits for the end of training)")


# ---- the two daemons -----------------------------------------------------------------------------


def threads_per_daemon() -> int:
    """Half the usable cores each (at least 1), unless OMP_NUM_THREADS is set already.

    Two torch processes that each spread over every core fight for them: on 2 cores the demo took
    148 s with the transformers engine (generation 22-35 s per checkpoint while the trainer ran,
    1.5 s alone) and 55 s with vLLM; with one thread each, 20 s and 40 s (same results)."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    return max(1, len(os.sched_getaffinity(0)) // 2)


def start(command: list[str], log_path: Path, threads: int) -> subprocess.Popen:
    say(f"$ {' '.join(command)}   (log: {log_path})")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log_path, "w") as log:
        # Its own session: Ctrl-C reaches the demo only, which stops each daemon with SIGTERM.
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(process: subprocess.Popen, name: str, timeout_s: float = 60.0) -> None:
    """SIGTERM (the daemon's clean shutdown path), then SIGKILL if it does not exit in time."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        say(f"bin/{name} did not stop within {timeout_s:.0f} s of SIGTERM; killing it")
        process.kill()
        process.wait()


def stop_all(daemons: list[subprocess.Popen]) -> None:
    for process, name in zip(daemons, ("train", "eval")):
        stop(process, name)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def follow(config: Config, run_id: str, train: subprocess.Popen, evaluator: subprocess.Popen,
           progress: Progress) -> dict[int, tuple]:
    """Print progress until training finished and every step in the manifest has a store record;
    returns {step: (status, format_accuracy, accuracy, error)}. Raises DemoFailed when a daemon dies."""
    run_dir = Layout.of(config).run_checkpoints(run_id)
    last_activity = last_store_read = time.monotonic()
    trained = False
    while True:
        active, new_result = progress.print_new()
        if active:
            last_activity = time.monotonic()
        if not trained and train.poll() is not None:
            if train.returncode != 0:
                raise DemoFailed(f"bin/train exited with code {train.returncode}: {last_line(progress.logs['train'])} "
                                 f"(full log: {progress.logs['train']})")
            trained = True
        if evaluator.poll() is not None:
            hint = "; bin/demo evaluation.engine=hf runs without vLLM" if config.evaluation.engine == "vllm" else ""
            raise DemoFailed(f"bin/eval exited with code {evaluator.returncode} before evaluating every checkpoint: "
                             f"{last_line(progress.logs['eval'])} (full log: {progress.logs['eval']}){hint}")
        if trained and (new_result or time.monotonic() - last_store_read > STORE_POLL_S):
            last_store_read = time.monotonic()
            rows = recorded(Layout.of(config).store, run_id)
            steps = published_steps(run_dir)
            if steps and set(steps) <= set(rows):
                return {step: rows[step] for step in steps}
        if time.monotonic() - last_activity > STALL_TIMEOUT_S:
            raise DemoFailed(f"no progress from either daemon for {STALL_TIMEOUT_S:.0f} s; "
                             f"see {progress.logs['train'].parent}/")
        time.sleep(POLL_S)


def last_line(log_path: Path) -> str:
    """The last line a daemon wrote: where its one-line error is."""
    lines = log_path.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "(no output)"


def published_steps(run_dir: Path) -> list[int]:
    try:
        return read_manifest(run_dir).steps()
    except ManifestError as exc:
        raise DemoFailed(f"the trainer finished but its manifest is unreadable: {exc}") from exc


def recorded(store: Path, run_id: str) -> dict[int, tuple]:
    """{step: (status, format_accuracy, accuracy, error)} of the run's evaluations in the store."""
    try:
        with connect_read_only(store) as con:
            found = con.execute("SELECT step, status, format_accuracy, accuracy, error FROM evaluations "
                                "WHERE run_id = ? ORDER BY step", [run_id]).fetchall()
    except StoreMissingError:  # nothing evaluated yet
        return {}
    except StoreError as exc:  # busy past the retry budget: the next poll tries again
        say(f"store not readable yet ({exc}); retrying")
        return {}
    return {step: rest for step, *rest in found}


def run_tool(command: list[str]) -> None:
    say(f"$ {' '.join(command)}")
    result = subprocess.run(command, cwd=REPO)
    if result.returncode != 0:
        raise DemoFailed(f"{command[0]} exited with code {result.returncode}")


# ---- the verdict ---------------------------------------------------------------------------------


def constant_baseline(store: Path, run_id: str, step: int) -> tuple[str, float]:
    """The best constant answer on the evaluated problems: (the most common ground truth, its share).
    A model that always gives it reaches that accuracy without learning anything."""
    try:
        with connect_read_only(store) as con:
            answer, share = con.execute(
                "SELECT ground_truth, count(*) / sum(count(*)) OVER () FROM samples WHERE run_id = ? AND step = ? "
                "GROUP BY ground_truth ORDER BY 2 DESC, 1 LIMIT 1", [run_id, step]).fetchone()
    except (StoreError, TypeError) as exc:  # busy past the retry budget, or no sample rows (TypeError)
        raise DemoFailed(f"could not read the ground truths of step {step} from {store} ({exc})") from exc
    return answer, share


def check_learning(rows: dict[int, tuple], baseline: tuple[str, float]) -> str:
    """One line saying what the demo showed; DemoFailed when format accuracy did not rise or answer
    accuracy did not beat the best constant answer by ABOVE_BASELINE."""
    failed = {step: row[3] for step, row in rows.items() if row[0] != "ok"}
    if failed:
        step, error = min(failed.items())
        raise DemoFailed(f"the evaluation of step {step} failed ({error})")
    if len(rows) < 2:
        raise DemoFailed(f"only {len(rows)} checkpoint(s) evaluated; the demo needs the first and the last")
    first, last = min(rows), max(rows)
    (_, first_format, first_accuracy, _), (_, last_format, last_accuracy, _) = rows[first], rows[last]
    answer, share = baseline
    formats = f"format accuracy {first_format:.0%} at step {first} -> {last_format:.0%} at step {last}"
    answers = (f"answer accuracy {first_accuracy:.0%} -> {last_accuracy:.0%}, against {share:.0%} for always "
               f"answering {answer!r} (the best constant answer)")
    fix = "Check training.learning_rate and training.max_steps in the demo config"
    if first_format >= NEAR_ZERO or last_format <= MAJORITY:
        raise DemoFailed(f"the model did not learn the answer format: {formats}; expected below {NEAR_ZERO:.0%} at "
                         f"the first checkpoint and above {MAJORITY:.0%} at the last ({answers}). {fix}")
    if last_accuracy < share + ABOVE_BASELINE:
        raise DemoFailed(f"the model learned the format ({formats}) but not the answers: {answers}; expected at "
                         f"least {ABOVE_BASELINE:.0%} above it. {fix}")
    return f"the model learned the answer format ({formats}) and answers: {answers}"


if __name__ == "__main__":
    sys.exit(main())
