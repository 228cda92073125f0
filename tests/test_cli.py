"""Command-line manners of every tool: --help without torch, --print-config, one error format, bars vs logs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.config import load_config, to_dict

REPO = Path(__file__).resolve().parents[1]
ERROR_LINE = re.compile(r"(train|eval|query|plot|report|demo): error: [^\n]+; [^\n]+")


def run(module: str, *args: str, python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *python_flags, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def imported_modules(importtime_stderr: str) -> set[str]:
    """Top-level module names from `python -X importtime` output ("import time: self | cumulative | name")."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


@pytest.mark.slow  # a real process
@pytest.mark.parametrize("module", ["train_daemon", "eval_daemon"])
def test_help_answers_without_importing_torch(module):
    done = run(module, "--help", python_flags=("-X", "importtime"))
    assert done.returncode == 0, done.stderr[-2000:]
    imported = imported_modules(done.stderr)
    assert "argparse" in imported  # the parse really was traced
    assert not imported & {"torch", "vllm", "transformers"}
    assert "Configuration reference" in done.stdout and "--print-config" in done.stdout


@pytest.mark.slow  # a real process
def test_train_help_says_how_to_resume_and_where_the_keys_are():
    done = run("train_daemon", "--help")
    assert done.returncode == 0
    assert "training.run_id=<id>" in done.stdout and "resume" in done.stdout
    assert "Configuration reference" in done.stdout


@pytest.mark.slow  # a real process
def test_eval_help_shows_evaluation_examples_not_training_ones():
    done = run("eval_daemon", "--help")
    assert done.returncode == 0
    assert "bin/eval --config" in done.stdout and "--checkpoint" in done.stdout
    assert "bin/train" not in done.stdout and "training." not in done.stdout


@pytest.mark.slow  # a real process
@pytest.mark.parametrize("module", ["train_daemon", "eval_daemon", "common.demo.run"])
def test_print_config_prints_the_resolved_config_that_loads_back(module, tmp_path):
    done = run(module, "--config", "config/sft_config.yaml", "--print-config", "training.max_steps=7",
               "evaluation.temperature=0")
    assert done.returncode == 0, done.stderr[-2000:]
    printed = tmp_path / "printed.yaml"
    printed.write_text(done.stdout)
    expected = load_config("config/sft_config.yaml", ["training.max_steps=7", "evaluation.temperature=0"])
    assert to_dict(load_config(printed)) == to_dict(expected)
    assert yaml.safe_load(done.stdout)["training"]["max_steps"] == 7


@pytest.mark.slow  # a real process
@pytest.mark.parametrize("module, args", [
    ("train_daemon", ["training.lerning_rate=1e-5"]),
    ("train_daemon", ["--bogus"]),
    ("eval_daemon", ["--print-config", "training.batch_size=0"]),
    ("eval_daemon", ["evaluation.tempreature=0"]),
    ("eval_daemon", ["--once", "--checkpoint", "x"]),
    ("common.demo.run", ["training.bogus=1"]),
    ("common.store.query", ["--max-width", "2", "progress"]),
    ("common.store.query", ["--bogus"]),
    ("common.store.plots", ["--bogus"]),
    ("common.store.report", ["--bogus"]),
])
def test_usage_and_start_up_errors_are_one_line_and_exit_2(module, args):
    done = run(module, *args)
    assert done.returncode == 2, done.stderr[-2000:]
    assert ERROR_LINE.fullmatch(done.stderr.strip()), done.stderr
    assert done.stdout == ""


@pytest.mark.slow  # a real process
def test_a_config_typo_names_the_override_and_the_key_meant():
    done = run("eval_daemon", "--config", "config/sft_config.yaml", "evaluation.tempreature=0")
    assert done.stderr.strip() == ("eval: error: override 'evaluation.tempreature=0': unknown key "
                                   "evaluation.tempreature; did you mean evaluation.temperature?")


BAR_AND_LOGS = """
import logging, sys
from tqdm import tqdm
from common.cli import setup_logging
if sys.argv[1] == "shared":
    setup_logging(fmt="LOG %(message)s")
else:  # what the entry points did before: a plain stderr handler
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="LOG %(message)s")
bar = tqdm(total=4, desc="train", file=sys.stderr, mininterval=0, miniters=1)
for step in range(4):
    bar.update(1)
    logging.getLogger("x").info("step %d done", step)
bar.close()
"""


@pytest.mark.slow  # a real process
@pytest.mark.parametrize("handler, mixed", [("shared", False), ("plain", True)])
def test_progress_bars_never_interleave_with_log_lines(handler, mixed):
    done = subprocess.run([sys.executable, "-c", BAR_AND_LOGS, handler], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    log_lines = [line for line in done.stderr.split("\n") if "step " in line and " done" in line]
    assert len(log_lines) == 4
    # What a terminal shows of a line is what follows its last carriage return.
    shown = [line.split("\r")[-1] for line in log_lines]
    assert any(not text.startswith("LOG step") for text in shown) == mixed, shown
