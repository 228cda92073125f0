"""Writing one finished evaluation: per-example log, summaries, the DuckDB commit, the marker, W&B.

Order, so that a crash at any point leaves nothing half-written and nothing recorded twice:
1. the eval log files, each written to a temporary name and renamed into place (readers never see
   half a file), under names that say they are not committed yet:
   results/eval_logs/eval_step_<N>_<ts>.<worker>.uncommitted.jsonl          one line per example
   results/eval_logs/summary_eval_step_<N>_<ts>.<worker>.uncommitted.json   eval_step, counts, accuracy, ..., timings
2. the store commit (common/store/writer.py record_evaluation: one transaction): the point of truth. A crash
   before it means the checkpoint is evaluated again on restart; the start-up (eval_daemon/startup.py)
   deletes the uncommitted files of a dead attempt.
3. the eval log files renamed to their committed names (eval_step_<N>_<ts>.jsonl,
   summary_eval_step_<N>_<ts>.json) and the analysis files written:
   results/analysis/summary_step_<N>.json              categorization, metrics, format_failure_analysis
   results/analysis/categories_step_<N>.json           the problems in each category
4. the marker (common/contract.py mark_evaluated) that lets the trainer's retention delete the step.
5. W&B / local metrics (best effort: a failure there never loses the evaluation), then the row's tracked_at.
A crash after 2 and before 5 is completed by the start-up reconcile (eval_daemon/startup.py):
renames, marker and metrics, exactly once.

N is the checkpoint's training step. The analysis files are per step: two runs evaluated into the
same results/ directory overwrite each other's (the store and the eval_logs keep both).
Used by `bin/eval` (eval_daemon/__main__.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

from common.durable import atomic_write_json, atomic_write_text, fsync_dir
from common.grading import CATEGORIES, FORMAT_FAILURE_TYPES

logger = logging.getLogger(__name__)

SUMMARY_KEYS = ("num_test_cases", "num_correct", "num_format_correct", "num_wrong_answer", "num_format_failure",
                "accuracy", "format_accuracy", "avg_response_length", "avg_response_length_correct",
                "avg_response_length_incorrect", "avg_token_entropy", "entropy_method", "entropy_sample_size",
                "samples_per_problem")


def file_timestamp() -> str:
    """UTC, sortable, safe in file names: 20261126T051502Z."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


UNCOMMITTED = ".uncommitted"


def write_eval_files(logs_dir: Path, step: int, stamp: str, worker_id: str, header: dict, samples: list[dict],
                     metrics: dict, timings: dict) -> list[Path]:
    """Step 1: the eval log and its summary, atomically, under uncommitted names; returns their paths."""
    logs_dir = Path(logs_dir)
    logs_dir.mkdir(parents=True, exist_ok=True)
    keys = {k: header[k] for k in ("run_id", "step", "eval_key")}
    log_path = logs_dir / f"eval_step_{step}_{stamp}.{worker_id}{UNCOMMITTED}.jsonl"
    atomic_write_text(log_path, "".join(json.dumps({**keys, **s}, sort_keys=True) + "\n" for s in samples))
    summary_path = logs_dir / f"summary_eval_step_{step}_{stamp}.{worker_id}{UNCOMMITTED}.json"
    atomic_write_json(summary_path, {"eval_step": step, **header, **metrics, **timings})
    return [log_path, summary_path]


def committed_name(path: Path) -> Path:
    """eval_step_3_<ts>.<worker>.uncommitted.jsonl -> eval_step_3_<ts>.jsonl"""
    stem, suffix = path.name.split(".", 1)[0], path.name.rsplit(".", 1)[1]
    return path.with_name(f"{stem}.{suffix}")


def commit_eval_files(paths: list[Path]) -> None:
    """Step 3, first half: the committed evaluation's eval log files get their final names."""
    for path in paths:
        os.replace(path, committed_name(path))
    if paths:
        fsync_dir(paths[0].parent)


def write_analysis_files(analysis_dir: Path, step: int, header: dict, samples: list[dict], metrics: dict) -> None:
    """Step 3, second half: the per-step analysis files (overwritten by a later evaluation of the step)."""
    analysis_dir = Path(analysis_dir)
    analysis_dir.mkdir(parents=True, exist_ok=True)
    keys = {k: header[k] for k in ("run_id", "step", "eval_key")}
    atomic_write_json(analysis_dir / f"summary_step_{step}.json", analysis_summary(step, header, samples, metrics))
    atomic_write_json(analysis_dir / f"categories_step_{step}.json",
                      {"eval_step": step, **keys, "categories": categories(samples)})


