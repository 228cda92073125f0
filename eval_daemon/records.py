"""Writing one finished evaluation: per-example log, summaries, the DuckDB commit, the marker, W&B.

Order, so that a crash at any point leaves nothing half-written and nothing recorded twice:
1. files, each written to a temporary name and renamed into place (readers never see half a file):
   results/eval_logs/eval_step_<N>_<ts>.jsonl          one line per example
   results/eval_logs/summary_eval_step_<N>_<ts>.json   eval_step, counts, accuracy, ... , timings
   results/analysis/summary_step_<N>.json              categorization, metrics, format_failure_analysis
   results/analysis/categories_step_<N>.json           the problems in each category
2. the store commit (common/store/writer.py record_evaluation: one transaction): the point of truth. A crash
   before it means the checkpoint is evaluated again on restart (its files from the crashed attempt
   stay, with their own timestamp; the analysis files are overwritten).
3. the marker (common/contract.py mark_evaluated) that lets the trainer's retention delete the step.
4. W&B / local metrics (best effort: a failure there never loses the evaluation).

N is the checkpoint's training step. The analysis files are per step: two runs evaluated into the
same results/ directory overwrite each other's (the store and the eval_logs keep both).
Used by `bin/eval` (eval_daemon/__main__.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

from common.durable import atomic_write_json, atomic_write_text
from common.grading import CATEGORIES, FORMAT_FAILURE_TYPES

logger = logging.getLogger(__name__)

SUMMARY_KEYS = ("num_test_cases", "num_correct", "num_format_correct", "num_wrong_answer", "num_format_failure",
                "accuracy", "format_accuracy", "avg_response_length", "avg_response_length_correct",
                "avg_response_length_incorrect", "avg_token_entropy", "entropy_method", "entropy_sample_size")


def file_timestamp() -> str:
    """UTC, sortable, safe in file names: 20261126T051502Z."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def write_eval_files(logs_dir: Path, analysis_dir: Path, step: int, stamp: str, header: dict,
                     samples: list[dict], metrics: dict, timings: dict) -> list[Path]:
    """Write the four files of one evaluation atomically; returns their paths."""
    logs_dir, analysis_dir = Path(logs_dir), Path(analysis_dir)
    logs_dir.mkdir(parents=True, exist_ok=True)
    analysis_dir.mkdir(parents=True, exist_ok=True)
    keys = {k: header[k] for k in ("run_id", "step", "eval_key")}
    log_path = logs_dir / f"eval_step_{step}_{stamp}.jsonl"
    atomic_write_text(log_path, "".join(json.dumps({**keys, **s}, sort_keys=True) + "\n" for s in samples))
    summary_path = logs_dir / f"summary_eval_step_{step}_{stamp}.json"
    atomic_write_json(summary_path, {"eval_step": step, **header, **metrics, **timings})
    analysis_path = analysis_dir / f"summary_step_{step}.json"
    atomic_write_json(analysis_path, analysis_summary(step, header, samples, metrics))
    categories_path = analysis_dir / f"categories_step_{step}.json"
    atomic_write_json(categories_path, {"eval_step": step, **keys, "categories": categories(samples)})
    return [log_path, summary_path, analysis_path, categories_path]


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
        grouped[s["category"]].append({k: s[k] for k in ("problem_id", "subject", "level", "format_failure_type",
                                                         "response_length", "finish_reason")})
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
    """Steps 2 and 3: the store transaction, then the retention marker. False when another worker
    had already recorded this checkpoint for this eval key (nothing written to the store)."""
    from common.contract import Marker, mark_evaluated
    from common.store.writer import record_evaluation, record_failed_evaluation

    if evaluation["status"] == "ok":
        committed = record_evaluation(store_path, evaluation, samples)
    else:
        committed = record_failed_evaluation(store_path, evaluation, evaluation["error"])
    if run_dir is not None:
        mark_evaluated(run_dir, Marker(step=evaluation["step"], eval_key=evaluation["eval_key"],
                                       status=evaluation["status"], worker_id=evaluation["worker_id"]))
    return committed


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
