"""bin/train on 2 ranks (torchrun, gloo, FSDP2) on the tiny Qwen2 model, against 1 process: the same
steps, the same checkpoints (read through the filesystem contract), and resume after kill -9 of
torchrun's process group."""

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
from test_train_daemon import _args, _env, _log, _resume_step, _write_math

from common.contract import WarnOnce, read_manifest, read_sidecar, scan_published
from train_daemon.background import TEST_FAULT_ENV, TEST_FAULT_FROM_STEP_ENV
from train_daemon.batching import TokenizedExample, build_micro_batches
from train_daemon.distributed import World, rank_slice, step_share
from train_daemon.publisher import TEST_DELAY_ENV, TEST_DELAY_FROM_STEP_ENV

REPO_ROOT = Path(__file__).resolve().parents[1]
def _torchrun(ranks):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]


TORCHRUN = _torchrun(2)
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # 2 ranks on 2 cores


def _train(args, ranks, timeout=170, **env):
    launcher = _torchrun(ranks) if ranks > 1 else [sys.executable]
    return subprocess.run([*launcher, "-m", "train_daemon", *args], cwd=REPO_ROOT, env=_env(**ONE_THREAD, **env),
                          capture_output=True, text=True, timeout=timeout)


def _weights(output, run_id, step):
    return load_file(str(Path(output) / "checkpoints" / run_id / f"step_{step:06d}" / "model.safetensors"))


def test_the_ranks_slices_are_the_step_and_every_rank_counts_the_whole_step_alike():
    examples = [TokenizedExample(input_ids=list(range(3 + i)), labels=[-100] * 2 + list(range(1 + i)))
                for i in range(7)]
    indices = [6, 2, 0, 5, 3, 1, 4]
    for size in (1, 2, 3):
        worlds = [World(rank=rank, size=size) for rank in range(size)]
        assert [i for world in worlds for i in rank_slice(indices, world)] == indices
        shares = {step_share(examples, indices, world, 2, True, 8) for world in worlds}
        assert len(shares) == 1  # computed without communicating: every rank must get the same
        (share,) = shares
        whole = build_micro_batches(examples, indices, 2, True, 0, 8)
        assert share.target_tokens == sum(mb.num_target_tokens for mb in whole)
        assert share.tokens == sum(mb.num_tokens for mb in whole)
        per_rank = [len(build_micro_batches(examples, rank_slice(indices, w), 2, True, 0, 8)) for w in worlds]
        assert share.micro_batches == max(per_rank)


@pytest.mark.slow  # real processes
def test_two_ranks_train_the_same_steps_as_one_process(tmp_path, tiny_model_dir):
    """3 examples a step, one example per micro-batch: rank 0 runs 2 micro-batches, rank 1 one and a
    filler; the loss, the gradient norm and the weights must still be those of 1 process."""
    data = _write_math(tmp_path)
    extra = {"training.max_steps": 2, "training.eval_every": 2, "training.batch_size": 3,
             "training.gradient_accumulation_steps": 1, "training.max_tokens_per_micro_batch": 1}
    results = {}
    for ranks in (1, 2):
        output = tmp_path / f"ranks{ranks}"
        result = _train(_args(tiny_model_dir, data, output, "r", **extra), ranks)
        assert result.returncode == 0, result.stderr[-3000:]
        results[ranks] = output
    one, two = _log(results[1], "r"), _log(results[2], "r")
    assert [r["train_step"] for r in two] == [1, 2]
    for mine, theirs in zip(two, one):
        assert mine["train/loss"] == pytest.approx(theirs["train/loss"], rel=1e-5)
        assert mine["train/grad_norm"] == pytest.approx(theirs["train/grad_norm"], rel=1e-5)
        assert mine["train/tokens_seen"] == theirs["train/tokens_seen"]
    reference, sharded = _weights(results[1], "r", 2), _weights(results[2], "r", 2)
    assert sorted(sharded) == sorted(reference)  # complete HF weights, tied embeddings stored once
    for name, tensor in reference.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(reference["model.norm.weight"], _weights(results[1], "r", 0)["model.norm.weight"])


def _ranks_of(launcher_pid: int) -> list[int]:
    """The worker processes torchrun started (children of its pid)."""
    children = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:  # the process ended while we looked
            continue
        if fields.get("PPid", "").strip() == str(launcher_pid):
            children.append(int(status.parent.name))
    return children


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:  # no such process
        return True
    return state in ("Z", "X")


RUN = {"training.max_steps": 8, "training.eval_every": 2, "training.save_resume_every": 2}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    """An uninterrupted 2-rank run of 8 steps: the yardstick for the interrupted ones."""
    root = tmp_path_factory.mktemp("distributed")
    data = _write_math(root)
    result = _train(_args(tiny_model_dir, data, root / "reference", "ref", **RUN), 2)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"root": root, "data": data, "output": root / "reference"}


