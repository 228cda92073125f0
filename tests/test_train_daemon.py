"""The trainer daemon as a real process (`python -m train_daemon`, what bin/train execs) on the
tiny Qwen2 model: publishing, kill -9 mid-publish, resume, SIGTERM, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from common.contract import read_manifest, read_sidecar
from train_daemon.background import TEST_FAULT_ENV, TEST_FAULT_FROM_STEP_ENV
from train_daemon.publisher import TEST_DELAY_ENV, TEST_DELAY_FROM_STEP_ENV

pytestmark = pytest.mark.slow  # real processes

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS, EVAL_EVERY = 12, 4


def _args(model_dir, data_dir, output_dir, run_id, **extra):
    settings = {
        "model.name_or_path": model_dir, "data.train_source": data_dir, "model.max_seq_length": 256,
        "training.batch_size": 2, "training.gradient_accumulation_steps": 2, "training.max_steps": MAX_STEPS,
        "training.eval_every": EVAL_EVERY, "training.save_resume_every": 4, "training.warmup_steps": 2,
        "training.learning_rate": 1e-3, "paths.results_dir": output_dir, "training.run_id": run_id,
        "training.device": "cpu", "logging.wandb": False, "logging.progress_bar": False, **extra,
    }
    return [f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in settings.items()]


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TOKENIZERS_PARALLELISM": "false", **extra}
    for name in (TEST_DELAY_ENV, TEST_DELAY_FROM_STEP_ENV, TEST_FAULT_ENV, TEST_FAULT_FROM_STEP_ENV):
        if name not in extra:
            env.pop(name, None)
    return env


def _start(args, stderr_path, **env):
    """A trainer in the background; stderr goes to a file (a pipe nobody reads could fill and block it)."""
    with open(stderr_path, "w") as stderr:
        return subprocess.Popen([sys.executable, "-m", "train_daemon", *args], cwd=REPO_ROOT, env=_env(**env),
                                stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def _run(args, timeout=240, **env):
    return subprocess.run([sys.executable, "-m", "train_daemon", *args], cwd=REPO_ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def _log(output_dir, run_id):
    path = Path(output_dir) / "runs" / run_id / "train_log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _wait_for(condition, process, stderr_path, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert process.poll() is None, f"trainer exited early:\n{Path(stderr_path).read_text()[-3000:]}"
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"condition not met in {timeout} s")


def _resume_step(output_dir, run_id):
    pointer = Path(output_dir) / "runs" / run_id / "resume" / "latest.json"
    return json.loads(pointer.read_text())["step"] if pointer.exists() else None


def _assert_same_curve(log, reference):
    assert [r["train_step"] for r in log] == list(range(1, MAX_STEPS + 1))
    assert [r["train_step"] for r in reference] == list(range(1, MAX_STEPS + 1))
    for mine, theirs in zip(log, reference):
        assert mine["train/loss"] == pytest.approx(theirs["train/loss"], abs=1e-5), mine["train_step"]
        assert mine["train/learning_rate"] == pytest.approx(theirs["train/learning_rate"])
        assert mine["train/tokens_seen"] == theirs["train/tokens_seen"]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """An uninterrupted run: the yardstick for the interrupted ones."""
    root = tmp_path_factory.mktemp("reference")
    data = _write_math(root)
    output = root / "results"
    result = _run(_args(tiny_model_dir, data, output, "ref"))
    assert result.returncode == 0, result.stderr[-3000:]
    return {"data": data, "output": output, "stderr": result.stderr, "log": _log(output, "ref")}


def _write_math(root):
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from conftest import write_math_layout

    return write_math_layout(root / "MATH")


def test_run_publishes_step_0_then_every_eval_every_steps_and_each_loads(reference, tiny_model_dir):
    run_dir = reference["output"] / "checkpoints" / "ref"
    manifest = read_manifest(run_dir)
    assert manifest.steps() == [0, 4, 8, 12]
    assert set(manifest.checkpoints[-1].metrics) == {"train_loss", "learning_rate", "tokens_seen", "epoch"}
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []
    base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    for entry in manifest.checkpoints:
        directory = run_dir / entry.path
        model = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True)
        sidecar = read_sidecar(directory)
        assert sidecar.step == entry.step and sidecar.wandb_group == "ref"
        assert sidecar.config["training"]["run_id"] == "ref" and sidecar.config["model"]["max_seq_length"] == 256
        same_as_base = torch.equal(model.state_dict()["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
        assert same_as_base == (entry.step == 0)  # step 0 is the base model; training changes the rest
    assert manifest.checkpoints[0].metrics["tokens_seen"] == 0
    assert manifest.checkpoints[-1].metrics["tokens_seen"] == reference["log"][-1]["train/tokens_seen"]
    assert manifest.checkpoints[-1].metrics["train_loss"] < reference["log"][0]["train/loss"]
    log = reference["log"]
    assert [r["train_step"] for r in log] == list(range(1, MAX_STEPS + 1))
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second"} <= set(log[0])
    config = json.loads((reference["output"] / "runs" / "ref" / "config.json").read_text())
    assert config["logging"]["wandb_group"] == "ref"


def test_kill_9_mid_publish_damages_nothing_and_resume_matches_an_uninterrupted_run(reference, tiny_model_dir):
    output = reference["output"].parent / "killed"
    args = _args(tiny_model_dir, reference["data"], output, "k")
    run_dir = output / "checkpoints" / "k"
    # Steps 0 and 4 publish at once; step 8's write hangs in the background, training goes on, and
    # at step 12 the trainer waits for it (one write in flight). Resume state was saved at step 8.
    stderr = output.parent / "killed.stderr"
    process = _start(args, stderr, **{TEST_DELAY_ENV: "120", TEST_DELAY_FROM_STEP_ENV: "8"})
    _wait_for(lambda: len(_log(output, "k")) >= 12 and list(run_dir.glob(".tmp-step_000008-*"))
              and _resume_step(output, "k") == 8, process, stderr)
    process.kill()  # SIGKILL
    process.wait()

    manifest = read_manifest(run_dir)
    assert manifest.steps() == [0, 4]  # nothing partial listed
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_000000", "step_000004"]
    for step_dir in run_dir.glob("step_*"):
        AutoModelForCausalLM.from_pretrained(step_dir, use_safetensors=True)

    result = _run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from step 8" in result.stderr
    assert read_manifest(run_dir).steps() == [0, 4, 8, 12]
    assert not list(run_dir.glob(".tmp-*"))
    _assert_same_curve(_log(output, "k"), reference["log"])
    # Step 8 was re-published from the resume state: the same weights as the uninterrupted run's.
    mine = load_file(str(run_dir / "step_000008" / "model.safetensors"))
    theirs = load_file(str(reference["output"] / "checkpoints" / "ref" / "step_000008" / "model.safetensors"))
    for name, tensor in theirs.items():
        torch.testing.assert_close(mine[name], tensor, atol=1e-6, rtol=1e-5)


def test_kill_9_during_the_step_0_publish_then_resume_publishes_the_base_model(reference, tiny_model_dir):
    output = reference["output"].parent / "killed0"
    args = _args(tiny_model_dir, reference["data"], output, "k0", **{"training.save_resume_every": 2})
    run_dir = output / "checkpoints" / "k0"
    stderr = output.parent / "killed0.stderr"
    process = _start(args, stderr, **{TEST_DELAY_ENV: "120"})
    _wait_for(lambda: len(_log(output, "k0")) >= 4 and list(run_dir.glob(".tmp-step_000000-*"))
              and _resume_step(output, "k0") == 2, process, stderr)
    process.kill()
    process.wait()
    assert not (run_dir / "manifest.json").exists() and not list(run_dir.glob("step_*"))

    result = _run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from step 2" in result.stderr
    assert read_manifest(run_dir).steps() == [0, 4, 8, 12]
    base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    step0 = load_file(str(run_dir / "step_000000" / "model.safetensors"))
    assert all(torch.equal(step0[name], tensor) for name, tensor in base.items())
    _assert_same_curve(_log(output, "k0"), reference["log"])


def test_sigterm_finishes_the_step_saves_resume_state_and_waits_for_the_publish(reference, tiny_model_dir):
    output = reference["output"].parent / "sigterm"
    # W&B on (offline) here, so its clean finish on SIGTERM is part of what is checked.
    args = _args(tiny_model_dir, reference["data"], output, "t",
                 **{"training.save_resume_every": 100, "logging.wandb": True})
    stderr_path = output.parent / "sigterm.stderr"
    process = _start(args, stderr_path, **{TEST_DELAY_ENV: "3", "WANDB_MODE": "offline"})  # step-0 write: 3 s
    _wait_for(lambda: len(_log(output, "t")) >= 1, process, stderr_path)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    stderr = stderr_path.read_text()
    assert process.returncode == 0, stderr[-3000:]
    stopped_at = len(_log(output, "t"))
    assert 1 <= stopped_at < MAX_STEPS and "stopped at step" in stderr
    assert _resume_step(output, "t") == stopped_at
    run_dir = output / "checkpoints" / "t"
    assert 0 in read_manifest(run_dir).steps()  # the in-flight publish completed
    assert not list(run_dir.glob(".tmp-*"))
    (wandb_run,) = (output / "wandb").glob("offline-run-*")
    assert list(wandb_run.glob("*.wandb"))


def test_starting_a_finished_run_again_publishes_and_trains_nothing(reference, tiny_model_dir):
    run_dir = reference["output"] / "checkpoints" / "ref"
    manifest_before = (run_dir / "manifest.json").read_text()
    log_before = (reference["output"] / "runs" / "ref" / "train_log.jsonl").read_text()
    result = _run(_args(tiny_model_dir, reference["data"], reference["output"], "ref"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from step 12 of 12" in result.stderr and "published" not in result.stderr
    assert (run_dir / "manifest.json").read_text() == manifest_before
    assert (reference["output"] / "runs" / "ref" / "train_log.jsonl").read_text() == log_before


@pytest.mark.parametrize("override, key", [
    ("training.no_such_key=1", "training.no_such_key"),
    ("training.batch_size=four", "training.batch_size"),
    ("training.eval_every=0", "training.eval_every"),
])
def test_config_errors_exit_2_with_one_line_naming_the_key(tmp_path, override, key):
    result = _run(["--config", "config/sft_config.yaml", f"paths.results_dir={tmp_path}", override], timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_model_path_is_one_clear_error(tmp_path, math_dir):
    result = _run([f"model.name_or_path={tmp_path}/no-such-model", f"data.train_source={math_dir}",
                   f"paths.results_dir={tmp_path}"], timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "no-such-model does not exist" in line and "model.name_or_path" in line


def test_unreadable_dataset_is_one_clear_error(tmp_path, tiny_model_dir):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"problem": "What is 1+1?", "solution": "$\\\\boxed{2}$"}\n{not json\n')
    result = _run([f"model.name_or_path={tiny_model_dir}", f"data.train_source={bad}",
                   f"paths.results_dir={tmp_path}"], timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "train.jsonl line 2" in line


# ---- background writes that fail (disk full, any exception): reported, nothing damaged, resumable


def _assert_published_intact(run_dir, steps, reference_output):
    """The manifest lists exactly `steps`, each a complete directory with the uninterrupted run's weights."""
    assert read_manifest(run_dir).steps() == steps
    assert sorted(p.name for p in run_dir.iterdir() if p.name != "manifest.json") == [f"step_{s:06d}" for s in steps]
    for step in steps:
        mine = load_file(str(run_dir / f"step_{step:06d}" / "model.safetensors"))
        theirs = load_file(str(reference_output / "checkpoints" / "ref" / f"step_{step:06d}" / "model.safetensors"))
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs), step


