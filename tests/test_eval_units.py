"""Eval daemon pieces on their own: scheduling, the watchdog watcher, entropy, one evaluation with
the real grader and store, and the Hugging Face engine on the tiny model.

    bin/test tests/test_eval_units.py
"""

from __future__ import annotations

import json
import logging
import math
import queue
import shutil
from pathlib import Path

import pytest

from common.contract import (MANIFEST_NAME, Checkpoint, Sidecar, WarnOnce, checkpoint_from_argument, marker_path,
                             publish_checkpoint, scan_published)
from common.data import load_math
from common.grading import Grader
from eval_daemon.engines.base import CheckpointLoadError, Generation, Sampling, check_model_dir, model_fingerprint
from eval_daemon.engines.hf import HfEngine
from eval_daemon.entropy import sample_indices
from eval_daemon.evaluate import EvalSet, run_evaluation
from eval_daemon.records import commit_and_mark, commit_eval_files, write_analysis_files, write_eval_files
from eval_daemon.schedule import pending
from eval_daemon.watcher import start_observer, stop_observer, wait_for_change


def _publish_dummy(root: Path, run_id: str, step: int) -> Path:
    """A published checkpoint whose 'model' is one small file (the schedule never loads it)."""
    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
    return publish_checkpoint(root / run_id, run_id, step, write, Sidecar(run_id=run_id, step=step), {"loss": 1.0})


# ---- schedule ------------------------------------------------------------------------------------


def test_scan_ignores_bad_manifests_and_stray_dirs_with_one_warning_each(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    for step in (10, 20):
        _publish_dummy(root, "run_a", step)
    _publish_dummy(root, "run_b", 5)
    (root / "broken").mkdir()
    (root / "broken" / MANIFEST_NAME).write_text("{not json")
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("not a run")
    (root / ".tmp-run").mkdir()  # temporaries are never runs and are not warned about
    (root / "run_starting" / ".tmp-step_000050-7").mkdir(parents=True)  # first checkpoint being written: quiet
    shutil.rmtree(root / "run_b" / "step_000005")  # listed in the manifest but gone
    warn = WarnOnce()
    with caplog.at_level(logging.WARNING, logger="eval_daemon.schedule"):
        first = scan_published(root, warn)
        second = scan_published(root, warn)
    assert [(c.run_id, c.step) for c in first] == [("run_a", 10), ("run_a", 20)]
    assert first == second
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages  # broken manifest, stray dir, missing step: once each over two scans
    assert any("broken" in m and "unreadable manifest" in m for m in messages)
    assert any("notes" in m and "no manifest.json" in m for m in messages)
    assert not any("run_starting" in m for m in messages)
    assert any("step 5" in m and "missing" in m for m in messages)


def _ck(run_id: str, step: int, published_at: str) -> Checkpoint:
    return Checkpoint(run_id=run_id, step=step, path=Path(f"/x/{run_id}/{step}"), run_dir=None, published_at=published_at)


def test_pending_orders_in_order_and_latest_and_skips_recorded():
    published = [_ck("a", 20, "t2"), _ck("a", 10, "t1"), _ck("a", 30, "t5"), _ck("b", 5, "t3"), _ck("b", 15, "t4")]
    recorded = {("a", 10, "k"), ("b", 5, "other-key")}
    in_order = pending(published, recorded, "k", "in_order")
    assert [(c.run_id, c.step) for c in in_order] == [("a", 20), ("a", 30), ("b", 5), ("b", 15)]
    latest = pending(published, recorded, "k", "latest")
    # Newest step of each run first (newest publication first), then the gaps in step order.
    assert [(c.run_id, c.step) for c in latest] == [("a", 30), ("b", 15), ("a", 20), ("b", 5)]
    assert pending(published, {(c.run_id, c.step, "k") for c in published}, "k", "latest") == []


def test_checkpoint_from_argument(tmp_path, tiny_model_dir):
    published = _publish_dummy(tmp_path / "checkpoints", "run_x", 40)
    from_run = checkpoint_from_argument(str(published))
    assert (from_run.run_id, from_run.step, from_run.run_dir) == ("run_x", 40, tmp_path / "checkpoints" / "run_x")
    plain = checkpoint_from_argument(str(tiny_model_dir))
    assert (plain.run_id, plain.step, plain.run_dir) == (str(tiny_model_dir.resolve()), 0, None)
    # Item 5: two external models both called model/ get different run ids; --run-id names one.
    other = tmp_path / "elsewhere" / tiny_model_dir.name
    shutil.copytree(tiny_model_dir, other)
    assert checkpoint_from_argument(str(other)).run_id != plain.run_id
    assert checkpoint_from_argument(str(other), run_id="baseline").run_id == "baseline"
    hub = checkpoint_from_argument("Qwen/Qwen2.5-Math-1.5B")
    assert (hub.run_id, hub.step, str(hub.path)) == ("Qwen/Qwen2.5-Math-1.5B", 0, "Qwen/Qwen2.5-Math-1.5B")


# ---- watcher -------------------------------------------------------------------------------------


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_watcher_wakes_on_manifest_replace_not_on_step_dirs(tmp_path, polling):
    root = tmp_path / "checkpoints"
    wakeups: queue.Queue = queue.Queue()
    observer = start_observer(root, wakeups, polling=polling)
    try:
        # A step directory being written (no manifest change) must not wake the loop.
        partial = root / "run_a" / ".tmp-step_000010-1"
        partial.mkdir(parents=True)
        (partial / "model.safetensors").write_bytes(b"x" * 100)
        (root / "run_a" / "step_000099").mkdir()
        assert wait_for_change(wakeups, 2.5, lambda: False) == "reconcile"
        _publish_dummy(root, "run_a", 10)  # the manifest arrives by os.replace: a move event
        assert wait_for_change(wakeups, 10, lambda: False) == "event"
        _publish_dummy(root, "run_new", 1)  # a run directory created after the observer started
        assert wait_for_change(wakeups, 10, lambda: False) == "event"
    finally:
        stop_observer(observer)
    assert wait_for_change(wakeups, 5, lambda: True) == "stop"


# ---- entropy -------------------------------------------------------------------------------------


def test_exact_entropy_of_known_distributions_in_any_chunking(monkeypatch):
    """Response means over the positions that predict the response, whatever the chunk size: a
    chunk boundary inside a response and a response spanning chunks give the same numbers."""
    import torch

    import eval_daemon.entropy as entropy

    probs = [0.5, 0.25, 0.125, 0.125]
    exact = -sum(p * math.log(p) for p in probs)
    # The identity as the LM head: each hidden state is its own logits.
    peaked, uniform = torch.log(torch.tensor(probs)), torch.zeros(4)
    responses = [torch.stack([peaked, uniform]), torch.stack([uniform]), torch.stack([peaked, peaked, uniform])]
    expected = [(exact + math.log(4)) / 2, math.log(4), (2 * exact + math.log(4)) / 3]
    for chunk in (256, 2, 1):
        monkeypatch.setattr(entropy, "CHUNK_POSITIONS", chunk)
        assert entropy.response_entropies(responses, lambda x: x) == pytest.approx(expected, rel=1e-6)
    assert entropy.response_positions(prompt_length=5, response_length=3) == slice(4, 7)


def test_entropy_subsample_is_fixed_and_seeded():
    assert sample_indices(10, 4, seed=3) == sample_indices(10, 4, seed=3)
    assert len(set(sample_indices(10, 4, seed=3))) == 4
    assert sample_indices(3, 5, seed=0) == [0, 1, 2] and sample_indices(3, 0, seed=0) == []


# ---- one evaluation, recorded --------------------------------------------------------------------


class ScriptedEngine:
    """A test double of the GenerationEngine Protocol: fixed responses, so categories are known."""

    name = "scripted"
    entropy_method = "scripted"

    def __init__(self, responses: list[tuple[str, str]]):
        self.responses = responses
        self.calls = 0

    def load(self, model_path: str) -> None:
        pass

    entropy_seconds = 0.0

    def generate(self, prompts, sampling, progress, entropy_rows=(), samples_per_prompt=1):
        self.calls += 1
        assert len(prompts) * samples_per_prompt == len(self.responses)
        return [Generation(text=t, token_ids=list(range(len(t.split()))), prompt_token_ids=[1, 2], finish_reason=f,
                           num_tokens=len(t.split()), token_entropy=0.5 if k in entropy_rows else None)
                for k, (t, f) in enumerate(self.responses)]

    def close(self) -> None:
        pass


@pytest.mark.slow  # the unparsable answer starts a real grading worker
def test_evaluation_categories_files_and_store(tmp_path, math_dir):
    examples = load_math(str(math_dir), "test")  # 7 problems; answers 5, 3, 3/4, 1, 6, 20, 3 in this order
    answers = [e.answer for e in examples]
    responses = [
        (f" add </think> <answer> {answers[0]} </answer>", "stop"),                     # correct
        (f" so </think> <answer> $x = {answers[1]}$ </answer>", "stop"),                # correct (x = 3 form)
        (" hmm </think> <answer> \\dfrac{3}{4} </answer>", "stop"),                     # correct (\dfrac)
        (" </think> <answer> 42 </answer>", "stop"),                                    # wrong answer
        (" no closing tag <answer> 6 </answer>", "stop"),                               # missing </think>
        (" thinking and thinking", "length"),                                           # incomplete generation
        (" </think> <answer> {{{{ \\frac{ </answer>", "stop"),                          # unparsable: wrong, no crash
    ]
    engine = ScriptedEngine(responses)
    eval_set = EvalSet("math", examples, [f"P: {e.problem}" for e in examples], entropy_indices=[0, 3])
    sampling = Sampling(1.0, 1.0, 32, ("</answer>",), 0)
    with Grader(workers=1) as grader:
        result = run_evaluation(engine, eval_set, sampling, grader, 5.0, progress=False)
    assert engine.calls == 1  # all prompts in one call
    categories = [s["category"] for s in result.samples]
    assert categories == ["correct", "correct", "correct", "wrong_answer", "format_failure", "format_failure",
                          "wrong_answer"]
    assert [s["format_failure_type"] for s in result.samples][4:6] == ["missing_think_close", "incomplete_generation"]
    assert [s["token_entropy"] for s in result.samples] == [0.5, None, None, 0.5, None, None, None]
    m = result.metrics
    assert (m["num_correct"], m["num_format_correct"], m["num_wrong_answer"], m["num_format_failure"]) == (3, 5, 2, 2)
    assert m["accuracy"] == pytest.approx(3 / 7) and m["format_accuracy"] == pytest.approx(5 / 7)
    assert m["entropy_sample_size"] == 2 and m["avg_token_entropy"] == pytest.approx(0.5)
    lengths = [len(t.split()) for t, _ in responses]
    assert m["avg_response_length_correct"] == pytest.approx(sum(lengths[:3]) / 3)
    assert m["avg_response_length_incorrect"] == pytest.approx(sum(lengths[3:]) / 4)

    header = {"run_id": "r", "step": 50, "eval_key": "k1", "eval_set": "math", "checkpoint_path": "/c"}
    paths = write_eval_files(tmp_path / "eval_logs", 50, "20260101T000000Z", "w1", header, result.samples,
                             result.metrics, result.timings)
    assert [p.name for p in paths] == ["eval_step_50_20260101T000000Z.w1.uncommitted.jsonl",
                                       "summary_eval_step_50_20260101T000000Z.w1.uncommitted.json"]
    commit_eval_files(paths)  # after the store commit
    write_analysis_files(tmp_path / "analysis", 50, header, result.samples, result.metrics)
    paths = [tmp_path / "eval_logs" / "eval_step_50_20260101T000000Z.jsonl",
             tmp_path / "eval_logs" / "summary_eval_step_50_20260101T000000Z.json",
             tmp_path / "analysis" / "summary_step_50.json", tmp_path / "analysis" / "categories_step_50.json"]
    assert sorted(p for p in tmp_path.rglob("*.json*") if "MATH" not in p.parts) == sorted(paths)
    lines = paths[0].read_text().splitlines()
    assert len(lines) == 7 and json.loads(lines[3])["response"] == responses[3][0]
    summary = json.loads(paths[1].read_text())
    assert summary["eval_step"] == 50 and summary["num_correct"] == 3 and summary["accuracy"] == pytest.approx(3 / 7)
    analysis = json.loads(paths[2].read_text())
    assert analysis["categorization"]["correct"] == {"count": 3, "percentage": 42.86}
    assert analysis["format_failure_analysis"]["incomplete_generation"]["count"] == 1
    assert analysis["format_failure_analysis"]["incomplete_generation"]["percentage"] == 50.0
    cats = json.loads(paths[3].read_text())["categories"]
    assert [c["problem_id"] for c in cats["wrong_answer"]] == [examples[3].problem_id, examples[6].problem_id]
    assert not list(tmp_path.rglob(".tmp-*"))

    from common.store.schema import connect_read_only

    run_dir = tmp_path / "checkpoints" / "r"
    row = {**header, "status": "ok", "worker_id": "w", **result.metrics, "sampling": sampling.as_dict()}
    db = tmp_path / "results.duckdb"
    assert commit_and_mark(db, row, result.samples, run_dir) is True
    assert commit_and_mark(db, row, result.samples, run_dir) is False  # idempotent
    assert marker_path(run_dir, 50, "k1").exists()
    with connect_read_only(db) as con:
        assert con.execute("SELECT count(*) FROM evaluations").fetchone()[0] == 1
        assert con.execute("SELECT count(*), sum(reward) FROM samples").fetchone() == (7, 3.0)


def test_k_samples_per_problem_become_numbered_rows_with_normalised_answers(tmp_path, math_dir):
    examples = load_math(str(math_dir), "test")[:2]  # answers 5 and 3
    responses = [(" a </think> <answer> 5 </answer>", "stop"), (" b </think> <answer> \\dfrac{8}{2} </answer>", "stop"),
                 (" c </think> <answer> 4 </answer>", "stop"), (" d no tags", "stop")]
    engine = ScriptedEngine(responses)
    eval_set = EvalSet("math", examples, [f"P: {e.problem}" for e in examples], entropy_indices=[1],
                       samples_per_problem=2)
    with Grader(workers=1) as grader:
        result = run_evaluation(engine, eval_set, Sampling(1.0, 1.0, 32, ("</answer>",), 0), grader, 5.0, progress=False)
    got = [(s["problem_id"], s["sample_index"], s["category"], s["normalized_answer"]) for s in result.samples]
    assert got == [(examples[0].problem_id, 0, "correct", "5"), (examples[0].problem_id, 1, "wrong_answer", "\\frac{8}{2}"),
                   (examples[1].problem_id, 0, "wrong_answer", "4"), (examples[1].problem_id, 1, "format_failure", None)]
    # The entropy subsample scores each chosen problem's first response only (row 2 = problem 1, sample 0).
    assert [s["token_entropy"] for s in result.samples] == [None, None, 0.5, None]
    assert result.metrics["samples_per_problem"] == 2 and result.metrics["num_test_cases"] == 4


# ---- the Hugging Face engine and checkpoint checks -----------------------------------------------


def test_check_model_dir_rejects_broken_checkpoints(tmp_path, tiny_model_dir):
    check_model_dir(str(tiny_model_dir))
    cases = {
        "truncated": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
        "garbage": lambda d: (d / "model.safetensors").write_bytes(b"\x00garbage" * 100),
        "no_config": lambda d: (d / "config.json").unlink(),
        "pickle_only": lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
    }
    expected = {"truncated": "not a valid safetensors", "garbage": "not a valid safetensors",
                "no_config": "missing config.json", "pickle_only": "only safetensors"}
    for name, damage in cases.items():
        broken = tmp_path / name
        shutil.copytree(tiny_model_dir, broken)
        damage(broken)
        with pytest.raises(CheckpointLoadError, match=expected[name]):
            check_model_dir(str(broken))


def test_fingerprint_decides_between_reload_and_restart(tmp_path, tiny_model_dir):
    same = tmp_path / "same"
    shutil.copytree(tiny_model_dir, same)
    (same / "model.safetensors").write_bytes(b"other weights do not matter")
    assert model_fingerprint(str(same)) == model_fingerprint(str(tiny_model_dir))
    other_tokenizer = tmp_path / "tok"
    shutil.copytree(tiny_model_dir, other_tokenizer)
    tokenizer = json.loads((other_tokenizer / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append({**tokenizer["added_tokens"][-1], "id": 999, "content": "<extra>"})
    (other_tokenizer / "tokenizer.json").write_text(json.dumps(tokenizer))
    other_arch = tmp_path / "arch"
    shutil.copytree(tiny_model_dir, other_arch)
    config = json.loads((other_arch / "config.json").read_text())
    (other_arch / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    fingerprints = {model_fingerprint(str(p)) for p in (tiny_model_dir, other_tokenizer, other_arch)}
    assert len(fingerprints) == 3
    assert model_fingerprint("Qwen/Qwen2.5-Math-1.5B") is None  # hub ids: always a fresh engine


@pytest.mark.slow  # a real model decodes (seconds)
def test_hf_engine_gives_k_sampled_responses_per_prompt_in_one_call(tiny_model_dir):
    engine = HfEngine("cpu", "float32", batch_size=8, max_model_len=512, seed=0, tokenizer_fallback="")
    engine.load(str(tiny_model_dir))
    prompts = ["What is $2+3$? <think>", "hello"]
    generations = engine.generate(prompts, Sampling(1.0, 1.0, 12, (), 0), progress=False, samples_per_prompt=3)
    engine.close()
    assert len(generations) == 6
    first, second = generations[0].prompt_token_ids, generations[3].prompt_token_ids
    assert [g.prompt_token_ids for g in generations] == [first] * 3 + [second] * 3 and first != second
    assert len({tuple(g.token_ids) for g in generations[:3]}) > 1  # k draws, not one response copied


@pytest.mark.slow  # a real model decodes (seconds)
def test_hf_engine_stop_string_max_tokens_and_order(tiny_model_dir):
    engine = HfEngine("cpu", "float32", batch_size=2, max_model_len=512, seed=0, tokenizer_fallback="")
    engine.load(str(tiny_model_dir))
    prompts = ["What is $2+3$? <think>", "hello", "The answer is <answer> 5", "x"]
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=12, stop=(), seed=0)
    free = engine.generate(prompts, greedy, progress=False)
    assert all(g.finish_reason == "length" and g.num_tokens == 12 == len(g.token_ids) for g in free)
    # Pick a stop string from the middle of each greedy response: generation must end right after it.
    exercised = 0
    for index, generation in enumerate(free):
        text = generation.text
        stop = next((text[k:k + 2] for k in range(1, len(text) - 2) if text[k:k + 2].strip() and text.find(text[k:k + 2]) == k), None)
        if stop is None:
            continue
        stopped = engine.generate([prompts[index]], Sampling(0.0, 1.0, 12, (stop,), 0), progress=False)[0]
        assert stopped.finish_reason == "stop"
        assert stopped.text == text[: text.find(stop) + len(stop)]  # stop string kept, nothing after it
        assert stopped.num_tokens <= 12
        exercised += 1
    assert exercised >= 2
    # Length-sorted, left-padded batches give each prompt its own response, as generating it alone does.
    alone = [engine.generate([p], greedy, progress=False)[0] for p in prompts]
    assert [g.token_ids for g in alone] == [g.token_ids for g in free]
    scores = engine.token_entropies(free[:2])
    assert all(0 < s <= math.log(435) + 0.1 for s in scores)  # a random model is near the uniform entropy
    engine.close()


@pytest.mark.slow  # a real model decodes (seconds)
def test_hf_engine_loads_later_checkpoints_into_the_live_model(tiny_model_dir, tmp_path):
    """Same architecture and tokenizer: weights are copied in place (the model object, and what was compiled
    for it, stays); the responses equal a freshly loaded engine's. Another architecture: a full load."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    changed = tmp_path / "changed"
    shutil.copytree(tiny_model_dir, changed)
    for file in changed.glob("*.safetensors"):
        tensors = load_file(str(file))
        save_file({k: v + 0.05 * torch.randn_like(v) for k, v in tensors.items()}, str(file), metadata={"format": "pt"})
    prompts = ["What is $2+3$? <think>", "hello"]
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=12, stop=(), seed=0)
    fresh = HfEngine("cpu", "float32", batch_size=2, max_model_len=512, seed=0, tokenizer_fallback="")
    fresh.load(str(changed))
    expected = [g.token_ids for g in fresh.generate(prompts, greedy, progress=False)]
    fresh.close()

    engine = HfEngine("cpu", "float32", batch_size=2, max_model_len=512, seed=0, tokenizer_fallback="")
    engine.load(str(tiny_model_dir))
    before = [g.token_ids for g in engine.generate(prompts, greedy, progress=False)]
    live_model = engine.model
    engine.load(str(changed))
    assert engine.last_load["kind"] == "reload" and engine.model is live_model
    assert [g.token_ids for g in engine.generate(prompts, greedy, progress=False)] == expected != before

    other_arch = tmp_path / "arch"
    shutil.copytree(tiny_model_dir, other_arch)
    config = json.loads((other_arch / "config.json").read_text())
    (other_arch / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    # config.json now says 3 layers where the weights hold 2: the check before any load fails with the
    # one-line error that the daemon records (it keeps serving), and the live model is untouched.
    with pytest.raises(CheckpointLoadError, match="arch.*does not describe a model"):
        engine.load(str(other_arch))
    assert engine.model is live_model
    engine.load(str(changed))
    assert engine.last_load["kind"] == "reload"
    engine.close()


@pytest.mark.slow  # a real model decodes (seconds)
def test_hf_engine_halves_the_batch_when_out_of_memory(tiny_model_dir, monkeypatch, caplog):
    import torch

    engine = HfEngine("cpu", "float32", batch_size=8, max_model_len=512, seed=0, tokenizer_fallback="")
    engine.load(str(tiny_model_dir))
    prompts = [f"problem {k}: what is {k} + {k}?" for k in range(7)]
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=6, stop=(), seed=0)
    expected = [g.token_ids for g in engine.generate(prompts, greedy, progress=False)]
    real_batch = engine._generate_batch

    def small_batches_only(batch_ids, *args):
        if len(batch_ids) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_batch(batch_ids, *args)

    monkeypatch.setattr(engine, "_generate_batch", small_batches_only)
    with caplog.at_level("WARNING"):
        got = engine.generate(prompts, greedy, progress=False)
    assert [g.token_ids for g in got] == expected  # every prompt answered, in order
    assert engine.batch_size == 2 and "hf_batch_size lowered to 2" in caplog.text
    engine.close()


@pytest.mark.slow  # a real model decodes (seconds)
def test_hf_engine_entropy_is_the_same_in_any_batching(tiny_model_dir, monkeypatch):
    """Token entropy per response does not depend on how responses are batched (padding, order)."""
    import eval_daemon.engines.hf as hf_engine

    engine = HfEngine("cpu", "float32", batch_size=8, max_model_len=512, seed=0, tokenizer_fallback="")
    engine.load(str(tiny_model_dir))
    prompts = ["short", "a somewhat longer prompt about $x^2$", "mid length one", "z" * 30]
    generations = engine.generate(prompts, Sampling(1.0, 1.0, 10, (), 0), progress=False)
    together = engine.token_entropies(generations)
    monkeypatch.setattr(hf_engine, "ENTROPY_BATCH_TOKENS", 1)  # one response per forward pass
    alone = engine.token_entropies(generations)
    assert all(t is not None for t in together)
    assert together == pytest.approx(alone, rel=1e-4)
    engine.close()


@pytest.mark.parametrize("shown", [True, False])
def test_vllm_progress_bar_factory_takes_what_vllm_passes_and_checks_the_stop_flag(shown):
    """vLLM calls the factory both as tqdm(total=..., desc=...) and as tqdm(iterable, desc=...); every
    update is where a pending stop is noticed inside generation."""
    from eval_daemon.engines.vllm import VllmEngine

    engine = VllmEngine("cpu", "float32", 0.5, 512, 0, "")
    calls = []
    engine.interrupt = lambda: calls.append(1)
    factory = engine._progress_bar(shown)
    assert list(factory([1, 2, 3], desc="Adding requests")) == [1, 2, 3]
    bar = factory(total=2, desc="Processed prompts", dynamic_ncols=True)
    bar.update(1)
    bar.update(1)
    assert bar.format_dict["elapsed"] > 0  # vLLM divides by it after generation
    bar.close()
    assert len(calls) == 2


def test_an_entropy_the_vllm_worker_cannot_compute_is_recorded_as_none_not_a_failed_evaluation():
    """The worker's entropy pass runs on vLLM internals that differ between versions: if it raises,
    the evaluation keeps its responses and records no entropy; a stop signal still goes through."""
    from eval_daemon.engines.vllm import VllmEngine
    from eval_daemon.shutdown import Shutdown

    class BrokenWorker:
        def __init__(self, error):
            self.error = error

        def collective_rpc(self, method, args=()):
            raise self.error

    engine = VllmEngine("cpu", "float32", 0.5, 512, 0, "")
    generations = [Generation(text="a", token_ids=[5, 6], prompt_token_ids=[1, 2], finish_reason="stop", num_tokens=2),
                   Generation(text="", token_ids=[], prompt_token_ids=[1], finish_reason="stop", num_tokens=0)]
    engine.llm = BrokenWorker(AttributeError("'Qwen2Model' object has no attribute 'forward_eager'"))
    assert engine.token_entropies(generations) == [None, None]
    engine.llm = BrokenWorker(Shutdown("SIGTERM"))
    with pytest.raises(Shutdown):
        engine.token_entropies(generations)
    engine.llm = None