def _assert_same_run(output, run_id, reference):
    manifest = read_manifest(output / "checkpoints" / run_id)
    assert manifest.steps() == [0, 2, 4, 6, 8]
    assert [c.step for c in scan_published(output / "checkpoints", WarnOnce())] == [0, 2, 4, 6, 8]
    assert read_sidecar(output / "checkpoints" / run_id / "step_000008").step == 8
    log, ref_log = _log(output, run_id), _log(reference["output"], "ref")
    assert [r["train_step"] for r in log] == list(range(1, 9))
    for mine, theirs in zip(log, ref_log):
        assert mine["train/loss"] == pytest.approx(theirs["train/loss"], abs=1e-5), mine["train_step"]
        assert mine["train/tokens_seen"] == theirs["train/tokens_seen"]
    resumed, uninterrupted = _weights(output, run_id, 8), _weights(reference["output"], "ref", 8)
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, msg=name)
    state = json.loads((output / "runs" / run_id / "resume" / "step_000008" / "state.json").read_text())
    assert state["ranks"] == 2 and state["step"] == 8


@pytest.mark.slow  # real processes
def test_kill_9_of_torchrun_then_resume_trains_the_same_run(reference, tiny_model_dir):
    tmp_path = reference["root"]
    output = tmp_path / "killed"
    args = _args(tiny_model_dir, reference["data"], output, "k", **RUN)
    # From step 4 each publish hangs in rank 0's background writer: resume state is saved at 4, the
    # torchrun group is killed while step 4's checkpoint is still being written.
    with open(tmp_path / "killed.stderr", "w") as stderr:
        # bin/train's shortcut: the process becomes torchrun (exec), whose group is killed below.
        launcher = subprocess.Popen([sys.executable, "-m", "train_daemon", "--nproc", "2", *args], cwd=REPO_ROOT,
                                    start_new_session=True,
                                    env=_env(**ONE_THREAD, **{TEST_DELAY_ENV: "60", TEST_DELAY_FROM_STEP_ENV: "4"}),
                                    stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 120
    while (_resume_step(output, "k") or 0) < 4:
        assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.stderr").read_text()[-3000:]
        time.sleep(0.2)
    ranks = _ranks_of(launcher.pid)
    assert len(ranks) == 2
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 20
    while not all(_gone(pid) for pid in ranks):  # the ranks die with torchrun, they do not train on
        assert time.monotonic() < deadline, f"ranks {ranks} outlived torchrun"
        time.sleep(0.1)
    assert read_manifest(output / "checkpoints" / "k").steps() == [0, 2]  # step 4 was mid-write

    result = _train(args, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_run(output, "k", reference)


@pytest.mark.slow  # real processes
def test_a_full_disk_stops_all_ranks_keeps_the_last_state_and_the_run_resumes(reference, tiny_model_dir):
    """From step 4 every write fails with ENOSPC (rank 0's checkpoint, every rank's resume shards):
    all ranks stop, exit non-zero, nothing half-written stays; with space back the run resumes."""
    output = reference["root"] / "full"
    args = _args(tiny_model_dir, reference["data"], output, "f", **RUN)
    result = _train(args, 2, **{TEST_FAULT_ENV: "enospc", TEST_FAULT_FROM_STEP_ENV: "4"})
    assert result.returncode != 0
    assert read_manifest(output / "checkpoints" / "f").steps() == [0, 2]
    assert _resume_step(output, "f") == 2
    resume_dir = output / "runs" / "f" / "resume"
    assert sorted(p.name for p in resume_dir.iterdir()) == ["latest.json", "step_000002"]
    assert [p.name for p in (output / "checkpoints" / "f").iterdir() if p.name.startswith(".")] == []
    assert max(r["train_step"] for r in _log(output, "f")) < 8

    result = _train(args, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_run(output, "f", reference)


@pytest.mark.slow  # real processes
def test_a_sharded_state_resumes_on_another_number_of_ranks(tmp_path, tiny_model_dir):
    """4 steps on 2 ranks, then 4 more on 3 from the sharded state, against 8 on 2 (a constant
    learning rate after warmup, so the first part's shorter schedule does not matter)."""
    data = _write_math(tmp_path)
    run = {**RUN, "training.min_lr_ratio": 1.0}
    result = _train(_args(tiny_model_dir, data, tmp_path / "reference", "ref", **run), 2)
    assert result.returncode == 0, result.stderr[-3000:]
    output = tmp_path / "reshard"
    result = _train(_args(tiny_model_dir, data, output, "re", **{**run, "training.max_steps": 4}), 2)
    assert result.returncode == 0, result.stderr[-3000:]
    first_part = _log(output, "re")
    result = _train(_args(tiny_model_dir, data, output, "re", **run), 3)
    assert result.returncode == 0, result.stderr[-3000:]
    log, ref_log = _log(output, "re"), _log(tmp_path / "reference", "ref")
    assert [r["train_step"] for r in log] == list(range(1, 9))
    assert log[:4] == first_part  # resumed at step 4 (a restart would have rewritten steps 1-4)
    for mine, theirs in zip(log, ref_log):
        assert mine["train/loss"] == pytest.approx(theirs["train/loss"], abs=1e-5), mine["train_step"]
    for name, tensor in _weights(tmp_path / "reference", "ref", 8).items():
        torch.testing.assert_close(_weights(output, "re", 8)[name], tensor, msg=name)
    assert json.loads((output / "runs" / "re" / "resume" / "step_000008" / "state.json").read_text())["ranks"] == 3
