"""The results store: one DuckDB file (results/results.duckdb) that the eval daemon appends to and
bin/query and bin/plot read while it runs.

DuckDB lets one process hold a file read-write, and while it does, no other process can open it,
not even read-only. So the writer opens the file only for one short transaction per evaluation
(all rows of that evaluation, or nothing) and closes it again; readers open it read-only, query
and close. Both retry with a short exponential backoff while the other side holds the file, so a
lock error never reaches a user, and a reader never sees half an evaluation.

Tables: meta (schema_version, views_sha), runs, checkpoints, evaluations, samples, intervals, grades,
view_descriptions.
Views (created with the schema, so a plain `duckdb results/results.duckdb` has them too):
progress, by_subject, by_level, format_failures, run_compare, problem_outcomes, flips, accuracy_by_grader,
grade_disagreements, pass_at_k, sampling; see VIEWS below.

Old stores stay readable: a file of an older schema version is migrated by the writer (the eval
daemon) in one transaction the next time it records (MIGRATIONS: columns added with defaults,
nothing rewritten), and the views are replaced whenever their definitions changed (meta views_sha).
Until then readers see the old file as it was.

    bin/query progress              # the eval daemon writes, this reads
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import duckdb

from common.grading import CATEGORIES, FORMAT_FAILURE_TYPES
from common.store.stats import wilson_sql

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 3
# How long a reader waits for the writer to close the file before giving up.
LOCK_TIMEOUT_S = 30.0
# The writer waits longer: an evaluation is never dropped because someone's query was slow.
WRITE_LOCK_TIMEOUT_S = 120.0
# Longest pause between two tries; short, so a reader gets in soon after a commit.
MAX_RETRY_DELAY_S = 0.1
# After this long waiting, say so once (someone may have left a duckdb shell open on the file).
LOCK_WARN_AFTER_S = 5.0

TIME_KEYS = ("published_at", "started_at", "finished_at")


class StoreError(RuntimeError):
    """A problem with the store or with what was handed to it (one-line message naming the fix)."""


class StoreMissingError(StoreError):
    """The store file does not exist yet."""


class StoreBusyError(StoreError):
    """Another process kept the store open longer than the retry budget."""


# ---- schema --------------------------------------------------------------------------------------

# Evaluation dict key -> column type. run_config goes to `runs`, checkpoint_metrics to `checkpoints`.
EVALUATION_COLUMNS = {
    "run_id": "VARCHAR NOT NULL",
    "step": "BIGINT NOT NULL",
    "eval_key": "VARCHAR NOT NULL",
    "eval_set": "VARCHAR NOT NULL",
    "checkpoint_path": "VARCHAR",
    "status": "VARCHAR NOT NULL CHECK (status IN ('ok', 'failed'))",
    "error": "VARCHAR",
    "num_test_cases": "INTEGER",
    "num_correct": "INTEGER",
    "num_format_correct": "INTEGER",
    "num_wrong_answer": "INTEGER",
    "num_format_failure": "INTEGER",
    "accuracy": "DOUBLE",
    "format_accuracy": "DOUBLE",
    "avg_response_length": "DOUBLE",
    "avg_response_length_correct": "DOUBLE",
    "avg_response_length_incorrect": "DOUBLE",
    "avg_token_entropy": "DOUBLE",
    "entropy_method": "VARCHAR",
    "entropy_sample_size": "INTEGER",
    "engine": "VARCHAR",
    "sampling": "JSON",
    "config": "JSON",
    "published_at": "TIMESTAMP",
    "started_at": "TIMESTAMP",
    "finished_at": "TIMESTAMP",
    "generation_seconds": "DOUBLE",
    "grading_seconds": "DOUBLE",
    "total_seconds": "DOUBLE",
    "worker_id": "VARCHAR",
    "engine_version": "VARCHAR",  # e.g. vllm==0.32.0
    "fingerprint": "JSON",  # what moves the number (eval_daemon/fingerprint.py); view `fingerprints`
    "tracked_at": "TIMESTAMP",  # when its metrics went to W&B / eval_metrics.jsonl (start-up reconcile)
    "samples_per_problem": "INTEGER DEFAULT 1",  # responses per problem (evaluation.samples_per_problem)
}
EVALUATION_EXTRA_KEYS = ("run_config", "checkpoint_metrics")
REQUIRED_EVALUATION_KEYS = ("run_id", "step", "eval_key", "eval_set")

# Sample dict key -> column type; the store adds run_id, step, eval_key in front.
SAMPLE_COLUMNS = {
    "problem_id": "VARCHAR NOT NULL",
    "subject": "VARCHAR",
    "level": "INTEGER",
    "problem": "VARCHAR",
    "prompt": "VARCHAR",
    "response": "VARCHAR",
    "ground_truth": "VARCHAR",
    "solution": "VARCHAR",
    "format_reward": "DOUBLE",
    "answer_reward": "DOUBLE",
    "reward": "DOUBLE",
    "category": "VARCHAR NOT NULL",
    "format_failure_type": "VARCHAR",
    "response_length": "INTEGER",
    "finish_reason": "VARCHAR",
    "token_entropy": "DOUBLE",
    "grading_note": "VARCHAR",
    "sample_index": "INTEGER DEFAULT 0",  # 0..samples_per_problem-1: which of the problem's responses
    "normalized_answer": "VARCHAR",  # the MATH-normalised answer (None without the format): maj@k votes on it
}
SAMPLE_KEY_COLUMNS = {"run_id": "VARCHAR NOT NULL", "step": "BIGINT NOT NULL", "eval_key": "VARCHAR NOT NULL"}


# 95% intervals of evaluations with k > 1 responses per problem (bootstrap over problems, computed
# when recorded: common/store/stats.py); with one response the views compute Wilson intervals.
INTERVALS_TABLE_SQL = """CREATE TABLE intervals (
    run_id VARCHAR NOT NULL, step BIGINT NOT NULL, eval_key VARCHAR NOT NULL,
    grouping VARCHAR NOT NULL,  -- all | subject | level
    group_value VARCHAR NOT NULL,  -- '' for all, else the subject or the level
    metric VARCHAR NOT NULL,  -- accuracy | format_accuracy
    low DOUBLE, high DOUBLE, method VARCHAR NOT NULL,
    PRIMARY KEY (run_id, step, eval_key, grouping, group_value, metric)
);"""

# Verdicts of other graders on stored responses (bin/regrade, common/store/regrade.py); the daemon's
# own verdict stays in samples. One row per response and grader: regrading again adds nothing.
GRADES_TABLE_SQL = """CREATE TABLE grades (
    run_id VARCHAR NOT NULL, step BIGINT NOT NULL, eval_key VARCHAR NOT NULL,
    problem_id VARCHAR NOT NULL, sample_index INTEGER NOT NULL,
    grader VARCHAR NOT NULL,  -- mathsft | cs336 | math-verify (common/store/graders.py)
    format_reward DOUBLE, answer_reward DOUBLE, reward DOUBLE, category VARCHAR NOT NULL, grading_note VARCHAR,
    graded_at TIMESTAMP NOT NULL,
    PRIMARY KEY (run_id, step, eval_key, problem_id, sample_index, grader)
);"""

# version -> the statements that take a store of version - 1 to it (added columns keep old rows valid).
MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: ("ALTER TABLE samples ADD COLUMN sample_index INTEGER DEFAULT 0",
        "ALTER TABLE samples ADD COLUMN normalized_answer VARCHAR",
        "ALTER TABLE evaluations ADD COLUMN samples_per_problem INTEGER DEFAULT 1",
        INTERVALS_TABLE_SQL),
    3: (GRADES_TABLE_SQL,),
}


def _columns_sql(columns: dict[str, str]) -> str:
    return ",\n    ".join(f"{name} {sql_type}" for name, sql_type in columns.items())


TABLES_SQL = f"""
CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE runs (
    run_id VARCHAR PRIMARY KEY,
    run_config JSON,
    first_recorded_at TIMESTAMP NOT NULL
);
CREATE TABLE checkpoints (
    run_id VARCHAR NOT NULL,
    step BIGINT NOT NULL,
    checkpoint_path VARCHAR,
    published_at TIMESTAMP,
    checkpoint_metrics JSON,
    PRIMARY KEY (run_id, step)
);
CREATE TABLE evaluations (
    {_columns_sql(EVALUATION_COLUMNS)},
    recorded_at TIMESTAMP NOT NULL,
    PRIMARY KEY (run_id, step, eval_key)
);
-- No index on samples: uniqueness is guaranteed per evaluation, and an index would slow the bulk insert.
CREATE TABLE samples (
    {_columns_sql({**SAMPLE_KEY_COLUMNS, **SAMPLE_COLUMNS})},
    CHECK (category IN {CATEGORIES})
);
CREATE TABLE view_descriptions (name VARCHAR PRIMARY KEY, description VARCHAR);
{INTERVALS_TABLE_SQL}
{GRADES_TABLE_SQL}
"""

_FAILURE_COUNTS_SQL = ",\n       ".join(
    f"count(*) FILTER (WHERE s.format_failure_type = '{kind}') AS {kind}" for kind in FORMAT_FAILURE_TYPES)

# Per problem of each successful evaluation: n responses, c of them correct.
_PER_PROBLEM_SQL = """SELECT s.run_id, s.step, e.eval_set, s.eval_key, s.problem_id, any_value(s.subject) AS subject,
           any_value(s.level) AS level, count(*) AS n, count(*) FILTER (WHERE s.category = 'correct') AS c
    FROM samples s JOIN evaluations e USING (run_id, step, eval_key)
    WHERE e.status = 'ok'
    GROUP BY s.run_id, s.step, e.eval_set, s.eval_key, s.problem_id"""
# The evaluation named by a SQL variable ('RUN:STEP' or 'RUN:STEP:EVAL_KEY'), for the flips view.
def _named_evaluation_sql(variable: str) -> str:
    part = f"split_part(getvariable('{variable}'), ':', {{}})"
    return (f"run_id = {part.format(1)} AND step = try_cast({part.format(2)} AS BIGINT) "
            f"AND ({part.format(3)} = '' OR eval_key = {part.format(3)})")


# Chen et al.'s unbiased estimator 1 - C(n-c, k) / C(n, k), as the product prod_{i<k} (n-c-i)/(n-i)
# (no huge binomials); it is 1 when fewer than k responses are wrong.
_PASS_AT_K_SQL = "CASE WHEN p.n - p.c < ks.k THEN 1.0 ELSE 1.0 - list_product([(p.n - p.c - i) / (p.n - i) FOR i IN range(ks.k)]) END"

# The intervals table, one row per (evaluation, grouping, group) with both metrics' ends.
_INTERVALS_WIDE_SQL = """SELECT run_id, step, eval_key, grouping, group_value,
           max(low) FILTER (WHERE metric = 'accuracy') AS accuracy_low,
           max(high) FILTER (WHERE metric = 'accuracy') AS accuracy_high,
           max(low) FILTER (WHERE metric = 'format_accuracy') AS format_accuracy_low,
           max(high) FILTER (WHERE metric = 'format_accuracy') AS format_accuracy_high
    FROM intervals GROUP BY run_id, step, eval_key, grouping, group_value"""
_INTERVAL_METHOD_SQL = ("CASE WHEN coalesce(samples_per_problem, 1) = 1 THEN 'wilson' "
                        "ELSE 'bootstrap_problems' END AS interval_method")


def _interval_sql(metric: str, successes: str, n: str) -> str:
    """`<metric>_low, <metric>_high`: Wilson for one response per problem, else the stored bootstrap."""
    low, high = wilson_sql(successes, n)
    one = "coalesce(samples_per_problem, 1) = 1"
    return (f"CASE WHEN {one} THEN {low} ELSE i.{metric}_low END AS {metric}_low, "
            f"CASE WHEN {one} THEN {high} ELSE i.{metric}_high END AS {metric}_high")


def _accuracy_by(group: str) -> str:
    """by_subject / by_level: accuracy and format accuracy per evaluation and group, with intervals."""
    return f"""SELECT g.run_id, g.step, g.eval_set, g.eval_key, g.{group}, g.num_examples, g.num_correct,
       g.accuracy, {_interval_sql("accuracy", "g.num_correct", "g.num_examples")},
       g.format_accuracy, {_interval_sql("format_accuracy", "g.num_format_correct", "g.num_examples")},
       {_INTERVAL_METHOD_SQL}
