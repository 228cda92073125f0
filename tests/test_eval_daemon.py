"""bin/eval as a real process (Hugging Face engine on CPU, tiny model, real watchdog and DuckDB):
pick-up of existing and newly published checkpoints, bad input, SIGTERM, kill -9 and restart,
--once, --checkpoint, config errors.

    bin/test tests/test_eval_daemon.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.contract import MANIFEST_NAME, Sidecar, marker_path, publish_checkpoint
from common.store.schema import connect_read_only
from eval_daemon.entropy import EXACT_METHOD

REPO = Path(__file__).resolve().parents[1]


# ---- helpers (also used by tests/test_eval_vllm.py) -----------------------------------------------


def publish_model(root: Path, run_id: str, step: int, base_model: Path, noise_seed: int | None,
                  corrupt: bool = False, noise_scale: float = 0.02) -> Path:
    """Publish the tiny model (weights plus seeded Gaussian noise when noise_seed is given) as a
    checkpoint of run_id, the way the trainer does; corrupt=True truncates its safetensors file."""
    import torch
    from transformers import AutoModelForCausalLM

    def write(tmp: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(base_model)
        if noise_seed is not None:
            generator = torch.Generator().manual_seed(noise_seed)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * noise_scale)
        model.save_pretrained(tmp)
        for file in base_model.glob("tokenizer*"):
            shutil.copy(file, tmp)
        if corrupt:
            weights = tmp / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    sidecar = Sidecar(run_id=run_id, step=step, wandb_group=f"group-{run_id}", config={"training": {"seed": 1}})
    return publish_checkpoint(root / run_id, run_id, step, write, sidecar, {"train/loss": 1.0 / max(step, 1)})


def daemon_args(math_dir: Path, *extra: str, engine: str = "hf") -> list[str]:
    return [
        f"evaluation.engine={engine}", "evaluation.device=cpu", f"evaluation.test_source={math_dir}",
        "evaluation.max_tokens=16", "evaluation.max_model_len=512", "evaluation.entropy_sample_size=3",
        "evaluation.grading_workers=1", "evaluation.reconcile_interval_s=600",  # events only: proves the watcher
        "evaluation.schedule=in_order",  # the tests follow the checkpoints in step order
        f"data.prompt_template={REPO / 'config' / 'r1_zero.prompt'}", "logging.wandb=false",
        "logging.progress_bar=false", *extra,
    ]


class Daemon:
    """`python -m eval_daemon ...` in workdir, its stderr in a log file the test can poll."""

    def __init__(self, workdir: Path, args: list[str], env: dict | None = None, name: str = "eval"):
        self.log_path = workdir / f"{name}-{time.monotonic_ns()}.log"
        environment = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline",
                       "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "eval_daemon", *args], cwd=workdir,
                                        env=environment, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for_log(self, text: str, timeout: float = 120, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited ({self.process.returncode}) before logging {text!r}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} after {timeout} s:\n{self.log()[-3000:]}")
            time.sleep(0.2)

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self._log.close()


def run_daemon(workdir: Path, args: list[str], timeout: float = 180, env: dict | None = None) -> tuple[int, str]:
    daemon = Daemon(workdir, args, env)
    code = daemon.wait(timeout)
    return code, daemon.log()


def evaluations(db: Path) -> list[tuple]:
    """(run_id, step, status, num_samples) of every stored evaluation, sorted."""
    if not db.exists():
        return []
    with connect_read_only(db) as con:
        return con.execute(
            "SELECT e.run_id, e.step, e.status, (SELECT count(*) FROM samples s WHERE s.run_id = e.run_id "
            "AND s.step = e.step AND s.eval_key = e.eval_key) FROM evaluations e ORDER BY 1, 2").fetchall()


def wait_for_evaluations(db: Path, count: int, daemon: Daemon, timeout: float = 120) -> list[tuple]:
    deadline = time.monotonic() + timeout
    while True:
        rows = evaluations(db)
        if len(rows) >= count:
            return rows
        if daemon.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{len(rows)} evaluations, expected {count}:\n{daemon.log()[-3000:]}")
        time.sleep(0.5)


def temporaries(results: Path) -> list[Path]:
    return [p for p in results.rglob(".tmp-*")]


# ---- tests ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_daemon_evaluates_existing_and_new_checkpoints_and_survives_bad_input(tmp_path, tiny_model_dir, math_dir):
    results = tmp_path / "results"
    checkpoints, db = results / "checkpoints", results / "results.duckdb"
    publish_model(checkpoints, "run_a", 10, tiny_model_dir, noise_seed=1)  # exists before the daemon starts
    (checkpoints / "broken").mkdir()
    (checkpoints / "broken" / MANIFEST_NAME).write_text("{garbage")
    (checkpoints / "notes").mkdir()
    (checkpoints / "notes" / "README").write_text("not a run")

    daemon = Daemon(tmp_path, daemon_args(math_dir))
    try:
        daemon.wait_for_log("all published checkpoints are evaluated")
        assert evaluations(db) == [("run_a", 10, "ok", 7)]
        # Published while it runs (reconcile is 10 min away: only a watchdog event can trigger these).
        publish_model(checkpoints, "run_a", 20, tiny_model_dir, noise_seed=2, corrupt=True)
        publish_model(checkpoints, "run_a", 30, tiny_model_dir, noise_seed=3)
        rows = wait_for_evaluations(db, 3, daemon)
        assert rows == [("run_a", 10, "ok", 7), ("run_a", 20, "failed", 0), ("run_a", 30, "ok", 7)]
        with connect_read_only(db) as con:
            error = con.execute("SELECT error FROM evaluations WHERE step = 20").fetchone()[0]
        assert "model.safetensors is not a valid safetensors file" in error
        daemon.wait_for_log("all published checkpoints are evaluated", count=2)
        assert daemon.process.poll() is None  # still serving
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
    log = daemon.log()
    assert log.count("ignoring run broken") == 1
    assert log.count("ignoring " + str(Path("results/checkpoints/notes")) + ": no manifest.json") == 1
    assert log.count("failed to load") == 1 and "stopped" in log
    for step in (10, 20, 30):
        assert marker_path(checkpoints / "run_a", step, _eval_key(db)).exists()
    logs = sorted((results / "eval_logs").glob("eval_step_*.jsonl"))
    assert [p.name.split("_")[2] for p in logs] == ["10", "30"]
    assert all(len(p.read_text().splitlines()) == 7 for p in logs)
    analysis = json.loads((results / "analysis" / "summary_step_30.json").read_text())
    assert sum(c["count"] for c in analysis["categorization"].values()) == 7
    metrics = [json.loads(line) for line in (results / "eval_logs" / "eval_metrics.jsonl").read_text().splitlines()]
    assert [m["train_step"] for m in metrics] == [10, 30] and all("eval/accuracy" in m for m in metrics)
    assert not temporaries(results)


def _eval_key(db: Path) -> str:
    with connect_read_only(db) as con:
        return con.execute("SELECT DISTINCT eval_key FROM evaluations").fetchone()[0]


@pytest.mark.slow
def test_sigterm_and_kill9_mid_evaluation_then_restart_records_each_checkpoint_once(tmp_path, tiny_model_dir, math_dir):
    results = tmp_path / "results"
    checkpoints, db = results / "checkpoints", results / "results.duckdb"
    for step, seed in ((10, 1), (20, 2)):
        publish_model(checkpoints, "run_a", step, tiny_model_dir, noise_seed=seed)
    slow = {"MATHSFT_TEST_EVAL_DELAY_S": "120"}  # test hook: sleeps after grading, before anything is written

    # SIGTERM mid-evaluation: exits 0 promptly, nothing of the evaluation written.
    daemon = Daemon(tmp_path, daemon_args(math_dir), env=slow)
    daemon.wait_for_log("test hook")
    stopped_at = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait(60) == 0
    assert time.monotonic() - stopped_at < 30
    assert "abandoned the evaluation of run run_a step 10" in daemon.log()
    assert evaluations(db) == []
    assert not (results / "eval_logs").exists() or not list((results / "eval_logs").glob("eval_step_*"))
    assert not list(checkpoints.rglob("*.done")) and not temporaries(results)

    # kill -9 mid-evaluation: no partial rows either.
    daemon = Daemon(tmp_path, daemon_args(math_dir), env=slow)
    daemon.wait_for_log("test hook")
    daemon.process.send_signal(signal.SIGKILL)
    daemon.wait(30)
    assert evaluations(db) == []

    # Restart with --once: every checkpoint exactly once; a second --once finds nothing to do.
    code, log = run_daemon(tmp_path, daemon_args(math_dir, "--once"))
    assert code == 0, log
    assert evaluations(db) == [("run_a", 10, "ok", 7), ("run_a", 20, "ok", 7)]
    code, log = run_daemon(tmp_path, daemon_args(math_dir, "--once"))
    assert code == 0 and "nothing pending" in log and "evaluating run" not in log
    assert evaluations(db) == [("run_a", 10, "ok", 7), ("run_a", 20, "ok", 7)]
    assert not temporaries(results)


@pytest.mark.slow
def test_checkpoint_argument_evaluates_one_model_and_exits(tmp_path, tiny_model_dir, math_dir):
    db = tmp_path / "results" / "results.duckdb"
    code, log = run_daemon(tmp_path, daemon_args(math_dir, "--checkpoint", str(tiny_model_dir)))
    assert code == 0, log
    assert evaluations(db) == [(str(tiny_model_dir.resolve()), 0, "ok", 7)]
    with connect_read_only(db) as con:
        engine, method, size = con.execute("SELECT engine, entropy_method, entropy_sample_size FROM evaluations").fetchone()
    assert (engine, method, size) == ("hf", EXACT_METHOD, 3)
    with connect_read_only(db) as con:  # issue 14 item 4: what moved the number, stored with it
        printed = con.execute("SELECT engine_version, grader, grader_version, dtype, max_model_len, device, "
                              "deterministic_scheduling, length(problems_sha256), length(prompt_template_sha256) "
                              "FROM fingerprints").fetchone()
    assert printed[0].startswith("transformers==") and printed[1:] == ("mathsft", "1", "float32", 512, "cpu", True, 64, 64)
    code, log = run_daemon(tmp_path, daemon_args(math_dir, "--checkpoint", str(tiny_model_dir)))
    assert code == 0 and "already recorded" in log
    assert len(evaluations(db)) == 1
    broken = tmp_path / "broken_model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").unlink()
    code, log = run_daemon(tmp_path, daemon_args(math_dir, "--checkpoint", str(broken)))
    assert code == 1 and "missing config.json" in log
    assert evaluations(db) == sorted([(str(broken.resolve()), 0, "failed", 0), (str(tiny_model_dir.resolve()), 0, "ok", 7)])
    code, log = run_daemon(tmp_path, daemon_args(math_dir, "--checkpoint", str(tmp_path / "typo")))
    assert code == 2 and "no such model directory" in log


@pytest.mark.slow  # a real process
@pytest.mark.parametrize("override,message", [
    ("evaluation.device=cuda:1", "evaluation.device is cuda:1 but 0 GPU(s) are visible; set evaluation.device=cpu"),
    ("evaluation.shedule=latest", "unknown key evaluation.shedule"),
])
def test_config_errors_exit_2_with_the_fix(tmp_path, math_dir, override, message):
    code, log = run_daemon(tmp_path, daemon_args(math_dir, override), timeout=60)
    assert code == 2
    assert message in log
    assert not (tmp_path / "results").exists()  # nothing touched
