"""Both daemons at once: trainer throughput with the eval daemon beside it, and the eval lag.

Runs the real programs as separate processes, as a user does: `python -m train_daemon` (bin/train)
on the first GPU and `python -m eval_daemon` (bin/eval) on the second, sharing only the
filesystem. Two phases on the same machine, same config, same data, same step count:

    python bench/two_daemons.py alone --model DIR --data TRAIN.jsonl --test TEST.jsonl --workdir W
    python bench/two_daemons.py both  --model DIR --data TRAIN.jsonl --test TEST.jsonl --workdir W
    python bench/two_daemons.py alone --device cpu --steps 6 --eval-every 2 --workdir W   # CPU smoke run
    python bench/two_daemons.py both  --device cpu --steps 6 --eval-every 2 --workdir W   #   (tiny model)

`alone` trains --steps steps with nothing else running; `both` starts the eval daemon first, then
the same training run, waits (up to --drain-s) until every published checkpoint has its record,
then stops the eval daemon with SIGTERM, as a user would. `both` prints the comparison with the
`alone` phase found in the same --workdir.

Trainer throughput = non-pad tokens of steps --skip+1..N / their wall time (from the trainer's
train_log.jsonl, logging every step): publishes and resume-state saves are inside that time.
Eval lag per checkpoint = the store's recorded_at minus the manifest's published_at.

The eval daemon runs with each response forced to the token length of that problem's reference
SFT response (bench/eval_full.py's ForcedLengthEngine): random weights never write `</answer>` or
EOS, so unforced every response would run to evaluation.max_tokens.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RUN_ID = "two_daemons"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["alone", "both"])
    parser.add_argument("--model", help="HF model directory (default: build the tiny test model)")
    parser.add_argument("--data", help="MATH train JSONL / directory (default: the demo problems)")
    parser.add_argument("--test", help="MATH test JSONL / directory (default: the demo problems)")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--device", default="cuda", help="cuda: trainer on cuda:0, eval daemon on cuda:1; or cpu")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of the throughput (compilation)")
    parser.add_argument("--drain-s", type=float, default=240, help="how long to wait for the last records")
    parser.add_argument("--train-timeout-s", type=float, default=400)
    parser.add_argument("--overrides", default="", help="extra key=value overrides for both daemons, space-separated")
    return parser.parse_args(argv)


def main() -> None:
    if sys.argv[1:2] == ["eval-daemon"]:  # the eval daemon process, started by the `both` phase
        run_forced_length_eval_daemon(sys.argv[2:])
        return
    args = parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    model, data, test = inputs(args, workdir)
    phase_dir = workdir / args.phase
    if phase_dir.exists():
        raise SystemExit(f"{phase_dir} exists: use a new --workdir or delete it")
    overrides = common_overrides(args, model, data, test, phase_dir)
    eval_process = start_eval_daemon(args, overrides, phase_dir, model) if args.phase == "both" else None
    started = time.time()
    train_rc = run_trainer(args, overrides, phase_dir)
    summary = {"phase": args.phase, "train_exit": train_rc, "train_wall_s": time.time() - started,
               **trainer_throughput(phase_dir, args.skip)}
    if eval_process is not None:
        drained = wait_for_records(phase_dir, args.drain_s, eval_process)
        eval_process.send_signal(signal.SIGTERM)
        summary["eval_exit"] = eval_process.wait(timeout=120)
        summary["all_recorded_before_stop"] = drained
        summary["evaluations"] = eval_lags(phase_dir)
    (phase_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print_report(workdir, args)


# ---- inputs and config ---------------------------------------------------------------------------


def inputs(args: argparse.Namespace, workdir: Path) -> tuple[str, str, str]:
    if args.model and args.data and args.test:
        return args.model, args.data, args.test
    from common.demo.data import write_demo_dataset
    from common.demo.tiny_model import build_tiny_model

    model = args.model or str(workdir / "tiny")
    if not args.model and not (workdir / "tiny" / "config.json").exists():
        build_tiny_model(workdir / "tiny")
    demo = workdir / "demo_math"
    if not demo.exists():
        write_demo_dataset(demo, train=64, test=32)
    return model, args.data or str(demo), args.test or str(demo)


def common_overrides(args: argparse.Namespace, model: str, data: str, test: str, phase_dir: Path) -> list[str]:
    results = phase_dir / "results"
    on_gpu = args.device == "cuda"
    overrides = [
        f"model.name_or_path={model}", f"data.train_source={data}", f"evaluation.test_source={test}",
        f"paths.results_dir={results}", f"training.run_id={RUN_ID}", f"training.max_steps={args.steps}",
        f"training.eval_every={args.eval_every}", "logging.log_every=1", "logging.wandb=false",
        "logging.progress_bar=false",
        f"training.device={'cuda:0' if on_gpu else 'cpu'}", f"evaluation.device={'cuda:1' if on_gpu else 'cpu'}",
    ]
    if not on_gpu:
        overrides += ["model.dtype=float32", "training.compile=false", "evaluation.max_model_len=512",
                      "evaluation.max_tokens=64", "training.warmup_steps=1"]
    return overrides + args.overrides.split()


# ---- the two processes ---------------------------------------------------------------------------


def run_trainer(args: argparse.Namespace, overrides: list[str], phase_dir: Path) -> int:
    phase_dir.mkdir(parents=True, exist_ok=True)  # the eval daemon may have made it first
    log = (phase_dir / "train.log").open("w")
    command = [sys.executable, "-m", "train_daemon", "--config", str(REPO / "config" / "sft_config.yaml"), *overrides]
    try:
        return subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              timeout=args.train_timeout_s).returncode
    except subprocess.TimeoutExpired:
        return -1


def start_eval_daemon(args: argparse.Namespace, overrides: list[str], phase_dir: Path, model: str) -> subprocess.Popen:
    (phase_dir / "results" / "checkpoints").mkdir(parents=True)
    log = (phase_dir / "eval.log").open("w")
    command = [sys.executable, str(Path(__file__).resolve()), "eval-daemon", model,
               "--config", str(REPO / "config" / "sft_config.yaml"), *overrides]
    return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def run_forced_length_eval_daemon(argv: list[str]) -> None:
    """bin/eval itself, with its engine swapped for the forced-length one (argv[0]: tokenizer dir)."""
    sys.path.insert(0, str(REPO / "bench"))
    from eval_full import ForcedLengthEngine

    import eval_daemon.__main__ as daemon
    from eval_daemon.evaluate import load_eval_set

    tokenizer_dir, argv = argv[0], argv[1:]

    def make_forced_engine(config, device):
        e = config.evaluation
        eval_set = load_eval_set(e, config.data.prompt_template)
        dtype = "float32" if device == "cpu" else config.model.dtype
        return ForcedLengthEngine(eval_set, Path(tokenizer_dir), e.max_model_len, device, dtype,
                                  e.gpu_memory_utilization, e.seed)

    daemon.make_engine = make_forced_engine
    raise SystemExit(daemon.main(argv))


def wait_for_records(phase_dir: Path, drain_s: float, eval_process: subprocess.Popen) -> bool:
    """True once every step in the manifest has its evaluated marker (written after the store commit)."""
    from common.contract import is_evaluated, read_manifest

    run_dir = phase_dir / "results" / "checkpoints" / RUN_ID
    deadline = time.monotonic() + drain_s
    while time.monotonic() < deadline and eval_process.poll() is None:
        steps = read_manifest(run_dir).steps() if (run_dir / "manifest.json").exists() else []
        if steps and all(is_evaluated(run_dir, step) for step in steps):
            return True
        time.sleep(1.0)
    return False


# ---- measurements --------------------------------------------------------------------------------


def trainer_throughput(phase_dir: Path, skip: int) -> dict:
    log = phase_dir / "results" / "runs" / RUN_ID / "train_log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    tokens, seconds, previous_seen = 0, 0.0, 0
    for row in rows:
        step_tokens = row["train/tokens_seen"] - previous_seen
        previous_seen = row["train/tokens_seen"]
        if row["train_step"] > skip:
            tokens += step_tokens
            seconds += step_tokens / row["train/tokens_per_second"]
    tokens_per_second = tokens / seconds if seconds else 0.0
    return {"steps_logged": len(rows), "measured_steps": max(0, len(rows) - skip), "tokens": tokens,
            "seconds": seconds, "tokens_per_second": tokens_per_second,
            "mfu": 6 * 1.544e9 * tokens_per_second / 989e12,
            "max_memory_used_gib": max((r.get("train_gpu/memory_used", 0) for r in rows), default=0)}


def eval_lags(phase_dir: Path) -> list[dict]:
    from common.store.schema import connect_read_only

    store = phase_dir / "results" / "results.duckdb"
    if not store.exists():
        return []
    with connect_read_only(str(store)) as con:
        rows = con.execute("""
            SELECT e.step, epoch(e.recorded_at) - epoch(c.published_at) AS lag_s, e.total_seconds,
                   e.generation_seconds, e.num_test_cases, e.status
            FROM evaluations e JOIN checkpoints c USING (run_id, step) ORDER BY e.step""").fetchall()
    return [dict(zip(["step", "lag_s", "evaluation_s", "generation_s", "problems", "status"], row)) for row in rows]


def print_report(workdir: Path, args: argparse.Namespace) -> None:
    summaries = {p: json.loads((workdir / p / "summary.json").read_text())
                 for p in ("alone", "both") if (workdir / p / "summary.json").exists()}
    print(f"\ntwo_daemons: {args.steps} steps, a checkpoint every {args.eval_every}, device {args.device}")
    for phase, s in summaries.items():
        print(f"trainer {phase:<5}: exit {s['train_exit']}, steps {args.skip + 1}-{s['steps_logged']}: "
              f"{s['tokens_per_second']:,.0f} tokens/s = {s['mfu']:.1%} MFU, wall {s['train_wall_s']:.0f} s, "
              f"max memory_used {s['max_memory_used_gib']:.1f} GiB")
    if len(summaries) == 2 and summaries["alone"]["tokens_per_second"]:
        ratio = summaries["both"]["tokens_per_second"] / summaries["alone"]["tokens_per_second"]
        print(f"trainer with the eval daemon / alone: {ratio:.3f} (target >= 0.95)")
    both = summaries.get("both")
    if both:
        print(f"eval daemon: exit {both['eval_exit']} after SIGTERM; every checkpoint recorded before the stop: "
              f"{both['all_recorded_before_stop']}")
        for e in both["evaluations"]:
            print(f"  step {e['step']:>5}: publication -> record {e['lag_s']:7.1f} s  (evaluation {e['evaluation_s']:.1f} s, "
                  f"generation {e['generation_s']:.1f} s, {e['problems']} problems, {e['status']})")


if __name__ == "__main__":
    main()