def analysis_summary(step: int, header: dict, samples: list[dict], metrics: dict) -> dict:
    """`categorization` (count, percentage of all examples) and `format_failure_analysis` (count,
    percentage of the format failures, percentage_of_all) next to the metrics."""
    n = len(samples)
    by_category = Counter(s["category"] for s in samples)
    failures = [s["format_failure_type"] for s in samples if s["category"] == "format_failure"]
    by_type = Counter(failures)
    return {
        "eval_step": step,
        **{k: header[k] for k in ("run_id", "eval_key", "eval_set", "checkpoint_path")},
        "categorization": {c: {"count": by_category[c], "percentage": _percent(by_category[c], n)} for c in CATEGORIES},
        "metrics": {k: metrics.get(k) for k in SUMMARY_KEYS},
        "format_failure_analysis": {
            t: {"count": by_type[t], "percentage": _percent(by_type[t], len(failures)),
                "percentage_of_all": _percent(by_type[t], n)}
            for t in FORMAT_FAILURE_TYPES
        },
    }


def categories(samples: list[dict]) -> dict[str, list[dict]]:
    """The problems in each category, with what is needed to look one up in the eval log."""
    grouped: dict[str, list[dict]] = {c: [] for c in CATEGORIES}
    for s in samples:
        grouped[s["category"]].append({k: s.get(k) for k in ("problem_id", "sample_index", "subject", "level",
                                                             "format_failure_type", "response_length", "finish_reason")})
    return grouped


def _percent(count: int, total: int) -> float:
    return round(100.0 * count / total, 2) if total else 0.0


def wandb_metrics(metrics: dict, gpu: dict, prefix: str = "eval") -> dict:
    """The eval/* and eval_gpu/* metrics logged to W&B for one checkpoint (None values left out);
    prefix eval_subset for keep_up's quick evaluations, so that W&B never mixes them with full ones."""
    names = ("accuracy", "format_accuracy", "num_correct", "num_format_correct", "avg_response_length",
             "avg_response_length_correct", "avg_response_length_incorrect", "avg_token_entropy")
    logged = {f"{prefix}/{name}": metrics[name] for name in names if metrics.get(name) is not None}
    logged.update({f"eval_gpu/{name}": value for name, value in gpu.items()})
    return logged


def commit_and_mark(store_path: Path, evaluation: dict, samples: list[dict], run_dir: Path | None) -> bool:
    """Steps 2 and 4: the store transaction, then the retention marker. False when another worker
    had already recorded this checkpoint for this eval key (nothing written to the store). A
    marker that cannot be written (checkpoints filesystem full) is reported as what it is: the
    evaluation IS recorded, the marker follows at the next start-up."""
    from common.store.writer import record_evaluation, record_failed_evaluation

    if evaluation["status"] == "ok":
        committed = record_evaluation(store_path, evaluation, samples)
    else:
        committed = record_failed_evaluation(store_path, evaluation, evaluation["error"])
    _after_commit_test_delay()
    if run_dir is not None:
        write_marker(run_dir, evaluation["step"], evaluation["eval_key"], evaluation["status"], evaluation["worker_id"])
    return committed


AFTER_COMMIT_DELAY_ENV = "MATHSFT_TEST_AFTER_COMMIT_DELAY_S"


def _after_commit_test_delay() -> None:
    """Test hook: sleep between the store commit and the marker, so the fault suite can kill there."""
    delay = float(os.environ.get(AFTER_COMMIT_DELAY_ENV, "0") or 0)
    if delay > 0:
        logger.info("test hook %s: sleeping %.1f s after the store commit", AFTER_COMMIT_DELAY_ENV, delay)
        time.sleep(delay)


def write_marker(run_dir: Path, step: int, key: str, status: str, worker_id: str) -> bool:
    """The retention marker; False (one ERROR line) when the checkpoints filesystem refuses it."""
    from common.contract import Marker, mark_evaluated

    try:
        mark_evaluated(run_dir, Marker(step=step, eval_key=key, status=status, worker_id=worker_id))
        return True
    except OSError as exc:  # disk full or read-only checkpoints filesystem: the store already holds the result
        logger.error("step %d of %s is recorded in the store, but its retention marker could not be written (%s); "
                     "the daemon writes it at its next start (until then retention keeps the checkpoint)",
                     step, run_dir, exc)
        return False


class Trackers:
    """The W&B run `eval-worker-{id}`, in the group of the trainer run whose checkpoint it logs.

    The group comes from the checkpoint's sidecar (the trainer writes its wandb_group there), else
    logging.wandb_group. A checkpoint of another group finishes the current W&B run and starts one
    in the new group. Metrics are keyed by the checkpoint's training step (common.tracking).
    """

    def __init__(self, config, worker_id: str, local_jsonl: Path | None) -> None:
        self.config = config
        self.run_name = f"eval-worker-{worker_id}"
        self.local_jsonl = local_jsonl
        self.group: str | None = None
        self.tracker = None

    def log(self, group: str, metrics: dict, step: int) -> None:
        import dataclasses

        from common.tracking import start_tracking

        if self.tracker is None or group != self.group:
            self.finish()
            config = dataclasses.replace(self.config, logging=dataclasses.replace(self.config.logging, wandb_group=group))
            self.tracker = start_tracking(config, self.run_name, "eval", self.local_jsonl)
            self.group = group
        self.tracker.log(metrics, step)

    def finish(self) -> None:
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None