FROM (SELECT s.run_id, s.step, e.eval_set, s.eval_key, s.{group}, count(*) AS num_examples,
             count(*) FILTER (WHERE s.category = 'correct') AS num_correct,
             count(*) FILTER (WHERE s.category <> 'format_failure') AS num_format_correct,
             avg((s.category = 'correct')::DOUBLE) AS accuracy,
             avg((s.category <> 'format_failure')::DOUBLE) AS format_accuracy,
             any_value(e.samples_per_problem) AS samples_per_problem
      FROM samples s JOIN evaluations e USING (run_id, step, eval_key)
      WHERE e.status = 'ok'
      GROUP BY s.run_id, s.step, e.eval_set, s.eval_key, s.{group}) g
LEFT JOIN ({_INTERVALS_WIDE_SQL}) i ON i.run_id = g.run_id AND i.step = g.step AND i.eval_key = g.eval_key
                                   AND i.grouping = '{group}' AND i.group_value = coalesce(g.{group}::VARCHAR, '')
ORDER BY g.run_id, g.eval_key, g.{group}, g.step"""


# name -> (one-line description for `bin/query --list`, SELECT). Only successful evaluations count.
VIEWS: dict[str, tuple[str, str]] = {
    "progress": (
        "one row per evaluation: accuracy, format accuracy, category %, mean lengths, entropy + method, by step",
        f"""SELECT e.run_id, e.step, e.eval_set, e.eval_key,
       e.accuracy, {_interval_sql("accuracy", "e.num_correct", "e.num_test_cases")},
       e.format_accuracy, {_interval_sql("format_accuracy", "e.num_format_correct", "e.num_test_cases")},
       100.0 * e.num_correct / nullif(e.num_test_cases, 0) AS pct_correct,
       100.0 * e.num_wrong_answer / nullif(e.num_test_cases, 0) AS pct_wrong_answer,
       100.0 * e.num_format_failure / nullif(e.num_test_cases, 0) AS pct_format_failure,
       e.avg_response_length, e.avg_response_length_correct, e.avg_response_length_incorrect,
       e.avg_token_entropy, e.entropy_method, e.samples_per_problem, {_INTERVAL_METHOD_SQL}
