"""Metrics to a local JSONL file and to Weights & Biases (both daemons).

    tracker = start_tracking(config, run_name="math-sft-dual-gpu-...", job_type="train",
                             local_jsonl=Path("results/runs/<run_id>/train_log.jsonl"))
    tracker.log({"train/loss": 0.71}, step=12)
    tracker.finish()

Every record carries "train_step": the training step the metrics belong to (W&B plots use it as
the x axis, so the eval run can log checkpoints out of order). W&B mode: off when logging.wandb is
false; WANDB_MODE when set; online with an API key (WANDB_API_KEY or ~/.netrc); otherwise offline
(never blocks; upload later with `wandb sync`). Runs are grouped by logging.wandb_group (the
trainer fills in its run id), so the train and eval runs of one training run sit together.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
from pathlib import Path
from typing import Any

from common.config import Config, to_dict
from common.contract import now_iso

logger = logging.getLogger(__name__)

STEP_KEY = "train_step"
WANDB_HOST = "api.wandb.ai"


class Tracker:
    def __init__(self, wandb_run, local_jsonl: Path | None):
        self._wandb_run = wandb_run
        self._file = None
        if local_jsonl is not None:
            Path(local_jsonl).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(local_jsonl, "a")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = {STEP_KEY: step, **metrics}
        if self._file is not None:
            self._file.write(json.dumps({**record, "time": now_iso()}) + "\n")
            self._file.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(record)

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def start_tracking(config: Config, run_name: str, job_type: str, local_jsonl: Path | None) -> Tracker:
    """A Tracker writing to local_jsonl (when given) and to W&B (when enabled)."""
    return Tracker(_start_wandb(config, run_name, job_type), local_jsonl)


def wandb_mode(enabled: bool) -> str:
    """disabled | online | offline (see module docstring)."""
    if not enabled:
        return "disabled"
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if _has_api_key() else "offline"


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(WANDB_HOST) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):  # no or unreadable ~/.netrc: no key
        return False


def _start_wandb(config: Config, run_name: str, job_type: str):
    lg = config.logging
    mode = wandb_mode(lg.wandb)
    if mode == "disabled":
        return None
    if mode == "offline" and not os.environ.get("WANDB_MODE"):
        logger.warning("no W&B API key (WANDB_API_KEY or ~/.netrc): logging offline under %s/wandb; "
                       "upload later with `wandb sync`", config.paths.results_dir)
    import wandb  # slow to import; only when W&B is on

    directory = Path(config.paths.results_dir)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        run = wandb.init(project=lg.wandb_project, entity=lg.wandb_entity, group=lg.wandb_group or "math-sft",
                         name=run_name, job_type=job_type, config=to_dict(config), mode=mode, dir=str(directory),
                         settings=wandb.Settings(console="off", init_timeout=60))
    except Exception as exc:  # wandb raises many types (network, auth, usage); metrics still go to the JSONL file
        logger.warning("W&B did not start (%s: %s); continuing with local metrics only", type(exc).__name__, exc)
        return None
    run.define_metric(STEP_KEY)
    run.define_metric("*", step_metric=STEP_KEY)
    return run


def gpu_stats(device: str) -> dict[str, float]:
    """memory_used (GiB, the whole device as nvidia-smi shows it) and utilization (%) of a CUDA
    device; {} on CPU. Without NVML (pynvml) memory falls back to this process's reserved memory."""
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return {}
    index = torch.device(device).index or 0
    stats = {}
    try:
        stats["memory_used"] = torch.cuda.device_memory_used(index) / 2**30
        stats["utilization"] = float(torch.cuda.utilization(index))
    except (ImportError, RuntimeError):  # pynvml missing or NVML unavailable: report what torch knows
        stats.setdefault("memory_used", torch.cuda.memory_reserved(index) / 2**30)
    return stats
