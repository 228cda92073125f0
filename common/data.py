"""MATH loading (hub dataset, original release layout, JSONL), SFT pairs, prompts and SFT targets.

Both daemons use this module: the trainer for MATH train (or ready SFT pairs), the eval daemon
for MATH test / MATH-500. Malformed rows raise DatasetError naming the file and the row.

A source is one string (data.train_source, evaluation.test_source):
- a local directory in the MATH release layout (`test/<subject>/<n>.json`);
- a JSONL file (one MATH row per line; MATH-500's `test.jsonl`);
- a hub dataset `owner/name`, with the configs to concatenate after a colon:
  `EleutherAI/hendrycks_math:algebra,geometry` (the default names all seven subjects);
- a local directory laid out like a hub dataset repository (README.md configs, parquet/JSONL
  files per config and split), with the same `:config,...` suffix; it goes through
  `datasets.load_dataset` exactly as a hub id does.

Problem ids: release files give `test/algebra/1.json`; MATH-500 rows carry that same id as their
`unique_id`, so MATH-500 results join with full-MATH results. EleutherAI/hendrycks_math's parquet
rows carry no file name, so their ids are `<dataset>/<split>/<config>/<row>` (stable for one
revision of the dataset, not joinable with release ids; join on `problem` text across sources).
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

from common.boxed import last_boxed
from common.errors import first_line

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
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")
# Full MATH (train 7,500 / test 5,000): lm-evaluation-harness's copy, one config per subject.
MATH_HUB_SOURCE = "EleutherAI/hendrycks_math:" + ",".join(MATH_SUBJECTS)
MATH500_HUB_SOURCE = "HuggingFaceH4/MATH-500"
MATH500_SIZE = 500
# Hub datasets that hold all of MATH (so never MATH-500) and the one that is MATH-500.
FULL_MATH_HUB_IDS = ("EleutherAI/hendrycks_math", "DigitalLearningGmbH/MATH-lighteval")
MATH500_HUB_IDS = (MATH500_HUB_SOURCE,)
# Taken down from the hub by a DMCA notice in January 2025.
REMOVED_HUB_IDS = ("hendrycks/competition_math", "competition_math")
REPLACEMENTS = (f"{MATH_HUB_SOURCE} (MATH train/test), DigitalLearningGmbH/MATH-lighteval "
                f"or {MATH500_HUB_SOURCE}")
LOCAL_HINT = "a local MATH release directory or JSONL file"
# One metadata request tells "no such dataset" from "no network" before datasets' own retries
# (5 retries with backoff, ~25-55 s, each printed) start.
HUB_PROBE_TIMEOUT_S = 10.0
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_CONFIG_NAME = re.compile(r"[\w.-]+")


class DatasetError(ValueError):
    """A dataset that cannot be read, or a malformed row (message names file and row)."""


class HubDatasetNotFoundError(DatasetError):
    """The hub answered: no such dataset (or private, or gated)."""


class HubUnreachableError(DatasetError):
    """The hub could not be asked (no network, DNS, timeout, outage): the environment, not the id."""


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


@dataclass(frozen=True)
class HubSource:
    dataset: str  # hub id owner/name, or a local directory laid out like a hub dataset repository
    configs: tuple[str, ...]  # concatenated in this order; empty: the dataset's default config
    local: bool = False

    @property
    def name(self) -> str:
        """The dataset's own name (last path part): the same for the hub id and a local copy."""
        return Path(self.dataset).name


# ---- MATH ----------------------------------------------------------------------------------------


def hub_source(source: str) -> HubSource | None:
    """The hub dataset (or local hub-layout directory) and configs that `source` names; None for a
    MATH release directory or a JSONL file. Raises DatasetError for text that is neither."""
    base, colon, tail = source.rpartition(":")
    if colon and base and "/" not in tail:
        configs = tuple(name.strip() for name in tail.split(","))
        if not all(_CONFIG_NAME.fullmatch(name) for name in configs):
            raise DatasetError(f"{source!r}: the configs after ':' must be comma-separated names, "
                               f"e.g. {MATH_HUB_SOURCE}")
    else:
        base, configs = source, ()
    path = Path(base).expanduser()
    if path.is_dir() and not _is_release_layout(path):
        return HubSource(str(path), configs, local=True)
    if path.exists() or _looks_local(base):
        if configs and path.exists():
            raise DatasetError(f"{source!r}: only hub datasets have configs; drop ':{tail}'")
        return None  # load_math reads it, or says that it does not exist
    if base in REMOVED_HUB_IDS:
        raise DatasetError(f"hub dataset {base} was taken down (DMCA notice, January 2025); use {REPLACEMENTS}, "
                           f"or {LOCAL_HINT}")
    if not _HUB_ID.fullmatch(base):
        raise DatasetError(f"{source!r} is neither an existing path nor a hub id owner/name[:config,...]; "
                           f"use {REPLACEMENTS}, or {LOCAL_HINT}")
    return HubSource(base, configs)


