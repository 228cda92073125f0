"""Helpers of the end-to-end tests (tests/test_e2e_*.py): the demo's inputs at test size, the two
daemons as real processes, and a bin/query reader looping in the background.

Everything runs through config/demo.yaml (the demo's machinery) with `key=value` overrides that
point every path into the test's temporary directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.config import load_config
from common.demo.inputs import DemoInputs, ensure_inputs
from common.store.schema import StoreMissingError, connect_read_only

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = str(REPO / "config" / "demo.yaml")
TEST_HOOKS = ("MATHSFT_TEST_PUBLISH_DELAY_S", "MATHSFT_TEST_PUBLISH_DELAY_FROM_STEP", "MATHSFT_TEST_EVAL_DELAY_S",
              "MATHSFT_TEST_AFTER_COMMIT_DELAY_S")
# Small enough to train and evaluate in seconds; head_dim stays 32 (hidden 64, 2 heads).
TEST_INPUTS = DemoInputs(train_problems=64, test_problems=6, hidden_size=64, num_layers=1)


def demo_paths(root: Path) -> list[str]:
    """Overrides that move every path of config/demo.yaml under root."""
    results = root / "results"
    return [
        f"model.name_or_path={root / 'model'}", f"data.train_source={root / 'data'}",
        f"evaluation.test_source={root / 'data'}", f"data.prompt_template={REPO / 'config' / 'demo.prompt'}",
        f"paths.results_dir={results}",
    ]


def build_inputs(root: Path, inputs: DemoInputs = TEST_INPUTS) -> None:
    """The demo's dataset and tiny model, built by the demo's own code, at test size."""
    ensure_inputs(load_config(DEMO_CONFIG, demo_paths(root)), inputs)


def environment(**extra: str) -> dict:
    # One torch thread per process, as bin/demo does: several processes each spreading over every
    # core of a 2-core machine slow each other down many times over.
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "offline", "VLLM_CPU_KVCACHE_SPACE": "1"}
    for name in TEST_HOOKS:
        env.pop(name, None)
    return {**env, **extra}


class Proc:
    """`python -m <module> ...` in the repository root; stdout and stderr in a log file the test polls."""

    def __init__(self, module: str, args: list[str], log_dir: Path, name: str, **env: str):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=environment(**env),
                                        stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_for(self, condition, what: str, timeout: float = 180) -> None:
        """Poll condition() until true; fail with the log tail if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while not condition():
            if not self.alive():
                raise AssertionError(f"{self.name} exited ({self.process.returncode}) before {what}:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {what} after {timeout} s:\n{self.log()[-4000:]}")
            time.sleep(0.2)

    def wait_for_log(self, text: str, timeout: float = 180) -> None:
        self.wait_for(lambda: text in self.log(), repr(text), timeout)

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        """kill -9 and reap."""
        self.process.kill()
        self.wait(30)


def run(module: str, args: list[str], timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=environment(**env),
                          capture_output=True, text=True, timeout=timeout)


def evaluations(db: Path, eval_key_like: str = "%") -> list[tuple]:
    """(run_id, step, status, number of sample rows) per stored evaluation (of the eval keys that
    match the SQL LIKE pattern), sorted."""
    try:
        with connect_read_only(db) as con:
            return con.execute(
                "SELECT e.run_id, e.step, e.status, (SELECT count(*) FROM samples s WHERE s.run_id = e.run_id "
                "AND s.step = e.step AND s.eval_key = e.eval_key) FROM evaluations e WHERE e.eval_key LIKE ? "
                "ORDER BY 1, 2, 3", [eval_key_like]).fetchall()
    except StoreMissingError:
        return []


@dataclass
class ReaderLoop:
    """Runs `python -m common.store.query` (what bin/query execs) in a loop until stopped, recording
    each result: what a user watching the store with bin/query would see."""
    db: Path
    results: list[dict] = field(default_factory=list)
    sql: str = ("SELECT (SELECT count(*) FROM evaluations WHERE status = 'ok') AS ok, "
                "(SELECT count(*) FROM evaluations) AS evaluations, "
                "(SELECT count(DISTINCT (run_id, step, eval_key)) FROM evaluations) AS distinct_keys, "
                "(SELECT count(*) FROM samples) AS samples")

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reader-loop", daemon=True)

    def start(self) -> ReaderLoop:
        self._thread.start()
        return self

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join(timeout=120)
        return self.results

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.db.exists():  # before the first evaluation there is no store, by design
                try:
                    done = run("common.store.query", ["--db", str(self.db), "--format", "json", self.sql], timeout=60)
                except subprocess.TimeoutExpired:  # a reader that hangs is a failure too
                    self.results.append({"code": "timeout", "stderr": "", "row": None})
                    continue
                row = json.loads(done.stdout)[0] if done.returncode == 0 else None
                self.results.append({"code": done.returncode, "stderr": done.stderr, "row": row})
            self._stop.wait(0.3)
