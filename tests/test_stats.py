"""Numbers a researcher can trust: k samples per problem (pass@k, maj@k), and old stores migrated.

Every expected value here is worked out by hand in the comments.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from store_fixtures import SAMPLING, summarise, synthetic_samples

from common.store import schema, writer

REPO_ROOT = Path(__file__).resolve().parents[1]
K4_KEY = writer.eval_key("math", SAMPLING, 0, 0, samples_per_problem=4)

# Four problems, four responses each: (category, normalised answer) per sample_index.
K4_PROBLEMS = {
    # c=2; answers 5, 6, 6, 10/2: the two correct answers are one (equivalent) answer, so a 2-2 tie,
    # won by the answer given first (5, correct); grouping by string alone would elect 6
    "test/a.json": [("correct", "5"), ("wrong_answer", "6"), ("wrong_answer", "6"), ("correct", "\\frac{10}{2}")],
    # c=1; "4" has two votes, the format failure none: majority wrong
    "test/b.json": [("wrong_answer", "4"), ("format_failure", None), ("correct", "3"), ("wrong_answer", "4")],
    # c=0
    "test/c.json": [("wrong_answer", "7"), ("wrong_answer", "7"), ("wrong_answer", "8"), ("wrong_answer", "7")],
    # c=3; majority correct
    "test/d.json": [("correct", "\\frac{1}{2}"), ("wrong_answer", "2"), ("correct", "\\frac{1}{2}"),
                    ("correct", "\\frac{1}{2}")],
}
# pass@k per problem = 1 - C(n-c, k) / C(n, k), n = 4:
#   a (c=2): 1/2, 1 - 1/6 = 5/6, 1, 1      b (c=1): 1/4, 1 - 3/6 = 1/2, 1 - 1/4 = 3/4, 1
#   c (c=0): 0, 0, 0, 0                    d (c=3): 3/4, 1, 1, 1
EXPECTED_PASS_AT_K = {1: (1 / 2 + 1 / 4 + 0 + 3 / 4) / 4, 2: (5 / 6 + 1 / 2 + 0 + 1) / 4,
                      3: (1 + 3 / 4 + 0 + 1) / 4, 4: 3 / 4}
EXPECTED_MAJ_AT_4 = 2 / 4  # a and d


def k4_samples() -> list[dict]:
    samples = []
    for problem_id, responses in K4_PROBLEMS.items():
        for index, (category, answer) in enumerate(responses):
            samples.append({
                "problem_id": problem_id, "sample_index": index, "subject": "algebra", "level": 2,
                "response": f" </think> <answer> {answer} </answer>", "ground_truth": "x",
                "format_reward": 0.0 if category == "format_failure" else 1.0,
                "answer_reward": float(category == "correct"), "reward": float(category == "correct"),
                "category": category, "response_length": 10, "finish_reason": "stop",
                "format_failure_type": "missing_answer_close" if category == "format_failure" else None,
                "normalized_answer": answer, "token_entropy": None,
            })
    return samples


def k4_evaluation(samples: list[dict], step: int = 0) -> dict:
    evaluation = summarise("run_k", step, samples)
    evaluation.update(eval_key=K4_KEY, samples_per_problem=4)
    return evaluation


def query(db: Path, sql: str) -> list[dict]:
    with schema.connect_read_only(db) as con:
        result = con.execute(sql)
        names = [column[0] for column in result.description]
        return [dict(zip(names, row)) for row in result.fetchall()]


@pytest.fixture(scope="module")
def k4_store(tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("k4") / "results.duckdb"
    samples = k4_samples()
    assert writer.record_evaluation(db, k4_evaluation(samples), samples)
    return db


def test_pass_at_k_is_the_unbiased_estimator_for_every_k(k4_store):
    got = {row["k"]: row for row in query(k4_store, "SELECT * FROM pass_at_k")}
    assert sorted(got) == [1, 2, 3, 4]
    for k, expected in EXPECTED_PASS_AT_K.items():
        assert got[k]["pass_at_k"] == pytest.approx(expected, abs=1e-12), k
        assert got[k]["num_problems"] == 4 and got[k]["eval_key"] == K4_KEY


def test_maj_at_k_votes_over_normalised_answers_and_mean_accuracy(k4_store):
    [row] = query(k4_store, "SELECT * FROM sampling")
    assert row["samples_per_problem"] == 4 and row["num_problems"] == 4
    assert row["maj_at_k"] == pytest.approx(EXPECTED_MAJ_AT_4)
    assert row["mean_accuracy"] == pytest.approx(6 / 16)  # 2 + 1 + 0 + 3 correct of 16
    assert row["pass_at_k"] == pytest.approx(EXPECTED_PASS_AT_K[4])
    [progress] = query(k4_store, "SELECT accuracy FROM progress")
    assert progress["accuracy"] == pytest.approx(6 / 16)  # progress shows the mean accuracy


def test_eval_key_includes_k_and_keeps_the_one_sample_keys():
    assert writer.eval_key("math", SAMPLING, 0, 0, samples_per_problem=1) == writer.eval_key("math", SAMPLING, 0, 0)
    assert "-k4-" in K4_KEY and K4_KEY != writer.eval_key("math", SAMPLING, 0, 0, samples_per_problem=8)


def test_two_samples_with_one_index_are_refused(tmp_path):
    samples = k4_samples()
    samples[1]["sample_index"] = 0
    with pytest.raises(schema.StoreError, match="share a problem_id and sample_index"):
        writer.record_evaluation(tmp_path / "r.duckdb", k4_evaluation(samples), samples)


def _make_version_1(db: Path) -> None:
    """Turn a current store into what version 1 wrote: no sample_index / normalized_answer /
    samples_per_problem columns, no intervals or grades table, its own views, no views_sha."""
    con = duckdb.connect(str(db))
    try:
        for (name,) in con.execute("SELECT name FROM view_descriptions").fetchall():
            con.execute(f"DROP VIEW {name}")
        con.execute("DELETE FROM view_descriptions")
        con.execute("ALTER TABLE samples DROP COLUMN sample_index")
        con.execute("ALTER TABLE samples DROP COLUMN normalized_answer")
        con.execute("ALTER TABLE evaluations DROP COLUMN samples_per_problem")
        con.execute("DROP TABLE intervals")
        con.execute("DROP TABLE grades")
        con.execute("CREATE VIEW progress AS SELECT run_id, step, eval_key, accuracy FROM evaluations")
        con.execute("INSERT INTO view_descriptions VALUES ('progress', 'v1 progress')")
        con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        con.execute("DELETE FROM meta WHERE key = 'views_sha'")
    finally:
        con.close()


def test_a_version_1_store_stays_readable_and_is_migrated_by_the_next_write(tmp_path):
    db = tmp_path / "results.duckdb"
    old = synthetic_samples("run_old", 0, 12)
    assert writer.record_evaluation(db, summarise("run_old", 0, old), old)
    _make_version_1(db)
    assert query(db, "SELECT run_id, step FROM progress") == [{"run_id": "run_old", "step": 0}]  # readable as it was

    samples = k4_samples()
    assert writer.record_evaluation(db, k4_evaluation(samples), samples)  # migrates, then records
    assert query(db, "SELECT value FROM meta WHERE key = 'schema_version'") == [{"value": str(schema.SCHEMA_VERSION)}]
    assert {r["run_id"]: r["samples_per_problem"] for r in query(db, "SELECT * FROM sampling")} == \
        {"run_old": 1, "run_k": 4}
    assert query(db, "SELECT DISTINCT sample_index FROM samples WHERE run_id = 'run_old'") == [{"sample_index": 0}]
    old_accuracy = sum(s["category"] == "correct" for s in old) / len(old)
    assert query(db, "SELECT pass_at_k FROM pass_at_k WHERE run_id = 'run_old'") == \
        [{"pass_at_k": pytest.approx(old_accuracy)}]
    views = {r["view_name"] for r in query(db, "SELECT view_name FROM duckdb_views() WHERE NOT internal")}
    assert views == set(schema.VIEWS)


# ---- intervals -----------------------------------------------------------------------------------


def test_wilson_interval_matches_the_published_example():
    from common.store.stats import wilson

    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3: 81/263 -> 0.2553 to 0.3662,
    # 0/10 -> 0 to 0.2775, 10/10 -> 0.7225 to 1 (inside [0, 1] at the edges).
    assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=5e-5)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=5e-5)
    assert wilson(0, 0) == (None, None)


def test_views_carry_wilson_intervals_for_one_sample(tmp_path):
    from common.store.stats import wilson

    db = tmp_path / "results.duckdb"
    samples = synthetic_samples("run_w", 0, 70)
    evaluation = summarise("run_w", 0, samples)
    writer.record_evaluation(db, evaluation, samples)
    [row] = query(db, "SELECT * FROM progress")
    assert row["interval_method"] == "wilson"
    assert (row["accuracy_low"], row["accuracy_high"]) == pytest.approx(wilson(evaluation["num_correct"], 70))
    assert (row["format_accuracy_low"], row["format_accuracy_high"]) == pytest.approx(
        wilson(evaluation["num_format_correct"], 70))
    for view, column in (("by_subject", "subject"), ("by_level", "level")):
        for group in query(db, f"SELECT * FROM {view}"):
            assert (group["accuracy_low"], group["accuracy_high"]) == pytest.approx(
                wilson(group["num_correct"], group["num_examples"])), (view, group[column])


def test_k_samples_get_a_bootstrap_over_problems(k4_store):
    from common.store.stats import bootstrap_intervals

    [row] = query(k4_store, "SELECT * FROM progress")
    assert row["interval_method"] == "bootstrap_problems"
    # Per-problem accuracies 2/4, 1/4, 0, 3/4: the resampled means lie between 0 and 3/4.
    assert 0.0 <= row["accuracy_low"] < 6 / 16 < row["accuracy_high"] <= 0.75
    expected = bootstrap_intervals({"accuracy": [0.5, 0.25, 0.0, 0.75]})["accuracy"]
    assert (row["accuracy_low"], row["accuracy_high"]) == pytest.approx(expected)
    [subject] = query(k4_store, "SELECT * FROM by_subject")
    assert (subject["accuracy_low"], subject["accuracy_high"]) == pytest.approx(expected)  # one subject: the same


def test_bootstrap_covers_the_true_mean_about_95_percent_of_the_time():
    import random

    from common.store.stats import bootstrap_intervals

    rng, covered = random.Random(1), 0
    for trial in range(200):  # 200 evaluations of 100 problems, each answered right with p = 0.3
        values = [float(rng.random() < 0.3) for _ in range(100)]
        low, high = bootstrap_intervals({"a": values}, replicates=400, seed=trial)["a"]
        covered += low <= 0.3 <= high
    assert 0.89 <= covered / 200 <= 0.99


# ---- paired comparison ---------------------------------------------------------------------------


def test_mcnemar_exact_against_hand_computed_binomial_tails():
    from common.store.stats import mcnemar_exact

    # b=10 learned, c=2 forgotten: 2 * P(Binomial(12, 1/2) <= 2) = 2 * (1 + 12 + 66) / 4096
    assert mcnemar_exact(10, 2) == pytest.approx(158 / 4096)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)  # two-sided
    # b=4, c=2: 2 * (1 + 6 + 15) / 64
    assert mcnemar_exact(4, 2) == pytest.approx(44 / 64)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    # Agresti (2013) Table 11.1 (presidential approval, b=150, c=86): the chi-square test gives
    # p = 3.1e-5; the exact test lies close to it.
    assert 1e-5 < mcnemar_exact(150, 86) < 6e-5


def _paired_samples(right: set[int], n: int = 10, extra: int = 0) -> list[dict]:
    samples = []
    for index in range(n + extra):
        correct = index in right
        samples.append({
            "problem_id": f"test/p{index}.json", "subject": ("algebra", "geometry")[index % 2], "level": 1 + index % 3,
            "response": " </think> <answer> 1 </answer>", "ground_truth": "1", "format_reward": 1.0,
            "answer_reward": float(correct), "reward": float(correct),
            "category": "correct" if correct else "wrong_answer", "response_length": 5, "finish_reason": "stop",
            "token_entropy": None, "grading_note": None,
        })
    return samples


@pytest.fixture(scope="module")
def paired_store(tmp_path_factory) -> Path:
    """run_c step 0 right on problems 0-4, step 50 right on 2-8 and one more problem (10) evaluated:
    learned 5, 6, 7, 8; forgotten 0, 1; step 60 evaluated with another eval key."""
    db = tmp_path_factory.mktemp("paired") / "results.duckdb"
    for step, right, extra in ((0, set(range(5)), 0), (50, set(range(2, 9)), 1)):
        samples = _paired_samples(right, extra=extra)
        assert writer.record_evaluation(db, summarise("run_c", step, samples), samples)
    samples = _paired_samples(set())
    assert writer.record_evaluation(db, {**summarise("run_c", 60, samples), "eval_key": K4_KEY}, samples)
    return db


def bin_query(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "common.store.query", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=120)


def test_compare_gives_difference_interval_mcnemar_and_flips(paired_store):
    from common.store.stats import Z95

    done = bin_query("--db", str(paired_store), "--format", "json", "compare", "run_c:0", "run_c:50", "--flips")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    [summary] = result["summary"]
    assert summary["num_problems"] == 10 and (summary["learned"], summary["forgotten"]) == (4, 2)
    assert summary["accuracy_before"] == pytest.approx(0.5) and summary["accuracy_after"] == pytest.approx(0.7)
    # d = (4 - 2) / 10; half width = z * sqrt(b + c - (b - c)^2 / n) / n = z * sqrt(5.6) / 10
    half = Z95 * math.sqrt(5.6) / 10
    assert (summary["difference"], summary["difference_low"], summary["difference_high"]) == pytest.approx(
        (0.2, 0.2 - half, 0.2 + half))
    assert summary["mcnemar_p"] == pytest.approx(44 / 64)
    flips = {f["problem_id"]: f["flip"] for f in result["flips"]}
    assert flips == {**{f"test/p{i}.json": "learned" for i in (5, 6, 7, 8)},
                     **{f"test/p{i}.json": "forgotten" for i in (0, 1)}}
    subjects = {row["subject"]: (row["learned"], row["forgotten"], row["net"]) for row in result["by_subject"]}
    assert subjects == {"algebra": (2, 1, 1), "geometry": (2, 1, 1)}  # even problems are algebra
    levels = {row["level"]: (row["learned"], row["forgotten"]) for row in result["by_level"]}
    assert levels == {1: (1, 1), 2: (1, 1), 3: (2, 0)}  # level 1 + index % 3: learned 5,6,7,8 -> 3,1,2,3; forgotten 0,1 -> 1,2
    # Problem 10 exists only after: compared on the shared ones, and said so in one line.
    [warning] = done.stderr.strip().splitlines()
    assert "compared on the 10 problems both evaluated" in warning


def test_the_flips_view_lists_the_same_flips(paired_store):
    sql = "SET VARIABLE before = 'run_c:0'; SET VARIABLE after = 'run_c:50'; " \
          "SELECT flip, count(*) AS n FROM flips GROUP BY flip ORDER BY flip"
    done = bin_query("--db", str(paired_store), "--format", "json", sql)
    assert done.returncode == 0, done.stderr
    assert {r["flip"]: r["n"] for r in json.loads(done.stdout)} == {"forgotten": 2, "kept_right": 3,
                                                                   "kept_wrong": 1, "learned": 4}


def test_compare_refuses_different_eval_configs_and_unknown_steps_in_one_line(paired_store):
    for refs, named in ((("run_c:0", "run_c:60"), "different eval configs"), (("run_c:0", "run_c:999"), "run_c:999"),
                        (("run_c:0", "run_c"), "RUN:STEP")):
        done = bin_query("--db", str(paired_store), "compare", *refs)
        assert done.returncode == 2 and named in done.stderr and len(done.stderr.strip().splitlines()) == 1, refs


# ---- regrading -----------------------------------------------------------------------------------


def test_graders_follow_their_published_semantics():
    from common.store.graders import cs336_equivalent, math_verify_equivalent
    from common.grading import fast_verdict

    # An unreduced fraction: mathsft and math-verify compare values, the CS336 grader compares it as written.
    assert fast_verdict("\\frac{2}{4}", "\\frac{1}{2}") is True
    assert math_verify_equivalent("\\frac{2}{4}", "\\frac{1}{2}")
    assert not cs336_equivalent("\\frac{2}{4}", "\\frac{1}{2}")
    # Its MATH normalisation and its PRM800K normalisation (integers, units, text).
    assert cs336_equivalent("\\frac12", "0.5") and cs336_equivalent("3.0", "3")
    assert cs336_equivalent("5 \\text{ cm}", "5") and cs336_equivalent("\\text{(B)}", "(B)")
    assert cs336_equivalent("x^2+2x+1", "(x+1)^2")  # sympy on the normalised text
    assert not cs336_equivalent("4", "3") and not cs336_equivalent("(1,2]", "[1,2)")  # brackets must agree


def _regrade_store(db: Path) -> None:
    """One evaluation of four responses, graded by the eval daemon (mathsft) as: correct (2/4 for 1/2),
    correct, wrong, format failure."""
    responses = [(" </think> <answer> \\frac{2}{4} </answer>", "\\frac{1}{2}", "correct"),
                 (" </think> <answer> \\frac{1}{2} </answer>", "\\frac{1}{2}", "correct"),
                 (" </think> <answer> 3 </answer>", "4", "wrong_answer"),
                 (" no tags 4", "4", "format_failure")]
    samples = []
    for index, (response, truth, category) in enumerate(responses):
        correct = category == "correct"
        samples.append({"problem_id": f"test/r{index}.json", "subject": "algebra", "level": 1, "response": response,
                        "ground_truth": truth, "format_reward": 0.0 if category == "format_failure" else 1.0,
                        "answer_reward": float(correct), "reward": float(correct), "category": category,
                        "format_failure_type": "missing_think_close" if category == "format_failure" else None,
                        "response_length": 9, "finish_reason": "stop", "token_entropy": None})
    assert writer.record_evaluation(db, summarise("run_r", 10, samples), samples)


def test_regrade_is_idempotent_and_counts_disagreements(tmp_path, capsys):
    from common.store import regrade

    db = tmp_path / "results.duckdb"
    _regrade_store(db)
    args = ["--db", str(db), "--grader", "cs336", "--workers", "1", "run_r:10", "--samples"]
    assert regrade.main(args) == 0
    first = query(db, "SELECT * FROM grades ORDER BY problem_id")
    assert len(first) == 4 and {r["grader"] for r in first} == {"cs336"}
    assert [r["category"] for r in first] == ["wrong_answer", "correct", "wrong_answer", "format_failure"]
    assert regrade.main(args) == 0  # twice: the same rows, nothing added
    assert query(db, "SELECT * FROM grades ORDER BY problem_id") == first
    [counts] = [dict(zip(*(lambda c, r: (c, r[0]))(*regrade.disagreements(db, "cs336", "run_r", 10))))]
    assert counts == {"run_id": "run_r", "step": 10, "eval_key": counts["eval_key"], "responses": 4,
                      "correct_recorded": 2, "correct_regraded": 1, "only_recorded_correct": 1,
                      "only_regraded_correct": 0}
    assert capsys.readouterr().out.count("test/r0.json") == 2  # listed once per run with --samples
    by_grader = {r["grader"]: r["accuracy"] for r in query(db, "SELECT * FROM accuracy_by_grader")}
    assert by_grader == {"recorded": 0.5, "cs336": 0.25}  # one query away
    [disagreement] = query(db, "SELECT problem_id, recorded_category, grader_category FROM grade_disagreements")
    assert disagreement == {"problem_id": "test/r0.json", "recorded_category": "correct",
                            "grader_category": "wrong_answer"}
    assert query(db, "SELECT count(*) AS n FROM samples WHERE category = 'correct'") == [{"n": 2}]  # original untouched


def test_regrade_refuses_an_unknown_step_in_one_line(tmp_path, capsys):
    from common.store import regrade

    db = tmp_path / "results.duckdb"
    _regrade_store(db)
    assert regrade.main(["--db", str(db), "--grader", "math-verify", "run_r:99"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("regrade: error: no successful evaluation of run_r step 99")