FROM evaluations e
LEFT JOIN ({_INTERVALS_WIDE_SQL}) i ON i.run_id = e.run_id AND i.step = e.step AND i.eval_key = e.eval_key
                                   AND i.grouping = 'all'
WHERE e.status = 'ok'
ORDER BY e.run_id, e.eval_key, e.step""",
    ),
    "by_subject": ("accuracy and format accuracy per subject, per evaluation", _accuracy_by("subject")),
    "by_level": ("accuracy and format accuracy per difficulty level (1-5), per evaluation", _accuracy_by("level")),
    "format_failures": (
        "format failure counts per evaluation, one column per failure type",
        f"""SELECT e.run_id, e.step, e.eval_set, e.eval_key, e.num_test_cases, e.num_format_failure,
       {_FAILURE_COUNTS_SQL}
FROM evaluations e
LEFT JOIN samples s ON s.run_id = e.run_id AND s.step = e.step AND s.eval_key = e.eval_key
                   AND s.category = 'format_failure'
WHERE e.status = 'ok'
GROUP BY e.run_id, e.step, e.eval_set, e.eval_key, e.num_test_cases, e.num_format_failure
ORDER BY e.run_id, e.eval_key, e.step""",
    ),
    "run_compare": (
        "one row per run and eval config: first, best and last accuracy with their steps",
        """SELECT run_id, eval_set, eval_key, count(*) AS num_evaluations,
       min(step) AS first_step, arg_min(accuracy, step) AS first_accuracy,
       first(step ORDER BY accuracy DESC, step) AS best_step, max(accuracy) AS best_accuracy,
       max(step) AS last_step, arg_max(accuracy, step) AS last_accuracy
