"""MATH loading (hub id, original release layout, JSONL), SFT pairs, prompts and SFT targets.

Both daemons use this module: the trainer for MATH train (or ready SFT pairs), the eval daemon
for MATH test / MATH-500. Malformed rows raise DatasetError naming the file and the row.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from common.boxed import last_boxed

logger = logging.getLogger(__name__)

# MATH's "type" field and MATH-500's "subject" field, mapped to the release's directory names.
SUBJECT_DIRS = {
    "algebra": "algebra",
    "counting & probability": "counting_and_probability",
    "counting_and_probability": "counting_and_probability",
    "geometry": "geometry",
    "intermediate algebra": "intermediate_algebra",
    "intermediate_algebra": "intermediate_algebra",
    "number theory": "number_theory",
    "number_theory": "number_theory",
    "prealgebra": "prealgebra",
    "precalculus": "precalculus",
}


class DatasetError(ValueError):
    """A dataset that cannot be read, or a malformed row (message names file and row)."""


@dataclass(frozen=True)
class MathExample:
    problem_id: str  # e.g. "test/algebra/1.json": stable across runs, used to join evaluations
    problem: str
    solution: str
    answer: str  # content of the last \boxed{} of the solution, or the row's `answer` field
    subject: str  # directory-style name, e.g. "counting_and_probability"
    level: int  # 1..5; 0 when the release says "Level ?"


@dataclass(frozen=True)
class SftPair:
    prompt: str
    response: str


# ---- MATH ----------------------------------------------------------------------------------------


def load_math(source: str, split: str) -> list[MathExample]:
    """Load MATH from a local release directory, a JSONL file, or a Hugging Face hub dataset id."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_release_dir(path, split)
    if path.is_file():
        return _load_jsonl(path, split)
    if source.startswith((".", "/", "~")) or source.endswith((".jsonl", ".json")):
        raise DatasetError(f"dataset path {source} does not exist; point data.train_source / evaluation.test_source at a MATH directory, a JSONL file or a hub id")
    return _load_hub(source, split)


def _load_release_dir(root: Path, split: str) -> list[MathExample]:
    # Accept both the release root (holding train/ and test/) and a split directory itself.
    split_dir = root / split if (root / split).is_dir() else root
    files = sorted(split_dir.glob("*/*.json"), key=lambda p: (p.parent.name, _numeric_stem(p)))
    if not files:
        raise DatasetError(f"{split_dir}: no <subject>/<n>.json files; expected the MATH release layout {split}/<subject>/<n>.json")
    examples = []
    for file in files:
        try:
            row = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatasetError(f"{file}: not valid JSON ({exc}); fix or remove the file") from exc
        problem_id = f"{split}/{file.parent.name}/{file.name}"
        examples.append(_example_from_row(row, problem_id, f"{file}", subject_hint=file.parent.name))
    return examples


def _numeric_stem(path: Path) -> tuple[int, str]:
    return (int(path.stem), "") if path.stem.isdigit() else (1 << 60, path.stem)


def _load_jsonl(path: Path, split: str) -> list[MathExample]:
    examples = []
    for line_number, row in _read_jsonl(path):
        problem_id = str(row.get("unique_id") or f"{split}/{path.stem}/{line_number}")
        examples.append(_example_from_row(row, problem_id, f"{path} line {line_number}"))
    if not examples:
        raise DatasetError(f"{path}: no rows; a MATH JSONL file needs one JSON object per line")
    return examples


def _read_jsonl(path: Path):
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from exc
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path} line {line_number}: not valid JSON ({exc.msg}); fix or remove the row") from exc
        if not isinstance(row, dict):
            raise DatasetError(f"{path} line {line_number}: expected a JSON object, got {type(row).__name__}")
        yield line_number, row


def _load_hub(dataset_id: str, split: str) -> list[MathExample]:
    import datasets  # heavy; only needed for hub ids

    try:
        rows = datasets.load_dataset(dataset_id, split=split)
    except Exception as exc:  # datasets raises many unrelated types (network, hub, format)
        raise DatasetError(f"cannot load hub dataset {dataset_id!r} split {split!r} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); use a local MATH directory or JSONL file when offline") from exc
    return [
        _example_from_row(row, str(row.get("unique_id") or f"{split}/{index}"), f"{dataset_id}[{split}] row {index}")
        for index, row in enumerate(rows)
    ]


def _example_from_row(row: dict, problem_id: str, where: str, subject_hint: str = "") -> MathExample:
    problem, solution = row.get("problem"), row.get("solution")
    if not isinstance(problem, str) or not problem.strip():
        raise DatasetError(f"{where}: missing or empty 'problem' field")
    if not isinstance(solution, str) or not solution.strip():
        raise DatasetError(f"{where}: missing or empty 'solution' field")
    answer = row.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        answer = last_boxed(solution)
    if answer is None:
        raise DatasetError(f"{where}: solution has no balanced \\boxed{{...}} and the row has no 'answer' field")
    subject_text = str(row.get("subject") or row.get("type") or subject_hint).strip().lower()
    subject = SUBJECT_DIRS.get(subject_text, subject_text.replace(" ", "_") or "unknown")
    return MathExample(problem_id=problem_id, problem=problem, solution=solution, answer=answer.strip(),
                       subject=subject, level=_parse_level(row.get("level"), where))


def _parse_level(value, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if value is None:
        return 0
    text = str(value).replace("Level", "").strip()
    if text.isdigit():
        return int(text)
    if text in ("?", ""):
        return 0  # MATH has a few "Level ?" problems
    raise DatasetError(f"{where}: level {value!r} is not 'Level N' or an integer")


def select_subset(examples: list[MathExample], n: int, seed: int) -> list[MathExample]:
    """A fixed, seeded subset of n examples (all when n is 0 or >= len), in the original order."""
    if n <= 0 or n >= len(examples):
        return list(examples)
    chosen = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in chosen]


# ---- SFT pairs -----------------------------------------------------------------------------------


def load_sft_pairs(source: str) -> list[SftPair]:
    """Ready SFT pairs: JSONL with string `prompt` and `response` fields (e.g. reasoning traces)."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise DatasetError(f"SFT pairs file {source} does not exist; set data.train_source to a JSONL file with prompt/response fields")
    pairs = []
    for line_number, row in _read_jsonl(path):
        prompt, response = row.get("prompt"), row.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str) or not response.strip():
            raise DatasetError(f"{path} line {line_number}: needs string fields 'prompt' and non-empty 'response'")
        pairs.append(SftPair(prompt=prompt, response=response))
    if not pairs:
        raise DatasetError(f"{path}: no rows")
    return pairs


# ---- prompts and targets -------------------------------------------------------------------------


def load_prompt_template(path: str) -> str:
    """The prompt template, verbatim (published numbers depend on the exact text)."""
    try:
        template = Path(path).read_text()
    except OSError as exc:
        raise DatasetError(f"cannot read prompt template {path} ({exc.strerror}); set data.prompt_template") from exc
    if "{question}" not in template:
        raise DatasetError(f"prompt template {path} has no {{question}} placeholder")
    return template


def build_prompt(template: str, problem: str) -> str:
    # str.replace, not str.format: problems are full of LaTeX braces.
    return template.replace("{question}", problem)


def build_sft_response(example: MathExample) -> str:
    """The SFT target for the R1-zero template (the prompt ends with `<think>`)."""
    return f" {example.solution} </think> <answer> {example.answer} </answer>"


def math_to_sft_pairs(examples: list[MathExample], template: str) -> list[SftPair]:
    return [SftPair(prompt=build_prompt(template, e.problem), response=build_sft_response(e)) for e in examples]
