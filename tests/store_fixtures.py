"""A results store filled with realistic synthetic evaluations, for tests and bench/ (no model needed).

Two runs by default: run_a (steps 0, 50, 100, 150) and run_b (steps 0, 50, 100, plus a failed
evaluation at step 150). Accuracy rises and format failures fall with the step, run_b learns faster,
geometry gets worse in run_a; every category, failure type, subject and level occurs.

    from store_fixtures import fill_synthetic_store
    generated = fill_synthetic_store(tmp_path / "results.duckdb")
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from common.store.schema import FORMAT_FAILURE_TYPES
from common.store.writer import eval_key, record_evaluation, record_failed_evaluation

SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
            "prealgebra", "precalculus")
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 1024, "stop": ["</answer>"]}
EVAL_KEY = eval_key("math", SAMPLING, 0, 0)
DEFAULT_RUNS = {"run_a": (0, 50, 100, 150), "run_b": (0, 50, 100)}
FAILED = {"run_b": (150,)}
# run -> how fast accuracy rises per 50 steps; subject -> extra change per 50 steps, and head start.
RUN_SKILL = {"run_a": 0.08, "run_b": 0.12}
SUBJECT_TREND = {"geometry": -0.3, "precalculus": 0.05}
SUBJECT_OFFSET = {"geometry": 0.4}


@dataclass
class SyntheticStore:
    db_path: Path
    evaluations: dict[tuple[str, int], dict] = field(default_factory=dict)  # (run_id, step) -> evaluation
    samples: dict[tuple[str, int], list[dict]] = field(default_factory=dict)
    failed: list[tuple[str, int]] = field(default_factory=list)


def _response(rng: random.Random, category: str, failure: str | None, answer: str, length: int) -> str:
    """Text shaped like an R1-zero response; about 4 characters per token."""
    reasoning = " ".join(rng.choice(("so", "then", "we", "compute", "x", "=", "2", "+", "the", "sum"))
                         for _ in range(max(1, length - 12)))
    wrong = str(int(answer) + 1) if answer.isdigit() else answer + "+1"
    if failure == "missing_think_close":
        return f" {reasoning} <answer> {answer} </answer>"
    if failure == "missing_answer_open":
        return f" {reasoning} </think> {answer} </answer>"
    if failure == "missing_answer_close":
        return f" {reasoning} </think> <answer> {answer}"
    if failure == "incomplete_generation":
        return f" {reasoning}"
    return f" {reasoning} </think> <answer> {answer if category == 'correct' else wrong} </answer>"


def synthetic_samples(run_id: str, step: int, n_examples: int, entropy_sample: int = 32) -> list[dict]:
    rng = random.Random(f"{run_id}/{step}")
    progress = step / 50
    p_format_failure = max(0.04, 0.45 - 0.15 * progress)
    samples = []
    for index in range(n_examples):
        subject = SUBJECTS[index % len(SUBJECTS)]
        level = 1 + (index // len(SUBJECTS)) % 5
        answer = str(index % 97)
        failure = None
        if rng.random() < p_format_failure:
            # Cycle through the types so each occurs whenever there are a few failures.
            failure = FORMAT_FAILURE_TYPES[(index + step // 50) % len(FORMAT_FAILURE_TYPES)]
            category = "format_failure"
        else:
            p_correct = (0.55 - 0.08 * level + SUBJECT_OFFSET.get(subject, 0)
                         + (RUN_SKILL.get(run_id, 0.1) + SUBJECT_TREND.get(subject, 0)) * progress)
            category = "correct" if rng.random() < min(0.95, max(0.02, p_correct)) else "wrong_answer"
        length = 1024 if failure == "incomplete_generation" else int(rng.gauss(260 + 40 * level, 60))
        length = max(20, min(1024, length))
        entropy = round(max(0.05, rng.uniform(0.3, 1.2) - 0.1 * progress), 4)
        problem = f"Problem {index} ({subject}, level {level}): compute the value of the expression."
        samples.append({
            "problem_id": f"test/{subject}/{index}.json",
            "subject": subject,
            "level": level,
            "problem": problem,
            "prompt": f"A conversation between User and Assistant. User: {problem} Assistant: <think>",
            "response": _response(rng, category, failure, answer, length),
            "ground_truth": answer,
            "solution": f"Working it out gives $\\boxed{{{answer}}}$.",
            "format_reward": 0.0 if failure else 1.0,
            "answer_reward": 1.0 if category == "correct" else 0.0,
            "reward": 1.0 if category == "correct" else 0.0,
            "category": category,
            "format_failure_type": failure,
            "response_length": length,
            "finish_reason": "length" if failure == "incomplete_generation" else "stop",
            "token_entropy": entropy if index < entropy_sample else None,
            "grading_note": "timeout" if index == 5 and category == "wrong_answer" else None,
        })
    return samples


def summarise(run_id: str, step: int, samples: list[dict]) -> dict:
    """The evaluation dict the eval daemon would pass, computed from the samples."""
    def mean(values):
        values = [v for v in values if v is not None]
        return statistics.fmean(values) if values else None

    n = len(samples)
    count = {c: sum(s["category"] == c for s in samples) for c in ("correct", "wrong_answer", "format_failure")}
    correct = [s["response_length"] for s in samples if s["category"] == "correct"]
    incorrect = [s["response_length"] for s in samples if s["category"] != "correct"]
    return {
        "run_id": run_id, "step": step, "eval_key": EVAL_KEY, "eval_set": "math",
        "checkpoint_path": f"results/checkpoints/{run_id}/step_{step:06d}", "status": "ok", "error": None,
        "num_test_cases": n, "num_correct": count["correct"], "num_format_correct": n - count["format_failure"],
        "num_wrong_answer": count["wrong_answer"], "num_format_failure": count["format_failure"],
        "accuracy": count["correct"] / n, "format_accuracy": (n - count["format_failure"]) / n,
        "avg_response_length": mean(s["response_length"] for s in samples),
        "avg_response_length_correct": mean(correct), "avg_response_length_incorrect": mean(incorrect),
        "avg_token_entropy": mean(s["token_entropy"] for s in samples),
        "entropy_method": "mean_token_entropy",
        "entropy_sample_size": sum(s["token_entropy"] is not None for s in samples),
        "engine": "vllm", "sampling": SAMPLING, "config": {"evaluation": {"eval_set": "math", **SAMPLING}},
        "published_at": f"2026-11-26T05:{step // 10 % 60:02d}:00.000Z",
        "started_at": f"2026-11-26T05:{step // 10 % 60:02d}:01.000Z",
        "finished_at": f"2026-11-26T05:{step // 10 % 60:02d}:41.500Z",
        "generation_seconds": 35.0, "grading_seconds": 5.5, "total_seconds": 40.5, "worker_id": "test-1",
        "run_config": {"training": {"learning_rate": 2e-5, "seed": 42}, "run_id": run_id},
        "checkpoint_metrics": {"train_loss": round(1.5 - step / 200, 3)},
    }


def fill_synthetic_store(db_path: Path, runs: dict[str, tuple[int, ...]] = DEFAULT_RUNS,
                         n_examples: int = 70, failed: dict[str, tuple[int, ...]] = FAILED) -> SyntheticStore:
    """Record every (run, step) through record_evaluation, the failed ones through
    record_failed_evaluation, and return what was written."""
    store = SyntheticStore(Path(db_path))
    for run_id, steps in runs.items():
        for step in steps:
            samples = synthetic_samples(run_id, step, n_examples)
            evaluation = summarise(run_id, step, samples)
            assert record_evaluation(db_path, evaluation, samples)
            store.evaluations[(run_id, step)] = evaluation
            store.samples[(run_id, step)] = samples
        for step in failed.get(run_id, ()):
            evaluation = {"run_id": run_id, "step": step, "eval_key": EVAL_KEY, "eval_set": "math",
                          "engine": "vllm", "sampling": SAMPLING}
            assert record_failed_evaluation(db_path, evaluation, "CUDA out of memory (synthetic)")
            store.failed.append((run_id, step))
    return store
