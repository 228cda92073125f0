"""One evaluation of the loaded model: prompts -> generate (with the entropy subsample) -> grade -> samples + metrics.

Every response becomes one sample row (the store's `samples` columns; with
evaluation.samples_per_problem k, a problem has k rows, sample_index 0..k-1): prompt, problem, response,
ground truth, solution, subject, level, problem id, rewards, category, format failure type,
response length in tokens, finish reason, token entropy (None outside the entropy subsample) and
the grader's note, the normalised answer (maj@k votes on it). Categories: `correct` (format 1, answer 1), `wrong_answer` (format 1,
answer 0), `format_failure` (format 0; the type comes from common.grading.format_failure_type,
where `incomplete_generation` wins whenever max_tokens cut the response).
Used by `bin/eval` (eval_daemon/__main__.py) and bench/eval_engine_reuse.py.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from common.config import EvaluationConfig
from common.data import MathExample, build_prompt, check_eval_set, load_math, load_prompt_template, select_subset
from common.grading import Grader, categorize, extract_answer, strip_string
from common.store.writer import stratified_set_name
from eval_daemon.engines.base import Generation, GenerationEngine, Sampling
from eval_daemon.entropy import sample_indices

logger = logging.getLogger(__name__)



@dataclass
class EvalSet:
    name: str  # evaluation.eval_set: math | math500
    examples: list[MathExample]
    prompts: list[str]
    entropy_indices: list[int]  # the fixed subsample whose token entropy is scored (its first response)
    samples_per_problem: int = 1  # k responses per problem, generated in the same engine call


@dataclass
class EvalResult:
    samples: list[dict]
    metrics: dict  # the evaluations-table metrics (counts, accuracies, lengths, entropy)
    timings: dict = field(default_factory=dict)  # generation_seconds, grading_seconds, entropy_seconds
    gpu: dict = field(default_factory=dict)  # memory_used (GiB, peak) and utilization (%, mean) while generating


def load_eval_set(evaluation: EvaluationConfig, prompt_template: str) -> EvalSet:
    """MATH test (or MATH-500), the seeded subset when num_eval_samples > 0, and the R1-zero prompts."""
    source = evaluation.test_source
    examples = load_math(source, evaluation.test_split)
    check_eval_set(evaluation.eval_set, examples, source)
    examples = select_subset(examples, evaluation.num_eval_samples, evaluation.seed)
    template = load_prompt_template(prompt_template)
    prompts = [build_prompt(template, example.problem) for example in examples]
    indices = sample_indices(len(examples), evaluation.entropy_sample_size, evaluation.seed)
    logger.info("eval set %s: %d problems from %s (entropy scored on %d)", evaluation.eval_set, len(examples),
                source, len(indices))
    return EvalSet(name=evaluation.eval_set, examples=examples, prompts=prompts, entropy_indices=indices,
                   samples_per_problem=evaluation.samples_per_problem)


def stratified_subset(eval_set: EvalSet, size: int, seed: int, entropy_sample_size: int) -> EvalSet | None:
    """evaluation.schedule=keep_up's quick eval set: `size` problems of the eval set, a fixed, seeded
    sample stratified by (subject, level) (each stratum keeps its share, largest remainders round
    up), in the eval set's order; named `<eval set>-strat<size>`. None when the eval set is not
    larger than `size` (the subset would be the whole set)."""
    n = len(eval_set.examples)
    if size >= n:
        return None
    strata: dict[tuple[str, int], list[int]] = {}
    for index, example in enumerate(eval_set.examples):
        strata.setdefault((example.subject, example.level), []).append(index)
    shares = {key: size * len(members) / n for key, members in strata.items()}
    quota = {key: int(share) for key, share in shares.items()}
    by_remainder = sorted(strata, key=lambda key: (-(shares[key] - quota[key]), key))
    for key in by_remainder[: size - sum(quota.values())]:
        quota[key] += 1
    rng = random.Random(seed)
    chosen = sorted(i for key in sorted(strata) for i in rng.sample(strata[key], quota[key]))
    examples = [eval_set.examples[i] for i in chosen]
    return EvalSet(name=stratified_set_name(eval_set.name, size), examples=examples, prompts=[eval_set.prompts[i] for i in chosen],
                   entropy_indices=sample_indices(len(examples), entropy_sample_size, seed),
                   samples_per_problem=eval_set.samples_per_problem)


def run_evaluation(engine: GenerationEngine, eval_set: EvalSet, sampling: Sampling, grader: Grader,
                   grading_timeout_s: float, progress: bool, gpu_device: str = "cpu") -> EvalResult:
    """Evaluate the engine's loaded model on the eval set; never raises on odd model output."""
    started = time.perf_counter()
    k = eval_set.samples_per_problem
    with GpuSampler(gpu_device) as gpu:
        # One call (continuous batching); the engine then scores the entropy subsample (first responses).
        generations = engine.generate(eval_set.prompts, sampling, progress,
                                      entropy_rows=[i * k for i in eval_set.entropy_indices], samples_per_prompt=k)
    generated = time.perf_counter()
    truths = [e.answer for e in eval_set.examples for _ in range(k)]
    grades = grader.grade([g.text for g in generations], truths, grading_timeout_s,
                          [g.finish_reason for g in generations])
    graded = time.perf_counter()
    scored = {i * k for i in eval_set.entropy_indices}
    samples = [make_sample(eval_set.examples[row // k], eval_set.prompts[row // k], generation, grade,
                           generation.token_entropy if row in scored else None, sample_index=row % k)
               for row, (generation, grade) in enumerate(zip(generations, grades))]
    # entropy_seconds: the part of generation_seconds spent scoring the entropy subsample.
    timings = {"generation_seconds": generated - started, "grading_seconds": graded - generated,
               "entropy_seconds": engine.entropy_seconds}
    metrics = {**summarize(samples, engine.entropy_method), "samples_per_problem": k}
    return EvalResult(samples=samples, metrics=metrics, timings=timings,
                      gpu=gpu.summary())


def make_sample(example: MathExample, prompt: str, generation: Generation, grade: dict,
                entropy: float | None, sample_index: int = 0) -> dict:
    category = categorize(grade["format_reward"], grade["answer_reward"])
    answer = extract_answer(generation.text) if category != "format_failure" else None
    return {
        "problem_id": example.problem_id, "subject": example.subject, "level": example.level,
        "problem": example.problem, "prompt": prompt, "response": generation.text,
        "ground_truth": example.answer, "solution": example.solution,
        "format_reward": grade["format_reward"], "answer_reward": grade["answer_reward"], "reward": grade["reward"],
        "category": category,
        "format_failure_type": grade["format_failure_type"] if category == "format_failure" else None,
        "response_length": generation.num_tokens, "finish_reason": generation.finish_reason,
        "token_entropy": entropy, "grading_note": grade["grading_note"] or None,
        "sample_index": sample_index, "normalized_answer": None if answer is None else strip_string(answer),
    }


def summarize(samples: list[dict], entropy_method: str) -> dict:
    """The evaluations-table metrics of one evaluation (None where a mean has no values)."""
    n = len(samples)
    counts = Counter(s["category"] for s in samples)
    lengths = [s["response_length"] for s in samples]
    correct = [s["response_length"] for s in samples if s["category"] == "correct"]
    incorrect = [s["response_length"] for s in samples if s["category"] != "correct"]
    entropies = [s["token_entropy"] for s in samples if s["token_entropy"] is not None]
    return {
        "num_test_cases": n,
        "num_correct": counts["correct"],
        "num_format_correct": counts["correct"] + counts["wrong_answer"],
        "num_wrong_answer": counts["wrong_answer"],
        "num_format_failure": counts["format_failure"],
        "accuracy": counts["correct"] / n if n else None,
        "format_accuracy": (counts["correct"] + counts["wrong_answer"]) / n if n else None,
        "avg_response_length": _mean(lengths),
        "avg_response_length_correct": _mean(correct),
        "avg_response_length_incorrect": _mean(incorrect),
        "avg_token_entropy": _mean(entropies),
        "entropy_method": entropy_method if entropies else None,
        "entropy_sample_size": len(entropies),
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class GpuSampler:
    """Samples GPU memory and utilization once a second while generating (nothing on CPU)."""

    def __init__(self, device: str, interval_s: float = 1.0) -> None:
        self.device = device
        self.interval_s = interval_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if self.device.startswith("cuda"):
            self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        from common.tracking import gpu_stats

        while True:
            stats = gpu_stats(self.device)
            if stats:
                self.samples.append(stats)
            if self._stop.wait(self.interval_s):
                return

    def summary(self) -> dict:
        memory = [s["memory_used"] for s in self.samples if "memory_used" in s]
        utilization = [s["utilization"] for s in self.samples if "utilization" in s]
        summary = {}
        if memory:
            summary["memory_used"] = max(memory)
        if utilization:
            summary["utilization"] = sum(utilization) / len(utilization)
        return summary
