"""Grader throughput: responses graded per second, and the projected time for a 5,000-problem evaluation.

Builds real-looking R1-zero responses from ../shared/data/MATH test solutions (or, without it, from a
small built-in set): correct answers as written, correct answers in other forms, wrong answers, format
failures, and optionally a few adversarial answers; grades them with common.grading.Grader at
workers=1 and 2 (workers started before the clock starts) and prints a table.

    python bench/grader.py                       # 5,000 MATH test problems (or the built-in set)
    python bench/grader.py --n 1000 --workers 2  # a smaller run
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.boxed import last_boxed  # noqa: E402
from common.grading import Grader  # noqa: E402

MATH_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "MATH" / "test"
EVAL_SIZE = 5_000
BUILT_IN = [  # (solution, answer) when ../shared is absent
    ("Adding gives $2+3=5$.", "5"), ("Halve it: $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("The roots are $-2$ and $3$.", "-2, 3"),
    ("So $r=3$ and $\\theta=\\frac{\\pi}{2}$.", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("Solve to get $x\\in(1,2]$.", "(1,2]"), ("The diagonal is $\\sqrt{2}/2$.", "\\frac{\\sqrt{2}}{2}"),
    ("Expand: $x^2+2x+1$.", "(x+1)^2"), ("It costs $\\$18.90$.", "18.90"), ("The angle is $30^\\circ$.", "30^\\circ"),
    ("There are $1{,}000$ ways.", "1000"), ("The answer is $\\text{(C)}$.", "\\text{(C)}"),
    ("So $-\\frac{7}{4}$.", "-\\frac{7}{4}"),
]
ADVERSARIAL = ["9^{9^{9^{9}}}", "(" * 2000 + "1" + ")" * 2000, "x" * 100_000]


def load_problems(n: int, seed: int) -> list[tuple[str, str]]:
    """(solution, answer) pairs: MATH test when present, else the built-in set repeated."""
    if MATH_TEST.is_dir():
        rows = [json.loads(path.read_text()) for path in sorted(MATH_TEST.glob("*/*.json"))]
        pairs = [(row["solution"], last_boxed(row["solution"])) for row in rows]
        pairs = [(solution, answer) for solution, answer in pairs if answer]
    else:
        logging.warning("%s is absent: using %d built-in problems", MATH_TEST, len(BUILT_IN))
        pairs = BUILT_IN
    random.Random(seed).shuffle(pairs := list(pairs))
    return [pairs[index % len(pairs)] for index in range(n)]


def other_form(answer: str) -> str:
    """An equivalent way to write an answer, as a model might."""
    if answer.lstrip("-").isdigit():
        return random.choice([f"x = {answer}", f"{answer}.0", f"\\boxed{{{answer}}}", f"{answer} \\text{{ units}}"])
    return random.choice([answer.replace("\\frac", "\\dfrac"), f"${answer}$", f"\\boxed{{{answer}}}",
                          answer.replace(" ", "")])


def wrong_form(answer: str, answers: list[str]) -> str:
    """A model's slip (one digit of the right answer changed), or another problem's answer when it has no digit."""
    digits = [index for index, char in enumerate(answer) if char.isdigit()]
    if not digits:
        return random.choice(answers)
    index = random.choice(digits)
    return answer[:index] + str((int(answer[index]) + random.randint(1, 9)) % 10) + answer[index + 1:]


def build_responses(problems: list[tuple[str, str]], adversarial: int, seed: int) -> tuple[list[str], list[str]]:
    """Responses and ground truths: 45% correct as written, 10% other forms, 35% wrong, 10% format failures."""
    random.seed(seed)
    answers = [answer for _, answer in problems]
    responses = []
    for solution, answer in problems:
        reasoning = solution.replace("\\boxed", "")
        roll = random.random()
        given = answer if roll < 0.45 else other_form(answer) if roll < 0.55 else wrong_form(answer, answers)
        if roll < 0.9:
            responses.append(f" {reasoning} </think> <answer> {given} </answer>")
        else:
            responses.append(random.choice([f" {reasoning}", f" {reasoning} </think>\n<answer> {given} </answer>",
                                            f" {reasoning} </think> <answer> {given}"]))
    for index in range(adversarial):
        responses[index] = f" hmm </think> <answer> {ADVERSARIAL[index % len(ADVERSARIAL)]} </answer>"
    return responses, answers


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of live processes (Linux /proc), to tell our work from the machine's load."""
    total = 0
    for pid in [os.getpid(), *pids]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # a worker replaced after a hard timeout: its time is lost
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def measure(responses: list[str], truths: list[str], workers: int, timeout_s: float) -> dict:
    """Seconds and CPU seconds with a fresh pool; seconds for the same batch again (verdicts remembered).

    Worker start-up is not timed: the eval daemon starts its pool once, before its loop."""
    with Grader(workers) as grader:
        grader.start()
        cpu, started = cpu_seconds(grader.pids), time.perf_counter()
        results = grader.grade(responses, truths, timeout_s)
        seconds, cpu = time.perf_counter() - started, cpu_seconds(grader.pids) - cpu
        started = time.perf_counter()
        grader.grade(responses, truths, timeout_s)
        return {"seconds": seconds, "cpu": cpu, "repeat": time.perf_counter() - started, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=EVAL_SIZE, help="responses per run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--adversarial", type=int, default=3, help="adversarial answers in the second scenario")
    parser.add_argument("--timeout", type=float, default=5.0, help="grading timeout per answer (s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    problems = load_problems(args.n, args.seed)
    print(f"# grader bench {datetime.datetime.now().isoformat(timespec='seconds')}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}, n={args.n}, timeout={args.timeout:g} s, "
          f"source={'MATH test' if MATH_TEST.is_dir() else 'built-in'}")
    print(f"{'scenario':<18}{'workers':>8}{'seconds':>9}{'cpu s':>7}{'resp/s':>8}{'5k projected s':>16}"
          f"{'repeat s':>10}{'accuracy':>10}{'timeouts':>10}")
    typical_seconds = {}
    for adversarial in (0, args.adversarial):
        responses, truths = build_responses(problems, adversarial, args.seed)
        for workers in args.workers:
            run = measure(responses, truths, workers, args.timeout)
            results, seconds = run["results"], run["seconds"]
            accuracy = sum(result["reward"] for result in results) / len(results)
            timeouts = sum(result["grading_note"] == "timeout" for result in results)
            # Adversarial answers cost a fixed time each (the timeout): add it to the typical projection.
            typical_seconds.setdefault(workers, seconds)
            projected = typical_seconds[workers] * EVAL_SIZE / len(results) + seconds - typical_seconds[workers]
            name = "typical" if adversarial == 0 else f"+{adversarial} adversarial"
            print(f"{name:<18}{workers:>8}{seconds:>9.2f}{run['cpu']:>7.1f}{len(results) / seconds:>8.0f}"
                  f"{projected:>16.2f}{run['repeat']:>10.2f}{accuracy:>10.3f}{timeouts:>10}")

if __name__ == "__main__":
    main()
