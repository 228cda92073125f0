"""Grader: format rules, answer equivalence, the worker pool's timeouts and crashes, real MATH-500 answers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pebble
import pytest

from common.grading import (HARD_KILL_GRACE_S, Grader, default_grader, extract_answer, fast_verdict,
                            format_failure_type, grade_batch, ground_truth_answer, r1_zero_reward, shutdown,
                            strip_string)

REPO_ROOT = Path(__file__).resolve().parents[1]

TIMEOUT_S = 2.0


def wrap(answer: str) -> str:
    return f" reasoning </think> <answer> {answer} </answer>"


@pytest.fixture(scope="module")
def grader():
    with Grader(workers=2) as pool:
        pool.start()
        yield pool


def answer_rewards(grader: Grader, pairs: list[tuple[str, str]]) -> list[float]:
    results = grader.grade([wrap(answer) for answer, _ in pairs], [truth for _, truth in pairs], TIMEOUT_S * 3)
    return [result["answer_reward"] for result in results]


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent (maybe init) has yet to reap it


# ---- format ----------------------------------------------------------------------------------


@pytest.mark.parametrize("response, finish_reason, expected", [
    (" 2+3=5 </think> <answer> 5 </answer>", "stop", None),
    (" 2+3=5 so the answer is 5", "stop", "missing_think_close"),
    (" 2+3=5 </think>\n<answer> 5 </answer>", "stop", "missing_answer_open"),
    (" 2+3=5 </think> the answer is 5 </answer>", "stop", "missing_answer_open"),
    (" 2+3=5 </think> <answer> 5", "stop", "missing_answer_close"),
    (" 2+3=5 and", "stop", "missing_think_close"),  # several pieces missing: the first in reading order
    (" 2+3=5 </think> <answer> 5", "length", "incomplete_generation"),  # cut by max_tokens wins
    (" 2+3=5 and", "length", "incomplete_generation"),
    (" 2+3=5 </think> <answer> 5 </answer>", "length", None),  # a complete format is not a failure
])
def test_format_failure_type(response, finish_reason, expected):
    assert format_failure_type(response, finish_reason) == expected


def test_format_failure_means_zero_reward_even_for_a_right_answer():
    grader = Grader(workers=1)  # format failures never reach the pool
    responses = [" <answer> 5 </answer>", " 2+3 </think>\n<answer> 5 </answer>", " 2+3 </think> <answer> 5"]
    results = grader.grade(responses, ["5"] * 3, TIMEOUT_S)
    for result in results:
        assert (result["format_reward"], result["answer_reward"], result["reward"]) == (0.0, 0.0, 0.0)
    assert [result["format_failure_type"] for result in results] == [
        "missing_think_close", "missing_answer_open", "missing_answer_close"]


def test_finish_reasons_mark_incomplete_generations():
    grader = Grader(workers=1)  # "5" against "5" is settled by the fast path
    responses = [" long </think> <answer> 5", wrap("5")]
    results = grader.grade(responses, ["5", "5"], TIMEOUT_S, finish_reasons=["length", "length"])
    assert [result["format_failure_type"] for result in results] == ["incomplete_generation", None]
    assert [result["reward"] for result in results] == [0.0, 1.0]


def test_last_answer_wins_and_boxed_inside_answer_is_taken():
    assert extract_answer(" a </think> <answer> 3 </answer> wait, no: <answer> 4 </answer>") == "4"
    assert extract_answer(" a </think> <answer> The answer is \\boxed{\\frac{1}{2}}. </answer>") == "\\frac{1}{2}"
    assert extract_answer(" a </think> <answer> 3 </answer> <answer> 4") == "3"  # the last complete pair
    assert extract_answer(" a </think> 3") is None


def test_ground_truth_may_be_a_full_solution():
    assert ground_truth_answer("So $x=2$ and the answer is $\\boxed{\\frac{3}{4}}$.") == "\\frac{3}{4}"
    assert ground_truth_answer(" (1,2] ") == "(1,2]"


def test_r1_zero_reward_keys_and_values():
    right = r1_zero_reward(wrap("\\boxed{\\dfrac12}"), "The answer is $\\boxed{0.5}$.")
    assert right == {"format_reward": 1.0, "answer_reward": 1.0, "reward": 1.0}
    wrong = r1_zero_reward(wrap("3"), "2")
    assert wrong == {"format_reward": 1.0, "answer_reward": 0.0, "reward": 0.0}
    assert all(isinstance(value, float) for value in right.values())


# ---- equivalence -----------------------------------------------------------------------------

EQUIVALENT = [
    ("0.5", "\\frac{1}{2}"), ("1/2", "\\frac{1}{2}"), ("\\dfrac12", "\\frac{1}{2}"), ("\\tfrac{1}{2}", "0.5"),
    (".5", "\\frac12"), ("0.25", "\\frac{1}{4}"), ("2.50", "2.5"), ("1.5", "\\frac{3}{2}"),
    ("\\frac{3}{2}", "1\\frac{1}{2}"),
    ("1,000", "1000"), ("10,\\!000", "10000"),
    ("x = 3", "3"), ("3", "x=3"), ("k=-2", "-2"), ("x=\\frac{1}{2}", "0.5"),
    ("5 \\text{ cm}", "5"), ("5", "5\\text{ cm}"), ("\\text{Devon}", "Devon"), ("\\text{(C)}", "C"),
    ("30^\\circ", "30"), ("30", "30^{\\circ}"), ("50\\%", "50"), ("\\$18.90", "18.90"), ("$\\frac{3}{4}$", "\\frac34"),
    ("(1, 2]", "(1,2]"), ("[-1, \\infty)", "[-1,\\infty)"),
    ("(-\\infty, 0) \\cup (1, \\infty)", "(1,\\infty)\\cup(-\\infty,0)"),
    ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("(3,\\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\{1, 2, 3\\}", "\\{3,2,1\\}"), ("1, -2", "-2, 1"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"), ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}"),
    ("2\\sqrt{3}", "\\sqrt{12}"),
    ("\\sqrt2", "\\sqrt{2}"), ("- 3", "-3"), ("-\\frac{1}{2}", "\\frac{-1}{2}"), ("-0.5", "-\\frac12"),
    ("(x+1)^2", "x^2+2x+1"), ("\\frac{x}{2}", "0.5x"), ("2\\pi", "2 \\pi"), ("3.", "3"), ("\\infty", "\\infty"),
    ("\\frac{1}{\\sqrt{3}}.", "\\frac{\\sqrt3}{3}"), ("(0.5, -3)", "\\left(\\frac12,-3\\right)"),
    ("\\{2, 1\\}", "\\{1,2\\}"),
]

NOT_EQUIVALENT = [
    ("(1,2)", "[1,2]"), ("2", "3"), ("1/2", "2"), ("-3", "3"), ("(\\frac{\\pi}{2}, 3)", "(3, \\frac{\\pi}{2})"),
    ("\\frac{1}{3}", "0.33"), ("x^2+1", "(x+1)^2"), ("\\{1,2\\}", "\\{1,2,3\\}"), ("", "5"), ("(1, 2]", "[1, 2)"),
    ("\\sqrt{2}", "2"), ("0.5", "5"), ("1000", "100"), ("\\frac{2}{3}", "\\frac{3}{2}"), ("\\text{(B)}", "C"),
    ("2\\sqrt{2}", "\\sqrt{2}"), ("-5100", "-5, 100"), ("17,\\!281", "17,\\!280"), ("(3,-8)", "(3,-4)"),
    ("1, 3", "3, 2"),
]


@pytest.mark.slow  # real worker processes
def test_equivalent_forms_are_graded_right(grader):
    rewards = answer_rewards(grader, EQUIVALENT)
    wrong = [pair for pair, reward in zip(EQUIVALENT, rewards) if reward != 1.0]
    assert not wrong, f"graded wrong: {wrong}"


@pytest.mark.slow  # real worker processes
def test_different_answers_are_graded_wrong(grader):
    rewards = answer_rewards(grader, NOT_EQUIVALENT)
    right = [pair for pair, reward in zip(NOT_EQUIVALENT, rewards) if reward != 0.0]
    assert not right, f"graded right: {right}"


@pytest.mark.parametrize("raw, normalised", [
    ("\\dfrac12", "\\frac{1}{2}"), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("x = 3", "3"), ("5 \\text{ cm}", "5"), ("30^\\circ", "30"), ("\\sqrt2/2", "\\frac{\\sqrt{2}}{2}"),
    ("$1/2$", "\\frac{1}{2}"), ("10,\\!000.", "10,000"), ("50\\%", "50"), ("f(x) = 3", "f(x)=3"),
])
def test_strip_string(raw, normalised):
    assert strip_string(raw) == normalised


def test_fast_path_settles_plain_numbers_without_starting_workers():
    assert fast_verdict("0.5", "\\frac{1}{2}") is True
    assert fast_verdict("\\frac{1}{3}", "0.33") is False
    assert fast_verdict("50\\%", "0.5") is None  # math-verify reads percentages: left to it
    assert fast_verdict("(3, \\pi)", "(\\pi, 3)") is None
    with Grader(workers=1) as fresh:
        results = fresh.grade([wrap("3"), wrap("x = 4"), wrap("\\dfrac{1}{2}")], ["3", "5", "0.5"], TIMEOUT_S)
        assert [result["reward"] for result in results] == [1.0, 0.0, 1.0]
        assert fresh.pids == []


@pytest.mark.slow  # real worker processes
@pytest.mark.timeout(120)  # a broken pool hangs: fail instead
def test_a_repeated_batch_is_answered_from_remembered_verdicts():
    responses, truths = [wrap("(x+1)^2"), wrap("x^2")], ["x^2+2x+1", "x^2+1"]
    with Grader(workers=1) as pool:
        first = pool.grade(responses, truths, TIMEOUT_S * 5)
        [pid] = pool.pids
        os.kill(pid, signal.SIGSTOP)  # the pool cannot answer now: the verdicts must come from memory
        try:
            assert pool.grade(responses, truths, TIMEOUT_S) == first
        finally:
            os.kill(pid, signal.SIGCONT)
    assert [result["reward"] for result in first] == [1.0, 0.0]


def test_batch_lengths_must_match():
    grader = Grader(workers=1)  # refused before anything reaches the pool
    with pytest.raises(ValueError, match="2 responses, 1 ground truths and 2 finish reasons"):
        grader.grade([wrap("1"), wrap("2")], ["1"])
    with pytest.raises(ValueError, match="1 responses, 1 ground truths and 2 finish reasons"):
        grader.grade([wrap("1")], ["1"], finish_reasons=["stop", "stop"])


# ---- timeouts, hung and dead workers ---------------------------------------------------------

ADVERSARIAL = ["9^{9^{9^{9}}}", "10^{10^{10^{10}}}", "(" * 2000 + "1" + ")" * 2000, "x" * 100_000,
               "\\frac{" * 500 + "1" + "}{2}" * 500]


@pytest.mark.slow  # real worker processes
@pytest.mark.timeout(120)  # a broken pool hangs: fail instead
def test_adversarial_answers_return_within_the_timeout(grader):
    timeout_s = 1.0
    responses = [wrap(answer) for answer in ADVERSARIAL] + [wrap("(x+1)^2")]
    started = time.monotonic()
    results = grader.grade(responses, ["3"] * len(ADVERSARIAL) + ["x^2+2x+1"], timeout_s)
    elapsed = time.monotonic() - started
    # Two workers, each answer at most timeout + grace: a behaviour bound, not a speed benchmark.
    assert elapsed < len(ADVERSARIAL) * (timeout_s * 3 + 5) / 2
    for answer, result in zip(ADVERSARIAL, results):
        assert result["answer_reward"] == 0.0, answer[:30]
        assert result["grading_note"] in ("timeout", ""), answer[:30]
    assert any(result["grading_note"] == "timeout" for result in results)
    assert results[-1]["reward"] == 1.0 and results[-1]["grading_note"] == ""  # the batch is not poisoned


SLOW_CHECK = "9^{9^{9^{9}}}"  # math-verify works on it until the worker's timer stops it


def signal_during_check(pids: list[int], signum: int, delay_s: float = 1.0) -> threading.Timer:
    """Send signum to the workers once they are busy with the batch that the caller grades now."""
    timer = threading.Timer(delay_s, lambda: [os.kill(pid, signum) for pid in pids])
    timer.start()
    return timer


@pytest.mark.slow  # real worker processes
@pytest.mark.timeout(120)  # a broken pool hangs: fail instead
def test_a_hung_worker_is_killed_and_replaced():
    with Grader(workers=2) as pool:
        pool.start()
        stuck = pool.pids
        # Frozen mid-check: not even the worker's own timer can run, as in a C loop that ignores it.
        freezer = signal_during_check(stuck, signal.SIGSTOP)
        started = time.monotonic()
        results = pool.grade([wrap(SLOW_CHECK), wrap("10^{10^{10^{10}}}")], ["3", "4"], TIMEOUT_S)
        freezer.join()
        # timeout + grace, then pebble's SIGTERM -> SIGKILL wait per frozen worker
        assert time.monotonic() - started < TIMEOUT_S + HARD_KILL_GRACE_S + 2 * pebble.CONSTS.term_timeout + 5
        assert [result["grading_note"] for result in results] == ["timeout", "timeout"]
        assert [result["reward"] for result in results] == [0.0, 0.0]
        assert not any(is_alive(pid) for pid in stuck)
        assert set(pool.pids).isdisjoint(stuck)
        again = pool.grade([wrap("(x+1)^2")], ["x^2+2x+1"], TIMEOUT_S)  # the new workers grade
        assert again[0]["reward"] == 1.0 and again[0]["grading_note"] == ""


@pytest.mark.slow  # real worker processes
@pytest.mark.timeout(120)  # a broken pool hangs: fail instead
def test_a_worker_killed_while_idle_is_replaced_and_the_batch_is_graded():
    with Grader(workers=2) as pool:
        pool.start()
        for pid in pool.pids:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        results = pool.grade([wrap("(x+1)^2"), wrap("x^2")], ["x^2+2x+1", "x^2+1"], TIMEOUT_S * 5)
        assert [result["answer_reward"] for result in results] == [1.0, 0.0]
        assert [result["grading_note"] for result in results] == ["", ""]


@pytest.mark.slow  # real worker processes
@pytest.mark.timeout(120)  # a broken pool hangs: fail instead
def test_a_worker_dying_mid_check_grades_that_answer_wrong_with_a_note():
    with Grader(workers=1) as pool:
        pool.start()
        killer = signal_during_check(pool.pids, signal.SIGKILL)
        results = pool.grade([wrap(SLOW_CHECK)], ["3"], timeout_s=30)
        killer.join()
        assert results[0]["grading_note"] == "worker_crashed" and results[0]["reward"] == 0.0
        again = pool.grade([wrap("(x+1)^2")], ["x^2+2x+1"], TIMEOUT_S)  # its replacement grades
        assert again[0]["reward"] == 1.0 and again[0]["grading_note"] == ""


@pytest.mark.slow  # real worker processes
def test_close_and_interpreter_exit_leave_no_workers():
    with Grader(workers=2) as pool:
        pool.start()
        pids = pool.pids
    assert not any(is_alive(pid) for pid in pids)
    script = ("from common.grading import default_grader, grade_batch\n"
              "if __name__ == '__main__':\n"
              "    grade_batch([' a </think> <answer> (x+1)^2 </answer>'], ['x^2+2x+1'], workers=2)\n"
              "    print(*default_grader(2).pids)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr
    child_pids = [int(pid) for pid in done.stdout.split()]
    assert len(child_pids) == 2
    time.sleep(0.5)
    assert not any(is_alive(pid) for pid in child_pids)


@pytest.mark.slow  # real worker processes
@pytest.mark.timeout(120)
def test_workers_exit_when_their_parent_is_killed():
    script = ("import sys, time\n"
              "from common.grading import Grader\n"
              "if __name__ == '__main__':\n"
              "    pool = Grader(workers=2)\n"
              "    pool.start()\n"
              "    print(*pool.pids, flush=True)\n"
              "    time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        worker_pids = [int(pid) for pid in parent.stdout.readline().split()]
    finally:
        parent.kill()
        parent.wait()
    assert len(worker_pids) == 2
    deadline = time.monotonic() + 10
    while any(is_alive(pid) for pid in worker_pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(is_alive(pid) for pid in worker_pids)


@pytest.mark.slow  # real worker processes
def test_module_level_grade_batch_reuses_its_pool():
    try:
        first = grade_batch([wrap("(x+1)^2")], ["x^2+2x+1"], workers=1)
        pids = default_grader(1).pids
        second = grade_batch([wrap("x^2")], ["x^2+1"], workers=1)
        assert default_grader(1).pids == pids and len(pids) == 1
        assert [first[0]["reward"], second[0]["reward"]] == [1.0, 0.0]
    finally:
        shutdown()


# ---- real data -------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow  # real worker processes
def test_math500_answers_grade_right_against_their_solutions(shared_dir):
    rows = [json.loads(line) for line in (shared_dir / "data" / "MATH-500" / "test.jsonl").read_text().splitlines()]
    responses = [wrap(row["answer"]) for row in rows]
    with Grader(workers=2) as pool:
        results = pool.grade(responses, [row["solution"] for row in rows], timeout_s=10)
    failures = [(row["unique_id"], row["answer"]) for row, result in zip(rows, results) if result["reward"] != 1.0]
    assert len(failures) <= 0.01 * len(rows), f"{len(failures)} of {len(rows)} graded wrong: {failures}"


@pytest.mark.integration
@pytest.mark.slow  # real worker processes
def test_math500_answers_pass_the_symbolic_check_too(shared_dir):
    # The fast path settles the test above by string equality; this sends the same answers through
    # math-verify/sympy alone (~2 s for the 500 on 2 cores).
    rows = [json.loads(line) for line in (shared_dir / "data" / "MATH-500" / "test.jsonl").read_text().splitlines()]
    with Grader(workers=2, fast_path=False) as pool:
        results = pool.grade([wrap(row["answer"]) for row in rows], [row["solution"] for row in rows], timeout_s=10)
    failures = [(row["unique_id"], row["answer"]) for row, result in zip(rows, results) if result["reward"] != 1.0]
    assert len(failures) <= 0.01 * len(rows), f"{len(failures)} of {len(rows)} graded wrong: {failures}"


@pytest.mark.integration
@pytest.mark.slow  # real worker processes
def test_fast_path_never_fails_an_answer_that_math_verify_accepts(shared_dir):
    # Fast-path "wrong" verdicts (numbers, tuples, lists compared by value) on real answers, their
    # slips and their rewritings must agree with math-verify/sympy.
    rows = [json.loads(line) for line in (shared_dir / "data" / "MATH-500" / "test.jsonl").read_text().splitlines()]
    answers = [row["answer"] for row in rows]
    def slip(answer: str) -> str:  # the first digit off by one
        return re.sub(r"\d", lambda digit: str((int(digit[0]) + 1) % 10), answer, count=1)

    pairs = [(variant, answer) for index, answer in enumerate(answers) for variant in (
        answers[(index * 7 + 3) % len(answers)], slip(answer), answer.replace(",", ", "),
        answer.replace("\\frac", "\\dfrac") + ".", f"x = {answer}")]
    wrong = [pair for pair in pairs if fast_verdict(*pair) is False]
    assert len(wrong) > 500  # enough fast verdicts for the check to mean something
    with Grader(workers=2, fast_path=False) as pool:
        results = pool.grade([wrap(answer) for answer, _ in wrong], [truth for _, truth in wrong], timeout_s=10)
    disagree = [pair for pair, result in zip(wrong, results) if result["answer_reward"] == 1.0]
    assert not disagree, f"fast path graded these wrong, math-verify right: {disagree}"
