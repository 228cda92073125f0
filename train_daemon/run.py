"""Run identity and directories: a new run, or the existing run that `training.run_id` names.

Used by `bin/train`. Layout under `<results_dir>/` (common/contract.py Layout):

    runs/<run_id>/run.json          identity (run id, W&B run name and group) + the config it started with
    runs/<run_id>/config.json       the fully resolved config of the latest start
    runs/<run_id>/train_log.jsonl   metrics per log step (common.tracking)
    runs/<run_id>/resume/           resume state (train_daemon.resume)
    checkpoints/<run_id>/           published checkpoints + manifest (common.contract)

Resuming with settings that change the data order (batch size, seed, data, max length) would
silently train on a different stream, so those must match the run's first start.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from common.config import Config, ConfigError, to_dict
from common.contract import Layout, now_iso
from common.durable import atomic_write_json

# Settings that fix the data stream and the model; a resumed run must keep them.
RESUME_FIXED_KEYS = [
    "model.name_or_path", "model.tokenizer", "model.max_seq_length",
    "data.train_source", "data.train_split", "data.format", "data.prompt_template",
    "training.batch_size", "training.gradient_accumulation_steps", "training.seed",
]


@dataclass
class Run:
    run_id: str
    run_name: str  # W&B run name, kept across resumes
    wandb_group: str  # shared with the eval daemon's W&B run (written into each checkpoint sidecar)
    run_dir: Path  # Layout.run_state: <results_dir>/runs/<run_id> (the trainer's own)
    checkpoints_dir: Path  # Layout.run_checkpoints: <results_dir>/checkpoints/<run_id> (the contract)
    resume_dir: Path  # Layout.resume_state: optimizer, RNG, data position
    log_path: Path  # Layout.train_log: train_log.jsonl
    is_new: bool


def resolve_run(config: Config) -> Run:
    """The run to start or resume (nothing is written yet); fills training.run_id and
    logging.wandb_group into the config, so they are part of the resolved config."""
    layout = Layout.of(config)
    run_id = config.training.run_id or _new_run_id(layout)
    run_dir = layout.run_state(run_id)
    info_path = run_dir / "run.json"
    if info_path.exists():
        info = _read_run_info(info_path)
        _check_resume_compatible(config, info.get("config", {}), run_id)
        run_name, group, is_new = info["run_name"], config.logging.wandb_group or info["wandb_group"], False
    else:
        run_name, group, is_new = f"math-sft-dual-gpu-{time.strftime('%Y%m%d-%H%M%S')}", config.logging.wandb_group or run_id, True
    config.training.run_id, config.logging.wandb_group = run_id, group
    return Run(run_id=run_id, run_name=run_name, wandb_group=group, run_dir=run_dir,
               checkpoints_dir=layout.run_checkpoints(run_id), resume_dir=layout.resume_state(run_id),
               log_path=layout.train_log(run_id), is_new=is_new)


def write_run_files(run: Run, config: Config) -> None:
    """run.json on the first start; config.json (the resolved config) on every start."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    if run.is_new:
        atomic_write_json(run.run_dir / "run.json", {"run_id": run.run_id, "run_name": run.run_name,
                                                     "wandb_group": run.wandb_group, "created_at": now_iso(),
                                                     "config": to_dict(config)})
    atomic_write_json(run.run_dir / "config.json", to_dict(config))


def _new_run_id(layout: Layout) -> str:
    base = f"sft-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id, suffix = base, 1
    while layout.run_state(run_id).exists():  # two starts within one second
        suffix += 1
        run_id = f"{base}-{suffix}"
    return run_id


def _read_run_info(path: Path) -> dict:
    try:
        info = json.loads(path.read_text())
        info["run_name"], info["wandb_group"]  # noqa: B018 (presence check)
        return info
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc!r}); pick a new training.run_id or restore the file") from exc


def _check_resume_compatible(config: Config, started: dict, run_id: str) -> None:
    now = to_dict(config)
    for dotted in RESUME_FIXED_KEYS:
        section, key = dotted.split(".")
        before = started.get(section, {}).get(key)
        if before is not None and before != now[section][key]:
            raise ConfigError(f"{dotted} is {now[section][key]!r} but run {run_id} was started with {before!r}; "
                              f"resume with the run's value or set a new training.run_id")
