"""Both daemons on ONE GPU: the trainer and an eval fleet of N workers sharing the card, and the lag
of every checkpoint from its publication to its first record and to its full evaluation.

The real programs as separate processes, sharing only the filesystem: `python -m train_daemon`
(bin/train) and N eval workers (`python -m eval_daemon`, bin/eval, the "N separate invocations" way
of a fleet: evaluation.worker_id=w<i>), all on --device. The eval workers run with each response
forced to the token length of the problem's reference SFT response (bench/eval_full.py's
ForcedLengthEngine; random weights would run every response to max_tokens), with schedule
--schedule (keep_up by default: quick numbers on a stratified subset while behind, full ones
back-filled). After training the fleet gets up to --drain-s to finish every full evaluation, then
SIGTERM, as a user would stop it.

    python bench/one_gpu_fleet.py --model DIR --data TRAIN.jsonl --test TEST.jsonl --workdir W --steps 300 --workers 2
    python bench/one_gpu_fleet.py --device cpu --steps 6 --eval-every 2 --workers 2 --workdir W   # CPU smoke run

Printed: the trainer's tokens/s (and the ratio to `bench/two_daemons.py alone` when its summary is
in the same --workdir), then one line per checkpoint: published at, lag to its first record and to
its full record, which worker and eval set each came from; last the targets of issue 16: every
checkpoint with a record within two publish intervals, every checkpoint with a full evaluation.
Everything also goes to <workdir>/fleet/summary.json.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from two_daemons import (  # noqa: E402  (bench/ is not a package)
    RUN_ID,
    common_overrides,
    inputs,
    run_trainer,
    trainer_throughput,
)

PHASE = "fleet"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model directory (default: build the tiny test model)")
    parser.add_argument("--data", help="MATH train JSONL / directory (default: the demo problems)")
    parser.add_argument("--test", help="MATH test JSONL / directory (default: the demo problems)")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--device", default="cuda:0", help="the one device of the trainer and every eval worker")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--schedule", default="keep_up", choices=["keep_up", "latest", "in_order"])
    parser.add_argument("--keep-up-subset", type=int, default=1000)
    parser.add_argument("--eval-memory", type=float, default=0.35,
                        help="GPU memory share of all eval workers together (split evenly)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of the throughput (compilation)")
    parser.add_argument("--drain-s", type=float, default=600, help="how long to wait for the last full records")
    parser.add_argument("--train-timeout-s", type=float, default=1800)
    parser.add_argument("--overrides", default="", help="extra key=value overrides for both daemons, space-separated")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    model, data, test = inputs(argparse.Namespace(model=args.model, data=args.data, test=args.test), workdir)
    phase_dir = workdir / PHASE
    if phase_dir.exists():
        raise SystemExit(f"{phase_dir} exists: use a new --workdir or delete it")
    overrides = fleet_overrides(args, model, data, test, phase_dir)
    workers = [start_worker(i, overrides, phase_dir, model) for i in range(args.workers)]
    started = time.time()
    train_rc = run_trainer(args, overrides, phase_dir)
    summary = {"phase": PHASE, "device": args.device, "workers": args.workers, "schedule": args.schedule,
               "train_exit": train_rc, "train_wall_s": time.time() - started, **trainer_throughput(phase_dir, args.skip)}
    summary["all_full_before_stop"] = wait_for_full_records(phase_dir, args.drain_s, workers)
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    summary["eval_exits"] = [worker.wait(timeout=120) for worker in workers]
    summary["checkpoints"] = checkpoint_lags(phase_dir)
    (phase_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print_report(workdir, args, summary)


def fleet_overrides(args: argparse.Namespace, model: str, data: str, test: str, phase_dir: Path) -> list[str]:
    on_cpu = args.device == "cpu"
    base = common_overrides(argparse.Namespace(device="cpu" if on_cpu else "cuda", steps=args.steps,
                                               eval_every=args.eval_every, overrides=""), model, data, test, phase_dir)
    return [*base, f"training.device={args.device}", f"evaluation.device={args.device}",
            f"evaluation.schedule={args.schedule}", f"evaluation.keep_up_subset={args.keep_up_subset}",
            f"evaluation.gpu_memory_utilization={args.eval_memory / args.workers:.3f}",
            "evaluation.reconcile_interval_s=5", *args.overrides.split()]


def start_worker(index: int, overrides: list[str], phase_dir: Path, model: str) -> subprocess.Popen:
    """One eval worker: bin/eval with the forced-length engine (bench/two_daemons.py eval-daemon)."""
    (phase_dir / "results" / "checkpoints").mkdir(parents=True, exist_ok=True)
    log = (phase_dir / f"eval-w{index}.log").open("w")
    command = [sys.executable, str(REPO / "bench" / "two_daemons.py"), "eval-daemon", model,
               "--config", str(REPO / "config" / "sft_config.yaml"), *overrides, f"evaluation.worker_id=w{index}"]
    return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _store_rows(phase_dir: Path) -> list[dict]:
    from common.store.schema import StoreMissingError, connect_read_only

    names = ["step", "eval_set", "status", "worker_id", "published", "recorded", "evaluation_s", "problems"]
    try:
        with connect_read_only(phase_dir / "results" / "results.duckdb") as con:
            rows = con.execute("""
                SELECT e.step, e.eval_set, e.status, e.worker_id, epoch(c.published_at), epoch(e.recorded_at),
                       e.total_seconds, e.num_test_cases
                FROM evaluations e JOIN checkpoints c USING (run_id, step)
                WHERE e.run_id = ? ORDER BY e.recorded_at""", [RUN_ID]).fetchall()
    except StoreMissingError:
        return []
    return [dict(zip(names, row)) for row in rows]


def wait_for_full_records(phase_dir: Path, drain_s: float, workers: list[subprocess.Popen]) -> bool:
    """True once every step in the manifest has a full (not subset) record in the store."""
    from common.contract import read_manifest
    from common.store.writer import is_stratified_subset

    run_dir = phase_dir / "results" / "checkpoints" / RUN_ID
    deadline = time.monotonic() + drain_s
    while time.monotonic() < deadline and any(w.poll() is None for w in workers):
        steps = set(read_manifest(run_dir).steps()) if (run_dir / "manifest.json").exists() else set()
        full = {r["step"] for r in _store_rows(phase_dir) if not is_stratified_subset(r["eval_set"])}
        if steps and steps <= full:
            return True
        time.sleep(2.0)
    return False


def checkpoint_lags(phase_dir: Path) -> list[dict]:
    """Per checkpoint: publication -> first record (any eval set) and -> full record, in seconds."""
    from common.store.writer import is_stratified_subset

    by_step: dict[int, list[dict]] = {}
    for row in _store_rows(phase_dir):
        by_step.setdefault(row["step"], []).append(row)
    lags = []
    for step, rows in sorted(by_step.items()):
        first = rows[0]
        full = next((r for r in rows if not is_stratified_subset(r["eval_set"])), None)
        lags.append({"step": step, "published": first["published"], "first_record_s": first["recorded"] - first["published"],
                     "first_eval_set": first["eval_set"], "first_worker": first["worker_id"],
                     "full_record_s": full["recorded"] - full["published"] if full else None,
                     "full_worker": full["worker_id"] if full else None,
                     "full_evaluation_s": full["evaluation_s"] if full else None, "problems": full["problems"] if full else None,
                     "status": [r["status"] for r in rows]})
    return lags


def print_report(workdir: Path, args: argparse.Namespace, s: dict) -> None:
    print(f"\none_gpu_fleet: {args.steps} steps, a checkpoint every {args.eval_every}, trainer + {args.workers} eval "
          f"worker(s) on {args.device}, schedule {args.schedule}")
    print(f"trainer: exit {s['train_exit']}, steps {args.skip + 1}-{s['steps_logged']}: {s['tokens_per_second']:,.0f} "
          f"tokens/s, wall {s['train_wall_s']:.0f} s")
    alone = workdir / "alone" / "summary.json"
    if alone.exists() and json.loads(alone.read_text())["tokens_per_second"]:
        ratio = s["tokens_per_second"] / json.loads(alone.read_text())["tokens_per_second"]
        print(f"trainer with the fleet / alone (bench/two_daemons.py alone): {ratio:.3f}")
    print(f"eval workers: exits {s['eval_exits']} after SIGTERM; every full evaluation before the stop: "
          f"{s['all_full_before_stop']}")
    checkpoints = s["checkpoints"]
    published = [c["published"] for c in checkpoints]
    interval = statistics.median(b - a for a, b in zip(published, published[1:])) if len(published) > 1 else None
    t0 = published[0] if published else 0.0
    for c in checkpoints:
        full = f"{c['full_record_s']:7.1f} s ({c['full_worker']}, evaluation {c['full_evaluation_s']:.1f} s)" \
            if c["full_record_s"] is not None else "   none"
        print(f"  step {c['step']:>5}: published at {c['published'] - t0:7.1f} s; first record {c['first_record_s']:7.1f} s "
              f"({c['first_eval_set']}, {c['first_worker']}); full record {full}")
    if interval:
        within = sum(c["first_record_s"] <= 2 * interval for c in checkpoints)
        print(f"publish interval (median) {interval:.1f} s: {within}/{len(checkpoints)} checkpoints with a record within "
              f"two intervals; {sum(c['full_record_s'] is not None for c in checkpoints)}/{len(checkpoints)} with a full "
              f"evaluation")


if __name__ == "__main__":
    main()
