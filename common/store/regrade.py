"""bin/regrade: re-score the stored responses with another grader, without regenerating anything.

    bin/regrade --grader cs336                      # every successful evaluation in the store
    bin/regrade --grader math-verify run_a:300      # RUN or RUN:STEP
    bin/regrade --grader cs336 run_a --samples      # also list the responses where the graders disagree

Graders (common/store/graders.py): mathsft (the eval daemon's), cs336 (the CS336 / Dr. GRPO reward, fast
mode), math-verify. Verdicts go to the `grades` table, one row per response and grader; the eval
daemon's verdict in `samples` stays as it was. A response already graded by that grader is not
graded again, so running the same command twice leaves the same rows. Then it prints, per
evaluation, how many responses each side scored correct and where they disagree (counts; with
--samples the disagreeing responses). The views `accuracy_by_grader` and `grade_disagreements`
hold the same. Writes in one short transaction with the store's lock retry, like the eval daemon,
so it is safe while the daemon runs.
Exit codes: 0 ok, 2 unknown grader / no such run or step / no store, 1 store busy too long.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from common.cli import ToolParser
from common.store.graders import GRADERS
from common.grading import Grader, GraderError, categorize
from common.store.query import BROKEN_PIPE_EXIT_CODE, DEFAULT_DB, format_table, print_stdout, report_error
from common.store.schema import StoreError, connect_read_only
from common.store.writer import record_grades, upgrade

logger = logging.getLogger(__name__)


class RegradeError(ValueError):
    """Nothing to regrade as asked (one-line message)."""


def _target(text: str | None) -> tuple[str | None, int | None]:
    if text is None:
        return None, None
    run_id, _, step = text.partition(":")
    if not run_id or (step and not step.lstrip("-").isdigit()):
        raise RegradeError(f"{text!r} is not RUN or RUN:STEP; e.g. run_a or run_a:300")
    return run_id, int(step) if step else None


def ungraded_samples(db_path: Path, grader: str, run_id: str | None, step: int | None) -> list[dict]:
    """The responses of successful evaluations (of RUN[:STEP]) that `grader` has not graded yet."""
    with connect_read_only(db_path) as con:
        found = con.execute("SELECT count(*) FROM evaluations WHERE status = 'ok' AND (? IS NULL OR run_id = ?) "
                            "AND (? IS NULL OR step = ?)", [run_id, run_id, step, step]).fetchone()[0]
        if not found:
            what = "the store" if run_id is None else f"{run_id}" + ("" if step is None else f" step {step}")
            raise RegradeError(f"no successful evaluation of {what} in {db_path}; see bin/query progress")
        result = con.execute(
            """SELECT s.run_id, s.step, s.eval_key, s.problem_id, s.sample_index, s.response, s.ground_truth,
                      s.finish_reason
               FROM samples s JOIN evaluations e USING (run_id, step, eval_key)
               ANTI JOIN grades g ON g.run_id = s.run_id AND g.step = s.step AND g.eval_key = s.eval_key
                    AND g.problem_id = s.problem_id AND g.sample_index = s.sample_index AND g.grader = ?
               WHERE e.status = 'ok' AND (? IS NULL OR s.run_id = ?) AND (? IS NULL OR s.step = ?)
               ORDER BY s.run_id, s.step, s.eval_key, s.problem_id, s.sample_index""",
            [grader, run_id, run_id, step, step])
        names = [column[0] for column in result.description]
        return [dict(zip(names, row)) for row in result.fetchall()]


def grade_rows(samples: list[dict], grader_name: str, workers: int, timeout_s: float) -> list[dict]:
    """Grade the responses with `grader_name`; the `grades` rows."""
    equivalent, fast_path = GRADERS[grader_name]
    with Grader(workers=workers, fast_path=fast_path, equivalent=equivalent) as grader:
        verdicts = grader.grade([s["response"] or "" for s in samples], [s["ground_truth"] or "" for s in samples],
                                timeout_s, [s["finish_reason"] or "stop" for s in samples])
    return [{**{k: s[k] for k in ("run_id", "step", "eval_key", "problem_id", "sample_index")}, "grader": grader_name,
             **{k: v[k] for k in ("format_reward", "answer_reward", "reward")},
             "category": categorize(v["format_reward"], v["answer_reward"]), "grading_note": v["grading_note"] or None}
            for s, v in zip(samples, verdicts)]


def disagreements(db_path: Path, grader: str, run_id: str | None, step: int | None) -> tuple[list[str], list[tuple]]:
    """Per evaluation: responses, correct as recorded, correct under `grader`, and the two kinds of disagreement."""
    with connect_read_only(db_path) as con:
        result = con.execute(
            """SELECT g.run_id, g.step, g.eval_key, count(*) AS responses,
                      count(*) FILTER (WHERE s.category = 'correct') AS correct_recorded,
                      count(*) FILTER (WHERE g.category = 'correct') AS correct_regraded,
                      count(*) FILTER (WHERE s.category = 'correct' AND g.category <> 'correct') AS only_recorded_correct,
                      count(*) FILTER (WHERE s.category <> 'correct' AND g.category = 'correct') AS only_regraded_correct
               FROM grades g JOIN samples s USING (run_id, step, eval_key, problem_id, sample_index)
               WHERE g.grader = ? AND (? IS NULL OR g.run_id = ?) AND (? IS NULL OR g.step = ?)
               GROUP BY g.run_id, g.step, g.eval_key ORDER BY g.run_id, g.eval_key, g.step""",
            [grader, run_id, run_id, step, step])
        return [column[0] for column in result.description], result.fetchall()


def disagreeing_samples(db_path: Path, grader: str, run_id: str | None, step: int | None) -> tuple[list[str], list[tuple]]:
    with connect_read_only(db_path) as con:
        result = con.execute(
            "SELECT run_id, step, problem_id, sample_index, recorded_category, grader_category, normalized_answer, "
            "ground_truth FROM grade_disagreements WHERE grader = ? AND (? IS NULL OR run_id = ?) "
            "AND (? IS NULL OR step = ?)", [grader, run_id, run_id, step, step])
        return [column[0] for column in result.description], result.fetchall()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ToolParser("regrade", description="Re-score stored responses with another grader.")
    parser.add_argument("target", nargs="?", metavar="RUN[:STEP]", help="only this run (or step); default: all")
    parser.add_argument("--grader", required=True, choices=sorted(GRADERS), help="the grader to score with")
    parser.add_argument("--db", type=Path, default=DEFAULT_DB, help="store file (default: %(default)s)")
    parser.add_argument("--samples", action="store_true", help="also list the responses where the graders disagree")
    parser.add_argument("--workers", type=int, default=2, help="grading worker processes (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per equivalence check (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="bin/regrade: %(message)s")
    args = parse_args(argv)
    try:
        run_id, step = _target(args.target)
        upgrade(args.db)  # a store of an older version gets the grades table first
        samples = ungraded_samples(args.db, args.grader, run_id, step)
        added = record_grades(args.db, grade_rows(samples, args.grader, args.workers, args.timeout)) if samples else 0
        print(f"bin/regrade: {added} responses graded with {args.grader}", file=sys.stderr)
        text = format_table(*disagreements(args.db, args.grader, run_id, step))
        if args.samples:
            text += "\n\n" + format_table(*disagreeing_samples(args.db, args.grader, run_id, step))
    except (RegradeError, StoreError, GraderError) as exc:
        return report_error("regrade", exc)
    return 0 if print_stdout(text) else BROKEN_PIPE_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