def _assert_resumes_to_the_end(args, output, run_id, resumed_from, reference):
    result = _run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from step {resumed_from}" in result.stderr
    _assert_published_intact(output / "checkpoints" / run_id, [0, 4, 8, 12], reference["output"])
    _assert_same_curve(_log(output, run_id), reference["log"])


@pytest.mark.parametrize("fault", ["enospc", "error"])
def test_a_failed_background_write_exits_1_damages_nothing_and_the_run_resumes(reference, tiny_model_dir, fault):
    """Both writers fail from step 8 on (an injected ENOSPC, or a RuntimeError as torch.save raises on
    a full disk). A full disk stops training within a step or two; another error lets it go on."""
    output = reference["output"].parent / f"fault-{fault}"
    args = _args(tiny_model_dir, reference["data"], output, fault)
    result = _run(args, **{TEST_FAULT_ENV: fault, TEST_FAULT_FROM_STEP_ENV: "8"})
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    _assert_published_intact(output / "checkpoints" / fault, [0, 4], reference["output"])
    assert _resume_step(output, fault) == 4
    assert not list((output / "runs" / fault / "resume").glob(".tmp-*"))
    trained = len(_log(output, fault))
    assert 8 <= trained < MAX_STEPS if fault == "enospc" else trained == MAX_STEPS
    _assert_resumes_to_the_end(args, output, fault, 4, reference)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted at tmp_path/disk (needs root and permission to mount; skipped otherwise)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _tree_bytes(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def test_a_full_filesystem_stops_training_damages_nothing_and_resumes_after_space_is_freed(
        reference, tiny_model_dir, small_disk):
    ref_run = reference["output"] / "checkpoints" / "ref"
    checkpoint, resume = _tree_bytes(ref_run / "step_000004"), _tree_bytes(reference["output"] / "runs" / "ref" / "resume")
    # Room for steps 0 and 4 and one resume state, not for the step-8 checkpoint as well.
    size_kib = (2 * checkpoint + resume + checkpoint // 2) // 1024 + 64
    subprocess.run(["mount", "-o", f"remount,size={size_kib}k", str(small_disk)], check=True)
    output = small_disk / "results"
    args = _args(tiny_model_dir, reference["data"], output, "full")
    result = _run(args)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    _assert_published_intact(output / "checkpoints" / "full", [0, 4], reference["output"])
    assert _resume_step(output, "full") == 4
    assert len(_log(output, "full")) < MAX_STEPS  # it stopped instead of training on into a full disk

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space freed
    _assert_resumes_to_the_end(args, output, "full", 4, reference)