def _looks_local(text: str) -> bool:
    # Hub ids are owner/name: anything with more slashes can only be a path.
    return text.startswith((".", "/", "~")) or text.endswith((".jsonl", ".json")) or text.count("/") > 1


def _is_release_layout(root: Path) -> bool:
    # The release root holds train/<subject>/<n>.json; a split directory holds <subject>/<n>.json.
    return any(file.stem.isdigit() for pattern in ("*/*/*.json", "*/*.json") for file in root.glob(pattern))


def load_math(source: str, split: str) -> list[MathExample]:
    """Load MATH from a release directory, a JSONL file, or a hub dataset (see the module docstring)."""
    hub = hub_source(source)
    if hub is not None:
        return _load_hub(hub, split)
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_release_dir(path, split)
    if path.is_file():
        return _load_jsonl(path, split)
    raise DatasetError(f"dataset path {source} does not exist; point data.train_source / evaluation.test_source "
                       f"at a MATH directory, a JSONL file or a hub id")


def check_eval_set(eval_set: str, examples: list[MathExample], source: str) -> None:
    """An evaluation set is what its name says: math500 has MATH-500's 500 problems."""
    if eval_set == "math500" and len(examples) != MATH500_SIZE:
        raise DatasetError(f"evaluation.eval_set=math500 but {source} holds {len(examples)} problems, not "
                           f"{MATH500_SIZE}; set evaluation.test_source={MATH500_HUB_SOURCE} (or a MATH-500 JSONL "
                           f"file), or evaluation.eval_set=math")


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


def _load_hub(hub: HubSource, split: str) -> list[MathExample]:
    """Every config's split, concatenated; MATH-500's unique_id is the release id (test/<subject>/<n>.json),
    rows without one get <dataset name>/<split>/<config>/<row>."""
    import datasets  # heavy; only needed for hub datasets

    if not hub.local:
        _probe_hub(hub.dataset)
    examples = []
    for config in hub.configs or (None,):
        where = f"{hub.dataset}" + (f":{config}" if config else "")
        try:
            rows = datasets.load_dataset(hub.dataset, config, split=split)
        except Exception as exc:  # datasets raises many unrelated types (network, cache, config, format)
            raise DatasetError(f"cannot load {where} split {split!r}: {first_line(exc)}; {_load_fix(hub, split)}") from exc
        subject = SUBJECT_DIRS.get(config or "", "")
        examples += [_example_from_row(row, str(row.get("unique_id") or f"{hub.name}/{split}/{config or 'default'}/{index}"),
                                       f"{where}[{split}] row {index}", subject_hint=subject)
                     for index, row in enumerate(rows)]
    return examples


def _load_fix(hub: HubSource, split: str) -> str:
    from huggingface_hub import constants

    if hub.local:
        return (f"a local directory must hold the MATH release layout ({split}/<subject>/<n>.json) or a hub "
                f"repository's layout (README.md configs, data files per config and split)")
    if constants.HF_HUB_OFFLINE:
        return f"HF_HUB_OFFLINE=1 reads only the local cache: unset it once online to download, or use {LOCAL_HINT}"
    return f"name configs as {hub.dataset}:<config>[,<config>...]; or use {LOCAL_HINT}"


def _probe_hub(dataset: str) -> None:
    """Fail fast, in one line, on a hub id that does not exist or a hub that cannot be reached."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HTTPError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return  # cache only, no network: load_dataset says whether the cache has it
    try:
        HfApi().dataset_info(dataset, timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError as exc:
        raise HubDatasetNotFoundError(f"hub dataset {dataset} is gated; accept its terms on the hub and log in "
                           f"(`hf auth login`), or use {LOCAL_HINT}") from exc
    except RepositoryNotFoundError as exc:
        raise HubDatasetNotFoundError(f"hub dataset {dataset} does not exist on the Hugging Face hub (or is private); use "
                           f"{REPLACEMENTS}, or {LOCAL_HINT}") from exc
    except (HTTPError, OSError) as exc:  # no network, DNS, timeout, hub outage: the environment, not the id
        raise HubUnreachableError(f"cannot reach the Hugging Face hub for {dataset} (offline? {type(exc).__name__}: "
                           f"{first_line(exc)}); with a cached copy set HF_HUB_OFFLINE=1, otherwise use "
                           f"{LOCAL_HINT}") from exc


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
