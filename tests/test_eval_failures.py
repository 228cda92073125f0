"""What a bad checkpoint, a failing machine and a stop signal get, unit by unit (issue 14 items 2,
4, 6, 8, 9, 10, 11, 12): the real checks, engines and store on the tiny model, no daemon process
(tests/test_faults.py runs the daemons).

    bin/test tests/test_eval_failures.py
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from common.config import ConfigError
from common.contract import Layout
from common.store.writer import eval_key
from eval_daemon.engines.base import CheckpointLoadError, Sampling, check_model_dir
from eval_daemon.shutdown import Shutdown, StopSignal


def _edit_tensors(model_dir: Path, edit) -> None:
    tensors = load_file(model_dir / "model.safetensors")
    edit(tensors)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


TENSOR_DAMAGE = {
    "missing": (lambda t: t.pop("model.layers.0.mlp.up_proj.weight"), "missing tensors model.layers.0.mlp.up_proj"),
    "unexpected": (lambda t: t.update({"model.layers.9.extra.weight": t["model.norm.weight"].clone()}),
                   "unexpected tensors model.layers.9.extra.weight"),
    "mis-shaped": (lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:-1].clone()}),
                   "mis-shaped tensors model.norm.weight"),
}


@pytest.mark.slow  # loads a real model
@pytest.mark.parametrize("damage", list(TENSOR_DAMAGE))
def test_tensors_that_do_not_match_the_architecture_fail_the_load(tmp_path, tiny_model_dir, damage):
    """Item 2: a fresh engine would fill a missing tensor with random weights and evaluate them."""
    from eval_daemon.engines.hf import HfEngine

    edit, message = TENSOR_DAMAGE[damage]
    broken = tmp_path / damage
    shutil.copytree(tiny_model_dir, broken)
    _edit_tensors(broken, edit)
    with pytest.raises(CheckpointLoadError, match=message):
        check_model_dir(str(broken))
    engine = HfEngine("cpu", "float32", batch_size=2, max_model_len=256, seed=0, tokenizer_fallback="")
    with pytest.raises(CheckpointLoadError, match=message):  # the start path, not only the in-place copy
        engine.load(str(broken))
    assert engine.model is None


@pytest.mark.timeout(60)
def test_a_fifo_or_dangling_link_in_a_checkpoint_is_a_failed_load_not_a_hang(tmp_path, tiny_model_dir):
    """Item 8: safetensors and tokenizer reads would block on a FIFO forever."""
    for name in ("model.safetensors", "tokenizer.json", "notes"):
        broken = tmp_path / name.replace(".", "_")
        shutil.copytree(tiny_model_dir, broken)
        (broken / name).unlink(missing_ok=True)
        os.mkfifo(broken / name)
        with pytest.raises(CheckpointLoadError, match="is a FIFO"):
            check_model_dir(str(broken))
    dangling = tmp_path / "dangling"
    shutil.copytree(tiny_model_dir, dangling)
    (dangling / "extra.json").symlink_to(tmp_path / "nowhere")
    with pytest.raises(CheckpointLoadError, match="cannot be read"):
        check_model_dir(str(dangling))


def test_eval_key_changes_with_everything_that_changes_a_number(tiny_model_dir, math_dir):
    """Item 4: prompt template, the problems themselves, grader version, max_model_len, dtype, engine,
    entropy method."""
    from common.config import load_config
    from common.data import load_math
    from eval_daemon.fingerprint import fingerprint, keyed_inputs

    config = load_config(None, [f"evaluation.test_source={math_dir}"])
    examples = load_math(str(math_dir), "test")
    sampling = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 16, "stop": ["</answer>"], "seed": 0}

    def key(template="T {question}", problems=examples, engine="hf", dtype="float32", cfg=config, **overrides):
        keyed = {**keyed_inputs(cfg, template, problems, engine, dtype), **overrides}
        return eval_key("math", sampling, 0, 0, keyed)

    base = key()
    assert key() == base  # stable
    other_data = [examples[0].__class__(**{**examples[0].__dict__, "answer": "42"}), *examples[1:]]
    changed = [key(template="U {question}"), key(problems=other_data), key(problems=examples[:-1]),
               key(grader_version="2"), key(engine="vllm"), key(dtype="bfloat16"),
               key(entropy_method="vllm_prompt_logprobs_top20_lower_bound"),
               key(cfg=load_config(None, [f"evaluation.test_source={math_dir}", "evaluation.max_model_len=4096"]))]
    assert base not in changed and len(set(changed)) == len(changed)
    printed = fingerprint(keyed_inputs(config, "T {question}", examples, "hf", "float32"), sampling, "hf", "cpu")
    assert printed["device"] == "cpu" and printed["engine_version"].startswith("transformers==")
    assert printed["deterministic_scheduling"] is True and len(printed["problems_sha256"]) == 64


@pytest.mark.slow  # decodes with a real model
def test_a_stop_swallowed_in_a_destructor_still_stops_generation(tiny_model_dir):
    """Item 9: Python discards an exception raised inside __del__; the flag, checked in the
    generation loop, still abandons the evaluation."""
    from eval_daemon.engines.hf import HfEngine

    stop = StopSignal()
    engine = HfEngine("cpu", "float32", batch_size=1, max_model_len=256, seed=0, tokenizer_fallback="")
    engine.load(str(tiny_model_dir))
    engine.interrupt = stop.check
    batches = []

    class Finalised:
        def __del__(self):
            stop._handle(signal.SIGTERM, None)  # what a signal arriving inside a destructor does

    original = engine._generate_batch

    def generate_batch(*args):
        batches.append(1)
        if len(batches) == 1:
            with stop.abortable():
                Finalised()  # the Shutdown raised in its __del__ is printed and discarded by Python
        return original(*args)

    engine._generate_batch = generate_batch
    with pytest.raises(Shutdown):
        engine.generate(["a", "b", "c", "d"], Sampling(1.0, 1.0, 4, (), 0), progress=False)
    assert stop.requested and len(batches) == 1  # stopped at the next batch, not after all four
    engine.close()


def test_the_store_path_is_checked_before_any_work(tmp_path):
    """Item 12: a mistyped results directory is an error, not silently created; a read-only one too."""
    from eval_daemon.startup import check_store

    with pytest.raises(ConfigError, match="does not exist"):
        check_store(Layout(tmp_path / "reslts"))
    assert not (tmp_path / "reslts").exists()
    (tmp_path / "results").mkdir()
    check_store(Layout(tmp_path / "results"))
    (tmp_path / "results" / "results.duckdb").mkdir()
    with pytest.raises(ConfigError, match="not a regular file"):
        check_store(Layout(tmp_path / "results"))
    read_only = tmp_path / "ro"
    read_only.mkdir()
    with _read_only(read_only):
        with pytest.raises(ConfigError, match="cannot be written"):
            check_store(Layout(read_only))


@contextlib.contextmanager
def _read_only(path: Path):
    """path made unwritable: permission bits, or (as root, who ignores them) a read-only bind mount."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, 0o755)
        return
    if subprocess.run(["mount", "--bind", str(path), str(path)]).returncode != 0:
        pytest.skip("cannot bind-mount here to make a directory read-only for root")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_leftovers_of_a_killed_attempt_are_removed_and_committed_ones_renamed(tmp_path):
    """Item 11: temporaries of dead writers and uncommitted eval logs go; a committed one is renamed."""
    from eval_daemon.startup import clean_leftovers

    layout = Layout(tmp_path)
    logs = layout.eval_logs
    logs.mkdir(parents=True)
    dead = _dead_pid()
    temp = logs / f".tmp-eval_step_1_x.jsonl-{dead}"
    temp.write_text("half")
    os.utime(temp, (0, 0))
    me = "host-w"

    def attempt(step: int, started: str) -> list[Path]:
        log = logs / f"eval_step_{step}_20260101T00000{step}Z.{me}.uncommitted.jsonl"
        summary = logs / f"summary_eval_step_{step}_20260101T00000{step}Z.{me}.uncommitted.json"
        log.write_text("{}\n")
        summary.write_text(json.dumps({"run_id": "r", "step": step, "eval_key": "k", "started_at": started}))
        return [log, summary]

    killed = attempt(1, "2026-01-01T00:00:01.000Z")
    committed = attempt(2, "2026-01-01T00:00:02.000Z")
    deleted = clean_leftovers(layout, me, {("r", 2, "k", "2026-01-01T00:00:02.000Z")})
    assert sorted(deleted) == sorted([temp, *killed])
    assert sorted(p.name for p in logs.iterdir()) == ["eval_step_2_20260101T000002Z.jsonl",
                                                      "summary_eval_step_2_20260101T000002Z.json"]
    assert all(not p.exists() for p in committed)


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid
