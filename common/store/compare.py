"""bin/query compare BEFORE AFTER: two evaluations on the problems both evaluated, paired.

    bin/query compare run_a:250 run_a:300             # RUN:STEP (RUN:STEP:EVAL_KEY when a step has several)
    bin/query compare run_a:250 run_b:250 --flips     # also list every problem that flipped
    bin/query --format json compare run_a:0 run_a:300

Prints the accuracy of each on the shared problems, the difference (after - before) with its 95%
interval, the exact McNemar p-value, and the flips (learned: wrong -> right, forgotten: right ->
wrong) by subject and by level. With k > 1 responses per problem a problem counts as right when
more than half of its responses are, the difference is that of mean accuracies, and its interval
a paired bootstrap over problems. Evaluations of different eval configs (eval key, eval set) are
refused; a fingerprint that differs (evaluations.fingerprint, where recorded), or problems only
one side evaluated, are flagged in one line each. The same pairs are in the view `flips`
(`SET VARIABLE before = 'RUN:STEP'; SET VARIABLE after = 'RUN:STEP'; SELECT * FROM flips`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import duckdb

from common.store.stats import bootstrap_intervals, mcnemar_exact, paired_difference


class CompareError(ValueError):
    """Two evaluations that cannot be compared (one-line message naming the fix)."""


@dataclass
class Evaluation:
    ref: str  # RUN:STEP as given
    run_id: str
    step: int
    eval_key: str
    eval_set: str
    samples_per_problem: int
    fingerprint: dict | None
    problems: dict[str, tuple] = field(default_factory=dict)  # problem_id -> (subject, level, accuracy, right)


@dataclass
class Comparison:
    before: Evaluation
    after: Evaluation
    summary: dict
    flips: list[dict]  # one row per problem that flipped
    by_subject: list[dict]
    by_level: list[dict]
    warnings: list[str]


def parse_ref(text: str) -> tuple[str, int, str | None]:
    """'RUN:STEP' or 'RUN:STEP:EVAL_KEY' -> (run_id, step, eval_key or None)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1].lstrip("-").isdigit():
        raise CompareError(f"{text!r} is not RUN:STEP; name an evaluation as RUN:STEP (e.g. run_a:300), "
                           f"or RUN:STEP:EVAL_KEY when that step was evaluated several ways")
    return parts[0], int(parts[1]), parts[2] if len(parts) == 3 else None


def load_evaluation(con: duckdb.DuckDBPyConnection, text: str) -> Evaluation:
    run_id, step, key = parse_ref(text)
    has_fingerprint = con.execute("SELECT count(*) FROM duckdb_columns() WHERE table_name = 'evaluations' "
                                  "AND column_name = 'fingerprint'").fetchone()[0] > 0
    rows = con.execute(f"SELECT eval_key, eval_set, coalesce(samples_per_problem, 1), "
                       f"{'fingerprint' if has_fingerprint else 'NULL'} FROM evaluations "
                       f"WHERE status = 'ok' AND run_id = ? AND step = ? AND (? IS NULL OR eval_key = ?) "
                       f"ORDER BY eval_key", [run_id, step, key, key]).fetchall()
    if not rows:
        raise CompareError(f"no successful evaluation {text} in the store; see bin/query progress for what exists")
    if len(rows) > 1:
        raise CompareError(f"{text} was evaluated {len(rows)} ways ({', '.join(r[0] for r in rows)}); "
                           f"name one as {run_id}:{step}:EVAL_KEY")
    eval_key, eval_set, k, fingerprint = rows[0]
    evaluation = Evaluation(text, run_id, step, eval_key, eval_set, k,
                            json.loads(fingerprint) if isinstance(fingerprint, str) else fingerprint)
    for problem_id, subject, level, accuracy, right in con.execute(
            "SELECT problem_id, subject, level, accuracy, is_right FROM problem_outcomes "
            "WHERE run_id = ? AND step = ? AND eval_key = ?", [run_id, step, eval_key]).fetchall():
        evaluation.problems[problem_id] = (subject, level, accuracy, right)
    return evaluation


def check_comparable(before: Evaluation, after: Evaluation) -> list[str]:
    """Refuse different eval configs; return one-line warnings for what differs but may be compared."""
    if before.eval_key != after.eval_key:
        raise CompareError(f"{before.ref} ({before.eval_key}) and {after.ref} ({after.eval_key}) were evaluated "
                           f"with different eval configs (set, sampling, subset or k); compare evaluations of one eval "
                           f"key (evaluate both with the same evaluation settings)")
    warnings = []
    if before.fingerprint and after.fingerprint and before.fingerprint != after.fingerprint:
        differing = sorted(k for k in set(before.fingerprint) | set(after.fingerprint)
                           if before.fingerprint.get(k) != after.fingerprint.get(k))
        warnings.append(f"the fingerprints differ in {', '.join(differing)}: part of the difference may come from "
                        f"there (bin/query fingerprints)")
    only_before = len(set(before.problems) - set(after.problems))
    only_after = len(set(after.problems) - set(before.problems))
    if only_before or only_after:
        warnings.append(f"compared on the {len(set(before.problems) & set(after.problems))} problems both evaluated "
                        f"({only_before} only in {before.ref}, {only_after} only in {after.ref})")
    return warnings


def compare(con: duckdb.DuckDBPyConnection, before_ref: str, after_ref: str) -> Comparison:
    before, after = load_evaluation(con, before_ref), load_evaluation(con, after_ref)
    warnings = check_comparable(before, after)
    shared = sorted(set(before.problems) & set(after.problems))
    if not shared:
        raise CompareError(f"{before_ref} and {after_ref} share no problem; nothing to compare")
    flips = []
    for problem_id in shared:
        subject, level, accuracy_before, right_before = before.problems[problem_id]
        accuracy_after, right_after = after.problems[problem_id][2:]
        if right_before != right_after:
            flips.append({"problem_id": problem_id, "subject": subject, "level": level,
                          "flip": "learned" if right_after else "forgotten",
                          "accuracy_before": accuracy_before, "accuracy_after": accuracy_after})
    learned = sum(f["flip"] == "learned" for f in flips)
    forgotten = len(flips) - learned
    summary = _summary(before, after, shared, learned, forgotten)
    return Comparison(before, after, summary, flips, _breakdown(before, shared, flips, 0, "subject"),
                      _breakdown(before, shared, flips, 1, "level"), warnings)


def _summary(before: Evaluation, after: Evaluation, shared: list[str], learned: int, forgotten: int) -> dict:
    n = len(shared)
    accuracy_before = sum(before.problems[p][2] for p in shared) / n
    accuracy_after = sum(after.problems[p][2] for p in shared) / n
    if before.samples_per_problem == 1:
        difference, low, high = paired_difference(learned, forgotten, n)
        method = "wald_paired"
    else:
        differences = [after.problems[p][2] - before.problems[p][2] for p in shared]
        difference = sum(differences) / n
        low, high = bootstrap_intervals({"difference": differences})["difference"]
        method = "bootstrap_problems"
    return {"before": before.ref, "after": after.ref, "eval_key": before.eval_key,
            "samples_per_problem": before.samples_per_problem, "num_problems": n,
            "accuracy_before": accuracy_before, "accuracy_after": accuracy_after,
            "difference": difference, "difference_low": low, "difference_high": high, "interval_method": method,
            "learned": learned, "forgotten": forgotten, "mcnemar_p": mcnemar_exact(learned, forgotten)}


def _breakdown(before: Evaluation, shared: list[str], flips: list[dict], index: int, name: str) -> list[dict]:
    """Problems, learned, forgotten and net per subject (index 0) or level (index 1)."""
    groups: dict = {}
    for problem_id in shared:
        group = before.problems[problem_id][index]
        groups.setdefault(group, {name: group, "num_problems": 0, "learned": 0, "forgotten": 0})
        groups[group]["num_problems"] += 1
    for flip in flips:
        groups[flip[name]][flip["flip"]] += 1
    rows = [groups[g] for g in sorted(groups, key=lambda g: (g is None, g))]
    for row in rows:
        row["net"] = row["learned"] - row["forgotten"]
    return rows