FROM evaluations WHERE status = 'ok'
GROUP BY run_id, eval_set, eval_key
ORDER BY run_id, eval_key""",
    ),
    "fingerprints": (
        "what moves each number: template and data hashes, grader, engine and version, dtype, GPU, sampling",
        """SELECT run_id, step, eval_key, status, engine, engine_version,
       fingerprint->>'prompt_template_sha256' AS prompt_template_sha256,
       fingerprint->>'problems_sha256' AS problems_sha256,
       fingerprint->>'grader' AS grader, fingerprint->>'grader_version' AS grader_version,
       fingerprint->>'dtype' AS dtype, (fingerprint->>'max_model_len')::INTEGER AS max_model_len,
       fingerprint->>'device' AS device, (fingerprint->>'deterministic_scheduling')::BOOLEAN AS deterministic_scheduling,
       sampling
FROM evaluations
ORDER BY run_id, eval_key, step""",
    ),
    "pass_at_k": (
        "unbiased pass@k (Chen et al. 2021) for every k up to samples_per_problem, per evaluation",
        f"""WITH problems AS ({_PER_PROBLEM_SQL}),
ks AS (SELECT run_id, step, eval_key, unnest(range(1, min_n + 1)) AS k
       FROM (SELECT run_id, step, eval_key, min(n) AS min_n FROM problems GROUP BY run_id, step, eval_key))
