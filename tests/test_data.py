"""MATH loading in its three forms, SFT targets, and row errors that name file and row."""

import json

import pytest

from common.boxed import last_boxed
from common.data import (DatasetError, build_prompt, build_sft_response, load_math, load_prompt_template,
                         load_sft_pairs, select_subset)


@pytest.mark.parametrize("text, expected", [
    (r"so $\boxed{5}$.", "5"),
    (r"\boxed{\frac{1}{2}} then \boxed{x^{2}+1}", "x^{2}+1"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\fbox{7}", "7"),
    (r"\boxed 9$", "9"),
    (r"\boxed{unbalanced", None),
    ("no box", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_release_layout(math_dir):
    train = load_math(str(math_dir), "train")
    assert len(train) == 7
    first = train[0]
    assert first.problem_id == "train/algebra/0.json" and first.subject == "algebra" and first.level == 1
    assert first.answer == "5"
    # A split directory itself works too.
    assert len(load_math(str(math_dir / "test"), "test")) == 7


def test_malformed_row_names_file(math_dir):
    bad = math_dir / "train" / "algebra" / "9.json"
    bad.write_text(json.dumps({"problem": "p", "solution": "no box here", "level": "Level 1"}))
    with pytest.raises(DatasetError, match="9.json"):
        load_math(str(math_dir), "train")
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="9.json: not valid JSON"):
        load_math(str(math_dir), "train")


def test_jsonl_rows_and_errors(tmp_path):
    path = tmp_path / "m.jsonl"
    rows = [{"problem": "1+1?", "solution": r"$\boxed{2}$", "answer": "2", "subject": "Prealgebra", "level": 1,
             "unique_id": "test/prealgebra/1.json"},
            {"problem": "2+2?", "solution": r"$\boxed{4}$", "type": "Counting & Probability", "level": "Level 5"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    examples = load_math(str(path), "test")
    assert [e.subject for e in examples] == ["prealgebra", "counting_and_probability"]
    assert examples[0].problem_id == "test/prealgebra/1.json" and examples[1].level == 5
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"problem": "x"}) + "\n")
    with pytest.raises(DatasetError, match="line 2: missing or empty 'solution'"):
        load_math(str(path), "test")


def test_missing_local_path_is_clear(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_math(str(tmp_path / "missing.jsonl"), "train")


def test_sft_pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "response": " A </think> <answer> 1 </answer>"}) + "\n")
    assert load_sft_pairs(str(path))[0].prompt == "Q"
    path.write_text(json.dumps({"prompt": "Q"}) + "\n")
    with pytest.raises(DatasetError, match="line 1"):
        load_sft_pairs(str(path))


def test_prompt_and_response_follow_r1_zero(math_dir):
    template = load_prompt_template("config/r1_zero.prompt")
    example = load_math(str(math_dir), "train")[0]
    prompt = build_prompt(template, example.problem)
    assert prompt.endswith("Assistant: <think>") and example.problem in prompt
    assert build_sft_response(example) == f" {example.solution} </think> <answer> 5 </answer>"


def test_subset_is_fixed_and_seeded(math_dir):
    examples = load_math(str(math_dir), "test")
    a, b = select_subset(examples, 3, seed=1), select_subset(examples, 3, seed=1)
    assert a == b and len(a) == 3
    assert select_subset(examples, 0, seed=1) == examples


def test_real_math_release_parses_completely(shared_dir):
    train = load_math(str(shared_dir / "data" / "MATH"), "train")
    test = load_math(str(shared_dir / "data" / "MATH"), "test")
    math500 = load_math(str(shared_dir / "data" / "MATH-500" / "test.jsonl"), "test")
    assert (len(train), len(test), len(math500)) == (7500, 5000, 500)
    assert len({e.subject for e in test}) == 7
    test_ids = {e.problem_id for e in test}
    assert all(e.problem_id in test_ids for e in math500)


def test_template_matches_shared_verbatim(shared_dir):
    assert open("config/r1_zero.prompt").read() == (shared_dir / "prompts" / "r1_zero.prompt").read_text()
