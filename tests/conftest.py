"""Shared fixtures: a tiny Qwen2 model built on the fly, a small MATH-layout dataset, ../shared."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"

# Small problems in the MATH release layout; solutions end in \boxed{} as in MATH.
FIXTURE_PROBLEMS = {
    "algebra": [
        ("What is $2+3$?", "We add: $2+3=5$. So the answer is $\\boxed{5}$.", "Level 1"),
        ("Solve $x+1=4$.", "Subtract 1: $x=3$, so $\\boxed{3}$.", "Level 2"),
        ("What is $\\frac{1}{2}+\\frac{1}{4}$?", "Common denominator: $\\frac{3}{4}$. Answer $\\boxed{\\frac{3}{4}}$.", "Level 3"),
    ],
    "number_theory": [
        ("What is $7 \\bmod 3$?", "$7 = 2\\cdot 3 + 1$, so $\\boxed{1}$.", "Level 1"),
        ("What is the gcd of 12 and 18?", "Both divide by 6, so $\\boxed{6}$.", "Level 2"),
    ],
    "prealgebra": [
        ("What is $4 \\times 5$?", "$4 \\times 5 = 20$, so $\\boxed{20}$.", "Level 1"),
        ("What is $10-7$?", "$10-7=3$, so $\\boxed{3}$.", "Level 1"),
    ],
}


def write_math_layout(root: Path, splits=("train", "test")) -> Path:
    """Write FIXTURE_PROBLEMS as <root>/<split>/<subject>/<n>.json and return root."""
    for split in splits:
        for subject, problems in FIXTURE_PROBLEMS.items():
            folder = root / split / subject
            folder.mkdir(parents=True, exist_ok=True)
            for index, (problem, solution, level) in enumerate(problems):
                row = {"problem": problem, "solution": solution, "level": level,
                       "type": subject.replace("_", " ").title()}
                (folder / f"{index}.json").write_text(json.dumps(row))
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-weight Qwen2 model + tokenizer in a HF directory (built once per session)."""
    from common.demo.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture
def math_dir(tmp_path) -> Path:
    return write_math_layout(tmp_path / "MATH")


@pytest.fixture
def shared_dir() -> Path:
    """../shared (real MATH, MATH-500, Qwen2.5 tokenizer); integration tests skip without it."""
    if not (SHARED / "data" / "MATH").is_dir():
        pytest.skip("../shared is absent: integration test skipped")
    return SHARED


def require_vllm():
    """Import vllm or skip; in CI (MATHSFT_REQUIRE_VLLM=1) a missing vLLM is a failure, not a skip."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        if os.environ.get("MATHSFT_REQUIRE_VLLM") == "1":
            pytest.fail(f"vLLM is required in CI but does not import: {exc}")
        pytest.skip("vllm is not installed")


def pytest_terminal_summary(terminalreporter):
    """The fault suite's counts (tests/test_faults.py), when it ran."""
    import sys

    tally = sys.modules.get("fault_tally")
    if tally is not None and tally.TALLY:
        terminalreporter.section("fault suite: tried / passed per fault")
        for line in tally.report():
            terminalreporter.write_line(line)