SELECT p.run_id, p.step, p.eval_set, p.eval_key, ks.k, count(*) AS num_problems,
       avg({_PASS_AT_K_SQL}) AS pass_at_k
FROM problems p JOIN ks USING (run_id, step, eval_key)
GROUP BY p.run_id, p.step, p.eval_set, p.eval_key, ks.k
ORDER BY p.run_id, p.eval_key, p.step, ks.k""",
    ),
    "problem_outcomes": (
        "per evaluation and problem: responses, correct ones, accuracy, is_right (more than half correct)",
        f"""SELECT run_id, step, eval_set, eval_key, problem_id, subject, level, n AS num_responses, c AS num_correct,
       c / n AS accuracy, 2 * c > n AS is_right
FROM ({_PER_PROBLEM_SQL})
ORDER BY run_id, eval_key, step, problem_id""",
    ),
    "flips": (
        "the problems of evaluation $before vs $after (SET VARIABLE before = 'RUN:STEP'): learned, forgotten, kept",
        f"""WITH outcomes AS ({_PER_PROBLEM_SQL}),
b AS (SELECT * FROM outcomes WHERE {_named_evaluation_sql("before")}),
a AS (SELECT * FROM outcomes WHERE {_named_evaluation_sql("after")})
SELECT b.problem_id, b.subject, b.level, b.eval_key, 2 * b.c > b.n AS right_before, 2 * a.c > a.n AS right_after,
       CASE WHEN 2 * b.c > b.n THEN (CASE WHEN 2 * a.c > a.n THEN 'kept_right' ELSE 'forgotten' END)
            ELSE (CASE WHEN 2 * a.c > a.n THEN 'learned' ELSE 'kept_wrong' END) END AS flip
FROM b JOIN a USING (eval_key, problem_id)
ORDER BY b.subject, b.level, b.problem_id""",
    ),
    "accuracy_by_grader": (
        "per evaluation and grader: accuracy of the stored responses ('recorded': the eval daemon's verdicts)",
        """SELECT run_id, step, eval_key, grader, count(*) AS num_samples, avg(answer_reward * format_reward) AS accuracy,
       avg(format_reward) AS format_accuracy
FROM (SELECT run_id, step, eval_key, 'recorded' AS grader, answer_reward, format_reward FROM samples
      UNION ALL SELECT run_id, step, eval_key, grader, answer_reward, format_reward FROM grades)
