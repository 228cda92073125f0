"""Metrics tracking (common/tracking.py): the local JSONL file, W&B modes, offline runs, GPU stats."""

from __future__ import annotations

import json
import time
from urllib.parse import urlsplit

import pytest

from common.config import load_config
from common import tracking
from common.tracking import gpu_stats, start_tracking, wandb_credentials, wandb_mode


KEY = "k" * 40  # wandb checks only the form of a key (40 characters) without a server


@pytest.fixture
def no_wandb_credentials(monkeypatch, tmp_path):
    """A HOME without ~/.netrc or W&B settings, no key in the environment, wandb's session reset."""
    import wandb

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    wandb.teardown()  # wandb keeps its settings (read from HOME and the environment) per process
    yield home
    wandb.teardown()


def write_netrc(home, host: str) -> None:
    (home / ".netrc").write_text(f"machine {host}\n  login user\n  password {KEY}\n")
    (home / ".netrc").chmod(0o600)


def test_local_jsonl_gets_one_record_per_log_keyed_by_train_step(tmp_path):
    config = load_config(None, ["logging.wandb=false", f"paths.results_dir={tmp_path}"])
    tracker = start_tracking(config, "math-sft-dual-gpu-x", "train", tmp_path / "run" / "train_log.jsonl")
    tracker.log({"train/loss": 2.5, "train/learning_rate": 1e-5}, step=1)
    tracker.log({"train/loss": 2.0, "train/learning_rate": 2e-5}, step=2)
    tracker.finish()
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [(r["train_step"], r["train/loss"]) for r in records] == [(1, 2.5), (2, 2.0)]
    assert not (tmp_path / "wandb").exists()  # logging.wandb false: W&B is off


def test_mode_is_offline_without_credentials(no_wandb_credentials, monkeypatch):
    assert wandb_mode(False) == "disabled"
    assert wandb_mode(True) == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # an explicit WANDB_MODE wins
    assert wandb_mode(True) == "disabled"


def test_a_login_for_the_host_wandb_uses_counts_whatever_that_host_is(no_wandb_credentials, monkeypatch):
    import wandb

    write_netrc(no_wandb_credentials, "wandb.example.com")  # `wandb login --host https://wandb.example.com`
    assert wandb_credentials()[0] is False  # wandb is configured for its default host, not this one
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    wandb.teardown()
    assert wandb_credentials() == (True, "https://wandb.example.com") and wandb_mode(True) == "online"
    monkeypatch.delenv("WANDB_BASE_URL")
    wandb.teardown()
    default_host = wandb_credentials()[1]
    write_netrc(no_wandb_credentials, urlsplit(default_host).netloc)  # what `wandb login` writes by default
    assert wandb_mode(True) == "online"


def test_wandb_api_key_counts(no_wandb_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    assert wandb_mode(True) == "online"


@pytest.mark.slow  # starts a real (offline) W&B run
def test_offline_wandb_run_starts_in_the_background_in_the_shared_group(no_wandb_credentials, tmp_path, caplog):
    config = load_config(None, [f"paths.results_dir={tmp_path / 'results'}", "logging.wandb_group=run-42"])
    started = time.monotonic()
    tracker = start_tracking(config, "math-sft-dual-gpu-test", "train", None)
    tracker.log({"train/loss": 1.0}, step=1)
    assert time.monotonic() - started < 1.0  # importing wandb alone takes longer: it is not on this thread
    run = tracker._wandb_start.result(timeout=120)
    assert run is not None and run.group == "run-42" and run.name == "math-sft-dual-gpu-test"
    assert run.project == "math-sft"
    tracker.log({"train/loss": 0.5}, step=2)
    tracker.finish()
    assert list((tmp_path / "results" / "wandb").glob("offline-run-*"))
    assert sum("logging offline" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.slow  # starts real W&B runs
def test_a_key_without_a_network_never_holds_the_caller_and_ends_offline(no_wandb_credentials, tmp_path,
                                                                          monkeypatch, caplog):
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:1")  # nothing listens: as without a network
    monkeypatch.setattr(tracking, "WANDB_INIT_TIMEOUT_S", 3.0)
    config = load_config(None, [f"paths.results_dir={tmp_path / 'results'}"])
    started = time.monotonic()
    tracker = start_tracking(config, "math-sft-dual-gpu-test", "train", tmp_path / "train_log.jsonl")
    for step in range(1, 4):
        tracker.log({"train/loss": 1.0 / step}, step=step)
    assert time.monotonic() - started < 1.0 and not tracker._wandb_start.done()
    tracker.finish()
    assert list((tmp_path / "results" / "wandb").glob("offline-run-*"))  # the online start fell back
    assert len((tmp_path / "train_log.jsonl").read_text().splitlines()) == 3
    assert sum("could not start online" in r.getMessage() for r in caplog.records) == 1


def test_gpu_stats_are_empty_on_cpu():
    assert gpu_stats("cpu") == {}
