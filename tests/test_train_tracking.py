"""Metrics tracking (common/tracking.py): the local JSONL file, W&B modes, offline runs, GPU stats."""

from __future__ import annotations

import json

import pytest

from common.config import load_config
from common.tracking import gpu_stats, start_tracking, wandb_mode


@pytest.fixture
def no_wandb_credentials(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def test_local_jsonl_gets_one_record_per_log_keyed_by_train_step(tmp_path):
    config = load_config(None, ["logging.wandb=false", f"paths.results_dir={tmp_path}"])
    tracker = start_tracking(config, "math-sft-dual-gpu-x", "train", tmp_path / "run" / "train_log.jsonl")
    tracker.log({"train/loss": 2.5, "train/learning_rate": 1e-5}, step=1)
    tracker.log({"train/loss": 2.0, "train/learning_rate": 2e-5}, step=2)
    tracker.finish()
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [(r["train_step"], r["train/loss"]) for r in records] == [(1, 2.5), (2, 2.0)]
    assert not (tmp_path / "wandb").exists()  # logging.wandb false: W&B is off


def test_mode_is_offline_without_a_key_and_online_with_one(no_wandb_credentials, monkeypatch):
    assert wandb_mode(False) == "disabled"
    assert wandb_mode(True) == "offline"
    (no_wandb_credentials / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    (no_wandb_credentials / ".netrc").chmod(0o600)
    assert wandb_mode(True) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # an explicit WANDB_MODE wins
    assert wandb_mode(True) == "disabled"


@pytest.mark.slow  # starts a real (offline) W&B run
def test_offline_wandb_run_starts_without_a_key_in_the_shared_group(no_wandb_credentials, tmp_path, caplog):
    config = load_config(None, [f"paths.results_dir={tmp_path / 'results'}", "logging.wandb_group=run-42"])
    tracker = start_tracking(config, "math-sft-dual-gpu-test", "train", None)
    run = tracker._wandb_run
    assert run is not None and run.group == "run-42" and run.name == "math-sft-dual-gpu-test"
    assert run.project == "math-sft"
    tracker.log({"train/loss": 1.0}, step=1)
    tracker.finish()
    assert list((tmp_path / "results" / "wandb").glob("offline-run-*"))
    assert any("logging offline" in r.getMessage() for r in caplog.records)


def test_gpu_stats_are_empty_on_cpu():
    assert gpu_stats("cpu") == {}