JOIN evaluations e USING (run_id, step, eval_key)
WHERE e.status = 'ok'
GROUP BY run_id, step, eval_key, grader
ORDER BY run_id, eval_key, step, grader""",
    ),
    "grade_disagreements": (
        "responses a regrade scored differently from the eval daemon: grader, both verdicts, answer, truth",
        """SELECT g.run_id, g.step, g.eval_key, g.grader, g.problem_id, g.sample_index, s.category AS recorded_category,
       g.category AS grader_category, s.normalized_answer, s.ground_truth, s.grading_note AS recorded_note,
       g.grading_note AS grader_note
FROM grades g JOIN samples s USING (run_id, step, eval_key, problem_id, sample_index)
WHERE g.category <> s.category
ORDER BY g.run_id, g.eval_key, g.step, g.grader, g.problem_id, g.sample_index""",
    ),
    "sampling": (
        "per evaluation with k samples per problem: mean accuracy, pass@k and maj@k (majority vote)",
        f"""WITH problems AS ({_PER_PROBLEM_SQL}),
votes AS (
    -- one row per distinct answer of a problem: the correct answers are all equivalent (to the ground
    -- truth) and form one; wrong answers are told apart by their normalised text. Format failures do not vote.
    SELECT run_id, step, eval_key, problem_id, count(*) AS votes, min(sample_index) AS first_index,
           bool_or(category = 'correct') AS correct
    FROM samples WHERE category <> 'format_failure'
    GROUP BY run_id, step, eval_key, problem_id,
             CASE WHEN category = 'correct' THEN '=' ELSE coalesce(normalized_answer, '#' || sample_index) END),
majority AS (
    -- the most frequent answer wins; a tie goes to the answer given first
    SELECT run_id, step, eval_key, problem_id, first(correct ORDER BY votes DESC, first_index) AS correct
    FROM votes GROUP BY run_id, step, eval_key, problem_id)
SELECT p.run_id, p.step, p.eval_set, p.eval_key, min(p.n) AS samples_per_problem, count(*) AS num_problems,
       avg(p.c / p.n) AS mean_accuracy,
       avg((p.c > 0)::DOUBLE) AS pass_at_k,
       avg(coalesce(m.correct, false)::DOUBLE) AS maj_at_k
