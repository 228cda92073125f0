"""The base-model presets: each matches the protocol of the number it reproduces, carries that
number, and `bin/eval --checkpoint` prints its result beside it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from common.config import load_config
from common.data import MATH500_HUB_SOURCE, MATH_HUB_SOURCE
from common.store.schema import connect_read_only
from tests.test_eval_daemon import daemon_args

REPO = Path(__file__).resolve().parents[1]


def test_dr_grpo_preset_matches_its_protocol():
    config = load_config(str(REPO / "config" / "base_math500_greedy.yaml"), [])
    e = config.evaluation
    assert (e.eval_set, e.test_source, e.temperature, e.max_tokens, e.max_model_len) == \
        ("math500", MATH500_HUB_SOURCE, 0.0, 3000, 4096)
    assert config.data.prompt_template == "config/r1_zero.prompt" and e.published.accuracy == [0.212]


def test_cs336_preset_matches_its_protocol():
    e = load_config(str(REPO / "config" / "base_reference.yaml"), []).evaluation
    assert (e.eval_set, e.test_source, e.temperature, e.top_p, e.max_tokens, e.stop, e.num_eval_samples) == \
        ("math", MATH_HUB_SOURCE, 1.0, 1.0, 1024, ["</answer>"], 0)
    assert e.published.accuracy == [0.028, 0.029] and e.published.format_accuracy == [0.14, 0.16]


def test_eval_checkpoint_prints_its_result_beside_the_published_one(tmp_path, tiny_model_dir, math_dir):
    command = [sys.executable, "-m", "eval_daemon", "--config", str(REPO / "config" / "base_reference.yaml"),
               "--checkpoint", str(tiny_model_dir), *daemon_args(math_dir)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    with connect_read_only(tmp_path / "results" / "results.duckdb") as con:
        accuracy, format_accuracy, n = con.execute(
            "SELECT accuracy, format_accuracy, num_test_cases FROM evaluations").fetchone()
    header, _, measured, published, *_ = result.stdout.splitlines()
    columns = header.split()
    assert columns == ["model", "accuracy", "format_accuracy", "problems"]
    assert measured.split()[-3:] == [f"{100 * accuracy:.1f}%", f"{100 * format_accuracy:.1f}%", str(n)]
    assert published.split()[-2:] == ["2.8-2.9%", "14.0-16.0%"]
