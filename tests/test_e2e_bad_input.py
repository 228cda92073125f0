"""End to end: bad input reaches a real process and comes back as one clear line naming the fix.

Config errors (unknown key, wrong type) exit 2 from all three entry points before anything is
written; a malformed dataset row names its file and row; a model path that does not exist is
named. (Junk inside results/checkpoints/ is covered while the daemons run: tests/test_e2e_faults.py.)

    bin/test tests/test_e2e_bad_input.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e_support import DEMO_CONFIG, build_inputs, demo_paths, evaluations, run

pytestmark = pytest.mark.slow

ENTRY_POINTS = ["train_daemon", "eval_daemon", "common.demo.run"]  # what bin/train, bin/eval and bin/demo exec


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_input")
    build_inputs(root)
    return root


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_unknown_config_key_exits_2_naming_key_and_file(tmp_path, module):
    config = tmp_path / "typo.yaml"
    config.write_text(Path(DEMO_CONFIG).read_text().replace("  warmup_steps:", "  warmup_step:"))
    done = run(module, ["--config", str(config), *demo_paths(tmp_path)], timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    line = last_line(done.stderr)
    assert "unknown key training.warmup_step" in line and str(config) in line
    assert not (tmp_path / "results").exists()  # nothing was started or written


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_wrong_type_exits_2_naming_the_key(tmp_path, module):
    done = run(module, ["--config", DEMO_CONFIG, *demo_paths(tmp_path), "training.max_steps=many"], timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "training.max_steps must be int, got str 'many'" in last_line(done.stderr)
    assert not (tmp_path / "results").exists()


def test_malformed_training_row_names_the_file(inputs, tmp_path):
    data = tmp_path / "data"
    bad = data / "train" / "algebra" / "0.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps({"problem": "What is $1+1$?", "solution": "It is two.", "level": "Level 1"}))
    args = ["--config", DEMO_CONFIG, *demo_paths(inputs), f"data.train_source={data}",
            f"paths.results_dir={tmp_path / 'results'}"]
    done = run("train_daemon", args)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{bad}: solution has no balanced \\boxed{{...}}" in last_line(done.stderr)


def test_malformed_test_row_names_file_and_line(inputs, tmp_path):
    test_set = tmp_path / "test.jsonl"
    good = {"problem": "What is $1+1$?", "solution": "$\\boxed{2}$", "level": "Level 1", "type": "Algebra"}
    test_set.write_text(json.dumps(good) + "\n" + '{"problem": "cut short\n')
    args = ["--config", DEMO_CONFIG, *demo_paths(tmp_path), f"evaluation.test_source={test_set}",
            "evaluation.engine=hf", "--once"]
    done = run("eval_daemon", args)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{test_set} line 2: not valid JSON" in last_line(done.stderr)


def test_model_path_that_does_not_exist_is_named(inputs, tmp_path):
    missing = tmp_path / "no_such_model"
    done = run("train_daemon", ["--config", DEMO_CONFIG, *demo_paths(inputs), f"model.name_or_path={missing}",
                                f"paths.results_dir={tmp_path / 'results'}"])
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"model.name_or_path: model directory {missing} does not exist" in last_line(done.stderr)

    # bin/eval --checkpoint with a path that does not exist: the same kind of error, nothing recorded.
    db = tmp_path / "results" / "results.duckdb"
    done = run("eval_daemon", ["--config", DEMO_CONFIG, *demo_paths(inputs), f"paths.results_dir={tmp_path / 'results'}",
                               "evaluation.engine=hf", "--checkpoint", str(missing)])
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"--checkpoint {missing}: no such model directory" in done.stderr
    assert evaluations(db) == []


def test_model_config_that_contradicts_itself_is_named(inputs, tmp_path):
    """A config.json that transformers refuses (3 layers declared, 2 layer types listed): one line, exit 2."""
    import shutil

    model = tmp_path / "bad_model"
    shutil.copytree(inputs / "model", model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] + 1}))
    done = run("train_daemon", ["--config", DEMO_CONFIG, *demo_paths(inputs), f"model.name_or_path={model}",
                                f"paths.results_dir={tmp_path / 'results'}"])
    assert done.returncode == 2, done.stderr[-2000:]
    line = last_line(done.stderr)
    assert f"from '{model}'" in line and "set model" in line and "layer_types" in line
    assert "Traceback" not in done.stderr
