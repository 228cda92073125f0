"""bin/train end to end: a whole run as a user runs it (publishes and resume saves included) against
its own steady state, measured in the same run.

Starts `python -m train_daemon` (what bin/train execs) at the default config with --steps optimizer
steps, while a thread plays the eval daemon's part for retention (marks each published step
evaluated, so `training.keep_last_checkpoints` can delete old checkpoints and the disk holds out).
Then reads the run's train_log.jsonl: per step, tokens and seconds (the trainer measures each step
between two reads of the GPU's results, so the steps add up to the loop's wall time).

- steady state: the median of the per-step tokens/s;
- end to end (loop): all tokens over the loop's seconds, from before step 1 to after the last step;
- end to end (process): all tokens over the process's wall time (start-up and the final writes too).

With --nproc N (bin/train --nproc N) the logged tokens are those of all ranks; the per-GPU numbers
divide by N, and MFU is per GPU.

    python bench/train_end_to_end.py --model /tmp/rq --data .dev/bench/math_train.jsonl --steps 300 \\
        --workdir /tmp/e2e --json $OUT/train_end_to_end.json                                 # GPU
    python bench/train_end_to_end.py --model /tmp/rq --nproc 4 --steps 60 --workdir /tmp/e2e \\
        training.gradient_accumulation_steps=8                 # 4 GPUs (torchrun + FSDP2), 2 micro-batches each
    python bench/train_end_to_end.py --tiny --device cpu --steps 12 --workdir /tmp/e2e \\
        training.batch_size=4 training.eval_every=4 training.save_resume_every=4             # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.contract import Marker, mark_evaluated, read_manifest  # noqa: E402

PARAMS, PEAK_FLOPS = 1.544e9, 989e12  # as bench/train_throughput.py
RUN_ID = "e2e"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model directory (bench/make_random_model.py)")
    parser.add_argument("--tiny", action="store_true", help="build the tiny test model (CPU smoke run)")
    parser.add_argument("--data", default=".dev/bench/math_train.jsonl")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--nproc", type=int, default=1, help="GPUs (bin/train --nproc: torchrun + FSDP2)")
    parser.add_argument("--params", type=float, default=PARAMS, help="model parameters, for MFU (7b: 7.616e9)")
    parser.add_argument("--keep-last", type=int, default=2, help="training.keep_last_checkpoints (disk space)")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("overrides", nargs="*", help="more config overrides (section.key=value)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    workdir = Path(args.workdir)
    model = args.model or _tiny_model(workdir)
    output = workdir / "results"
    command = [sys.executable, "-m", "train_daemon", "--nproc", str(args.nproc),
               "--config", str(REPO / "config" / "sft_config.yaml"),
               f"model.name_or_path={model}", f"data.train_source={args.data}", f"paths.results_dir={output}",
               f"training.run_id={RUN_ID}", f"training.max_steps={args.steps}", f"training.device={args.device}",
               f"training.keep_last_checkpoints={args.keep_last}", "logging.wandb=false", "logging.progress_bar=false",
               *args.overrides]
    stop = threading.Event()
    marker = threading.Thread(target=_mark_published, args=(output / "checkpoints" / RUN_ID, stop), daemon=True)
    marker.start()
    start = time.monotonic()
    with open(workdir / "bin_train.stderr", "w") as stderr:
        code = subprocess.call(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr,
                               env={**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"})
    wall = time.monotonic() - start
    stop.set()
    marker.join()
    rows = [json.loads(line) for line in (output / "runs" / RUN_ID / "train_log.jsonl").read_text().splitlines()]
    result = summarise(rows, wall, code, args.nproc, args.params)
    log = (workdir / "bin_train.stderr").read_text().splitlines()
    result["trainer_log"] = [line[:220] for line in log if any(word in line for word in (
        "resume state", "published", "waited", "ERROR", "starting from", "done at", "pinned"))]
    for line in result.pop("trainer_log"):
        print(line)
    print(json.dumps({k: v for k, v in result.items() if k != "per_step"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


def summarise(rows: list[dict], wall: float, code: int, nproc: int = 1, params: float = PARAMS) -> dict:
    tokens = [r["train/tokens_per_second"] for r in rows]  # per step (log_every 1)
    seconds, step_tokens = [], []
    previous = 0
    for r in rows:
        step_tokens.append(r["train/tokens_seen"] - previous)
        previous = r["train/tokens_seen"]
        seconds.append(step_tokens[-1] / r["train/tokens_per_second"])
    steady = statistics.median(tokens)
    loop = sum(step_tokens) / sum(seconds)
    slowest = sorted(range(len(rows)), key=lambda i: seconds[i], reverse=True)[:12]
    after_first = sum(step_tokens[3:]) / sum(seconds[3:]) if len(rows) > 3 else float("nan")
    return {
        "exit_code": code, "steps": len(rows), "tokens": sum(step_tokens),
        "gpus": nproc, "steady_tokens_per_second": steady, "steady_tokens_per_second_per_gpu": steady / nproc,
        "steady_mfu": 6 * params * steady / nproc / PEAK_FLOPS,  # per GPU
        "loop_seconds": sum(seconds), "loop_tokens_per_second": loop, "loop_ratio": loop / steady,
        "loop_ratio_after_step_3": after_first / steady,
        "process_seconds": wall, "process_tokens_per_second": sum(step_tokens) / wall,
        "process_ratio": sum(step_tokens) / wall / steady,
        "seconds_lost_vs_steady": {f"step {rows[i]['train_step']}": round(seconds[i] - step_tokens[i] / steady, 2)
                                   for i in slowest},
        "per_step": [{"step": r["train_step"], "tokens": n, "seconds": round(s, 4)}
                     for r, n, s in zip(rows, step_tokens, seconds)],
    }


def _mark_published(run_dir: Path, stop: threading.Event) -> None:
    """The eval daemon's part in retention: every published step gets an evaluated marker."""
    marked = set()
    while not stop.wait(0.5):
        if not (run_dir / "manifest.json").exists():
            continue
        try:
            steps = read_manifest(run_dir).steps()
        except ValueError:  # being replaced right now: next round
            continue
        for step in set(steps) - marked:
            mark_evaluated(run_dir, Marker(step=step, eval_key="bench", status="ok", worker_id="bench"))
            marked.add(step)


def _tiny_model(workdir: Path) -> str:
    from common.demo.tiny_model import build_tiny_model

    return str(build_tiny_model(workdir / "tiny_model"))


if __name__ == "__main__":
    main()