FROM problems p LEFT JOIN majority m USING (run_id, step, eval_key, problem_id)
GROUP BY p.run_id, p.step, p.eval_set, p.eval_key
ORDER BY p.run_id, p.eval_key, p.step""",
    ),
}


def _create_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(TABLES_SQL)
    con.execute("INSERT INTO meta VALUES ('schema_version', ?), ('created_at', ?)",
                [str(SCHEMA_VERSION), _utc_now().isoformat()])
    _replace_views(con)


def views_sha() -> str:
    """Hash of the view definitions: a store whose views_sha differs gets the current views."""
    return hashlib.sha256(json.dumps(VIEWS, sort_keys=True).encode()).hexdigest()[:16]


def _replace_views(con: duckdb.DuckDBPyConnection) -> None:
    """Drop every view this or an earlier version made and create the current ones."""
    for (name,) in con.execute("SELECT name FROM view_descriptions").fetchall():
        con.execute(f"DROP VIEW IF EXISTS {name}")
    con.execute("DELETE FROM view_descriptions")
    for name, (description, select) in VIEWS.items():
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {select}")
        con.execute("INSERT INTO view_descriptions VALUES (?, ?)", [name, description])
    con.execute("INSERT OR REPLACE INTO meta VALUES ('views_sha', ?)", [views_sha()])


def _meta(con: duckdb.DuckDBPyConnection, key: str) -> str | None:
    row = con.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
    return row[0] if row else None


def _ensure_schema(con: duckdb.DuckDBPyConnection, db_path: Path) -> None:
    """Create the schema on a new file, migrate an older one, refresh changed views (each in its own
    transaction); refuse a file of a newer version."""
    tables = {row[0] for row in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    if "meta" not in tables:
        con.begin()
        _create_schema(con)
        con.commit()
        logger.info("created results store %s (schema version %s)", db_path, SCHEMA_VERSION)
        return
    found = _meta(con, "schema_version")
    if found is None or not found.isdigit() or int(found) > SCHEMA_VERSION:
        raise StoreError(f"{db_path} has schema version {found}, this code writes version {SCHEMA_VERSION}; "
                         f"move the file aside (or set another paths.results_dir) to start a new store, "
                         f"or update mathsft")
    missing = _missing_evaluation_columns(con)
    if int(found) == SCHEMA_VERSION and not missing and _meta(con, "views_sha") == views_sha():
        return
    con.begin()
    for version in range(int(found) + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[version]:
            con.execute(statement)
    # Columns added within a schema version (additive only): older stores get them, NULL in old rows.
    for name in _missing_evaluation_columns(con):
        con.execute(f"ALTER TABLE evaluations ADD COLUMN {name} {EVALUATION_COLUMNS[name]}")
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
    _replace_views(con)
    con.commit()
    logger.info("results store %s: schema version %s -> %s, views refreshed", db_path, found, SCHEMA_VERSION)


def _missing_evaluation_columns(con: duckdb.DuckDBPyConnection) -> list[str]:
    columns = {row[0] for row in con.execute(
        "SELECT column_name FROM duckdb_columns() WHERE table_name = 'evaluations'").fetchall()}
    return [name for name in EVALUATION_COLUMNS if name not in columns]


# ---- connections ---------------------------------------------------------------------------------


def _is_lock_error(exc: duckdb.Error) -> bool:
    return "lock" in str(exc).lower()


def _connect(db_path: Path, read_only: bool, timeout_s: float) -> duckdb.DuckDBPyConnection:
    """Open the file, retrying with exponential backoff while another process holds it."""
    if read_only and not db_path.exists():
        raise StoreMissingError(f"no results store at {db_path}: the eval daemon (bin/eval) creates it "
                                f"with its first evaluation; or pass --db PATH")
    start = time.monotonic()
    delay, warned = 0.01, False
    while True:
        try:
            return duckdb.connect(str(db_path), read_only=read_only)
        except duckdb.Error as exc:
            # Only "another process holds the file" is worth waiting for; a file that is not a
            # DuckDB database, or a missing directory, is reported at once.
            if not (isinstance(exc, duckdb.IOException) and _is_lock_error(exc)):
                raise StoreError(f"cannot open {db_path}: {one_line_error(exc)}") from None
            waited = time.monotonic() - start
            if waited + delay > timeout_s:
                raise StoreBusyError(f"{db_path} stayed busy for {waited:.0f} s ({_lock_holder(exc)}); "
                                     f"close any duckdb shell left open on it and retry") from None
            if waited > LOCK_WARN_AFTER_S and not warned:
                logger.warning("waiting for %s: %s", db_path, _lock_holder(exc))
                warned = True
        # Jitter so that two waiting processes do not retry in lockstep.
        time.sleep(delay * random.uniform(0.5, 1.5))
        delay = min(delay * 2, MAX_RETRY_DELAY_S)


def _lock_holder(exc: duckdb.Error) -> str:
    match = re.search(r"held in (.+?) \(PID (\d+)\)", str(exc))
    return f"held by PID {match.group(2)} ({match.group(1)})" if match else "held by another process"


def one_line_error(exc: BaseException) -> str:
    """DuckDB's message without the `LINE 1: ...` excerpt and caret lines."""
    lines = []
    for line in str(exc).splitlines():
        if line.startswith("LINE "):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines)


@contextlib.contextmanager
def connect_read_only(db_path: str | Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection for bin/query and bin/plot; closed (and the file released) on exit."""
    con = _connect(Path(db_path), read_only=True, timeout_s=timeout_s)
    try:
        yield con
    finally:
        con.close()


@contextlib.contextmanager
def _connect_for_write(db_path: Path, timeout_s: float) -> Iterator[duckdb.DuckDBPyConnection]:
    db_path.parent.mkdir(parents=True, exist_ok=True)
    con = _connect(db_path, read_only=False, timeout_s=timeout_s)
    try:
        _ensure_schema(con, db_path)
        yield con
    finally:
        # Closing releases the file for readers; an open transaction is rolled back by DuckDB.
        con.close()


def _utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)
