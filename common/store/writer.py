"""The eval daemon's writes to the store: eval keys, what is recorded, and one transaction per evaluation.

Short write transactions with retry (common/store/schema.py opens the file): all rows of an
evaluation or none, and never two rows for one (run_id, step, eval_key). Used by `bin/eval`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from common.grading import CATEGORIES, FORMAT_FAILURE_TYPES
from common.store.schema import (EVALUATION_COLUMNS, EVALUATION_EXTRA_KEYS, LOCK_TIMEOUT_S, REQUIRED_EVALUATION_KEYS,
                                 SAMPLE_COLUMNS, SAMPLE_KEY_COLUMNS, TIME_KEYS, WRITE_LOCK_TIMEOUT_S, StoreError,
                                 _connect_for_write, _utc_now, connect_read_only)
from common.store.stats import interval_rows

if TYPE_CHECKING:
    import pyarrow as pa

logger = logging.getLogger(__name__)

def _normalise(value: Any) -> Any:
    """Numbers as floats, so temperature 1 and 1.0 give the same key."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return str(value)


def eval_key(eval_set: str, sampling: dict, num_eval_samples: int, seed: int, keyed: dict | None = None,
             samples_per_problem: int = 1) -> str:
    """Short stable id of an eval config, e.g. 'math-t1.0-p1.0-m1024-3f9c0a1b' (safe in file names).

    The hash covers every input that changes a number: eval set, sampling, subset and seed, plus
    `keyed` (eval_daemon/fingerprint.py: prompt template and problems hashes, grader and version,
    engine, dtype, max_model_len, entropy subsample size). k responses per problem add '-k4' and
    enter the hash (one response keeps the keys it had before samples_per_problem existed)."""
    config = {"eval_set": eval_set, "sampling": sampling, "num_eval_samples": num_eval_samples, "seed": seed,
              **(keyed or {})}
    if samples_per_problem != 1:
        config["samples_per_problem"] = samples_per_problem
    canonical = json.dumps(_normalise(config), sort_keys=True, separators=(",", ":"))
    parts = [re.sub(r"[^A-Za-z0-9_]+", "_", eval_set) or "eval"]
    for prefix, name in (("t", "temperature"), ("p", "top_p")):
        if name in sampling:
            parts.append(f"{prefix}{float(sampling[name])}")
    if "max_tokens" in sampling:
        parts.append(f"m{int(sampling['max_tokens'])}")
    if num_eval_samples:
        parts.append(f"n{num_eval_samples}")
    if samples_per_problem != 1:
        parts.append(f"k{samples_per_problem}")
    parts.append(hashlib.sha256(canonical.encode()).hexdigest()[:8])
    return "-".join(parts)


def stratified_set_name(eval_set: str, size: int) -> str:
    """The eval_set of an evaluation on a stratified subset (evaluation.schedule=keep_up), e.g.
    'math-strat1000': stored in every row, part of its eval key, shown by the views and plots."""
    return f"{eval_set}-strat{size}"


def is_stratified_subset(eval_set: str) -> bool:
    return re.search(r"-strat\d+$", eval_set) is not None


def recorded_keys(db_path: str | Path, timeout_s: float = LOCK_TIMEOUT_S,
                  statuses: tuple[str, ...] = ("ok", "failed")) -> set[tuple[str, int, str]]:
    """(run_id, step, eval_key) of every recorded evaluation with one of `statuses`; empty when no store yet."""
    if not Path(db_path).exists():
        return set()
    with connect_read_only(db_path, timeout_s) as con:
        if not _has_schema(con):
            return set()
        rows = con.execute("SELECT run_id, step, eval_key FROM evaluations WHERE list_contains(?, status)",
                           [list(statuses)]).fetchall()
    return {(run_id, int(step), key) for run_id, step, key in rows}


def committed_evaluations(db_path: str | Path, timeout_s: float = LOCK_TIMEOUT_S) -> list[dict]:
    """Every stored evaluation with what the start-up reconcile needs (marker, metrics record)."""
    if not Path(db_path).exists():
        return []
    with connect_read_only(db_path, timeout_s) as con:
        if not _has_schema(con):
            return []
        cursor = con.execute("SELECT * FROM evaluations ORDER BY run_id, step, eval_key")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]


def mark_tracked(db_path: str | Path, run_id: str, step: int, key: str,
                 timeout_s: float = WRITE_LOCK_TIMEOUT_S) -> None:
    """Note that an evaluation's metrics went to W&B / eval_metrics.jsonl (so reconcile does not resend)."""
    with _connect_for_write(Path(db_path), timeout_s) as con:
        con.execute("UPDATE evaluations SET tracked_at = ? WHERE run_id = ? AND step = ? AND eval_key = ?",
                    [_utc_now(), run_id, step, key])


def is_recorded(db_path: str | Path, run_id: str, step: int, eval_key: str,
                statuses: tuple[str, ...] = ("ok", "failed"), timeout_s: float = LOCK_TIMEOUT_S) -> bool:
    """True when an evaluation of this checkpoint with this eval config is stored with one of `statuses`."""
    if not Path(db_path).exists():
        return False
    with connect_read_only(db_path, timeout_s) as con:
        if not _has_schema(con):
            return False
        return _recorded_status(con, run_id, step, eval_key) in statuses


def _has_schema(con: duckdb.DuckDBPyConnection) -> bool:
    return con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'evaluations'").fetchone()[0] > 0


def _recorded_status(con: duckdb.DuckDBPyConnection, run_id: str, step: int, key: str) -> str | None:
    row = con.execute("SELECT status FROM evaluations WHERE run_id = ? AND step = ? AND eval_key = ?",
                      [run_id, step, key]).fetchone()
    return row[0] if row else None


# ---- validation ----------------------------------------------------------------------------------


def _parse_time(key: str, value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise StoreError(f"evaluation[{key!r}] = {value!r} is not an ISO 8601 time; "
                         f"use common.contract.now_iso()") from None
    # Stored as naive UTC.
    return parsed.astimezone(timezone.utc).replace(tzinfo=None) if parsed.tzinfo else parsed


def _to_json(key: str, value: Any) -> str | None:
    if value is None:
        return None
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False, default=str)
    except ValueError:
        raise StoreError(f"evaluation[{key!r}] holds NaN or infinity; replace it with None") from None


def _plain_scalar(value: Any) -> Any:
    """numpy numbers (as metrics code often yields) become Python numbers; DuckDB binds only those."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes, list, dict)):
        return value.item()
    return value


def _evaluation_row(evaluation: dict, status: str, error: str | None) -> dict[str, Any]:
    """Check the evaluation dict and return the evaluations row (column -> value)."""
    unknown = sorted(set(evaluation) - set(EVALUATION_COLUMNS) - set(EVALUATION_EXTRA_KEYS))
    if unknown:
        raise StoreError(f"evaluation has unknown keys {unknown}; known keys are the evaluations columns "
                         f"(see common/store/schema.py EVALUATION_COLUMNS)")
    missing = [key for key in REQUIRED_EVALUATION_KEYS if evaluation.get(key) in (None, "")]
    if missing:
        raise StoreError(f"evaluation is missing {missing}; every evaluation needs {list(REQUIRED_EVALUATION_KEYS)}")
    # A failure may be recorded from a half-filled dict; a success must not claim to be a failure.
    if status == "ok" and evaluation.get("status", "ok") != "ok":
        raise StoreError(f"evaluation['status'] is {evaluation['status']!r} but record_evaluation stores "
                         f"successes; use record_failed_evaluation for failures")
    row = {column: _plain_scalar(evaluation.get(column)) for column in EVALUATION_COLUMNS}
    row.update(status=status, error=error if error is not None else evaluation.get("error"))
    row["samples_per_problem"] = row["samples_per_problem"] or 1
    try:
        row["step"] = int(row["step"])
    except (TypeError, ValueError):
        raise StoreError(f"evaluation['step'] = {row['step']!r} is not an integer") from None
    for key in TIME_KEYS:
        row[key] = _parse_time(key, row[key])
    for key in ("sampling", "config", "fingerprint"):
        row[key] = _to_json(key, row[key])
    for key, value in row.items():
        if isinstance(value, float) and not math.isfinite(value):
            row[key] = None  # NaN (e.g. no entropy sample) is stored as NULL so SQL aggregates ignore it
    return row


def _samples_table(row: dict[str, Any], samples: list[dict]) -> pa.Table:
    """Check the sample dicts and build one Arrow table (the bulk insert's source)."""
    known = set(SAMPLE_COLUMNS)
    for index, sample in enumerate(samples):
        unknown = set(sample) - known
        if unknown:
            raise StoreError(f"sample {index} has unknown keys {sorted(unknown)}; see common/store/schema.py SAMPLE_COLUMNS")
        if not sample.get("problem_id"):
            raise StoreError(f"sample {index} has no problem_id")
        if sample.get("category") not in CATEGORIES:
            raise StoreError(f"sample {index} ({sample['problem_id']}) has category {sample.get('category')!r}; "
                             f"expected one of {list(CATEGORIES)}")
        if sample.get("format_failure_type") not in (None, *FORMAT_FAILURE_TYPES):
            raise StoreError(f"sample {index} ({sample['problem_id']}) has format_failure_type "
                             f"{sample['format_failure_type']!r}; expected None or one of {list(FORMAT_FAILURE_TYPES)}")
    if len({(s["problem_id"], s.get("sample_index") or 0) for s in samples}) != len(samples):
        raise StoreError("two samples share a problem_id and sample_index; number the k responses of a problem "
                         "0..k-1 in sample_index")
    if row["num_test_cases"] is not None and row["num_test_cases"] != len(samples):
        raise StoreError(f"evaluation says num_test_cases={row['num_test_cases']} but {len(samples)} samples "
                         f"were given; record every evaluated example")
    columns: dict[str, list] = {
        "run_id": [row["run_id"]] * len(samples),
        "step": [row["step"]] * len(samples),
        "eval_key": [row["eval_key"]] * len(samples),
    }
    for name in SAMPLE_COLUMNS:
        values = [sample.get(name) for sample in samples]
        if name == "sample_index":
            values = [v or 0 for v in values]
        if name == "token_entropy":
            values = [None if v is None or not math.isfinite(v) else v for v in values]
        columns[name] = values
    # Imported here: only the writer needs Arrow, and bin/query starts faster without it.
    import pyarrow as pa

    arrow_types = {"VARCHAR": pa.string(), "BIGINT": pa.int64(), "INTEGER": pa.int32(), "DOUBLE": pa.float64()}
    schema = pa.schema([(name, arrow_types[sql_type.split()[0]])
                        for name, sql_type in {**SAMPLE_KEY_COLUMNS, **SAMPLE_COLUMNS}.items()])
    try:
        return pa.Table.from_pydict(columns, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        # Arrow names the offending value but not always the column; say which one failed.
        bad = next((name for name in columns if not _converts(columns[name], schema.field(name).type)), "?")
        raise StoreError(f"sample column {bad!r} has a value of the wrong type ({exc}); "
                         f"expected {schema.field(bad).type if bad != '?' else 'the declared types'}") from None


def _converts(values: list, arrow_type: pa.DataType) -> bool:
    import pyarrow as pa

    try:
        pa.array(values, type=arrow_type)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return False
    return True


# ---- writing -------------------------------------------------------------------------------------


def record_evaluation(db_path: str | Path, evaluation: dict, samples: list[dict],
                      timeout_s: float = WRITE_LOCK_TIMEOUT_S) -> bool:
    """Store one evaluation and all its samples in ONE transaction. Idempotent: returns False and
    writes nothing when (run_id, step, eval_key) is already stored as ok; an ok evaluation replaces
    an earlier failed one (a retry that succeeded)."""
    row = _evaluation_row(evaluation, status="ok", error=None)
    table = _samples_table(row, samples)
    db_path = Path(db_path)
    with _connect_for_write(db_path, timeout_s) as con:
        con.begin()
        previous = _recorded_status(con, row["run_id"], row["step"], row["eval_key"])
        if previous == "ok":
            con.rollback()
            return False
        if previous == "failed":
            con.execute("DELETE FROM evaluations WHERE run_id = ? AND step = ? AND eval_key = ?",
                        [row["run_id"], row["step"], row["eval_key"]])
        _insert_run_and_checkpoint(con, row, evaluation)
        _insert_evaluation(con, row)
        _insert_samples(con, table)
        _insert_intervals(con, row, samples)
        con.commit()
    logger.info("recorded %s step %s %s: %d samples", row["run_id"], row["step"], row["eval_key"], len(samples))
    return True


def record_failed_evaluation(db_path: str | Path, evaluation: dict, error: str,
                             timeout_s: float = WRITE_LOCK_TIMEOUT_S) -> bool:
    """Store an evaluations row with status 'failed' and the error; False when already recorded."""
    row = _evaluation_row(evaluation, status="failed", error=error)
    db_path = Path(db_path)
    with _connect_for_write(db_path, timeout_s) as con:
        con.begin()
        if _recorded_status(con, row["run_id"], row["step"], row["eval_key"]) is not None:
            con.rollback()
            return False
        _insert_run_and_checkpoint(con, row, evaluation)
        _insert_evaluation(con, row)
        con.commit()
    logger.info("recorded failed evaluation %s step %s %s", row["run_id"], row["step"], row["eval_key"])
    return True


def _insert_run_and_checkpoint(con: duckdb.DuckDBPyConnection, row: dict, evaluation: dict) -> None:
    """Insert the runs and checkpoints rows when new; fill in a config/metrics that was missing."""
    run_config = _to_json("run_config", evaluation.get("run_config"))
    con.execute("INSERT INTO runs VALUES (?, ?, ?) ON CONFLICT DO UPDATE "
                "SET run_config = coalesce(runs.run_config, excluded.run_config)",
                [row["run_id"], run_config, _utc_now()])
    metrics = _to_json("checkpoint_metrics", evaluation.get("checkpoint_metrics"))
    con.execute("INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
                "checkpoint_metrics = coalesce(checkpoints.checkpoint_metrics, excluded.checkpoint_metrics), "
                "published_at = coalesce(checkpoints.published_at, excluded.published_at), "
                "checkpoint_path = coalesce(checkpoints.checkpoint_path, excluded.checkpoint_path)",
                [row["run_id"], row["step"], row["checkpoint_path"], row["published_at"], metrics])


def _insert_samples(con: duckdb.DuckDBPyConnection, table: pa.Table) -> None:
    # One bulk insert from Arrow: ~50x faster than executemany for 5,000 rows (bench/store_commit.py).
    con.register("new_samples", table)
    con.execute("INSERT INTO samples BY NAME SELECT * FROM new_samples")
    con.unregister("new_samples")


def _insert_intervals(con: duckdb.DuckDBPyConnection, row: dict, samples: list[dict]) -> None:
    """With k > 1 responses per problem: the bootstrap intervals (the views compute Wilson's otherwise)."""
    if row["samples_per_problem"] == 1:
        return
    keys = [row["run_id"], row["step"], row["eval_key"]]
    con.execute("DELETE FROM intervals WHERE run_id = ? AND step = ? AND eval_key = ?", keys)
    con.executemany("INSERT INTO intervals VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [[*keys, r["grouping"], r["group_value"], r["metric"], r["low"], r["high"], "bootstrap_problems"]
                     for r in interval_rows(samples)])


def _insert_evaluation(con: duckdb.DuckDBPyConnection, row: dict) -> None:
    names = [*EVALUATION_COLUMNS, "recorded_at"]
    placeholders = ", ".join("?" for _ in names)
    con.execute(f"INSERT INTO evaluations ({', '.join(names)}) VALUES ({placeholders})",
                [row[name] for name in EVALUATION_COLUMNS] + [_utc_now()])


def record_grades(db_path: str | Path, rows: list[dict], timeout_s: float = WRITE_LOCK_TIMEOUT_S) -> int:
    """Store another grader's verdicts (bin/regrade) in one transaction; a (response, grader) already
    graded keeps its row, so regrading twice leaves the same rows. Returns the rows added."""
    columns = ("run_id", "step", "eval_key", "problem_id", "sample_index", "grader", "format_reward", "answer_reward",
               "reward", "category", "grading_note")
    now = _utc_now()
    with _connect_for_write(Path(db_path), timeout_s) as con:
        con.begin()
        before = con.execute("SELECT count(*) FROM grades").fetchone()[0]
        con.executemany(f"INSERT INTO grades ({', '.join(columns)}, graded_at) VALUES "
                        f"({', '.join('?' for _ in columns)}, ?) ON CONFLICT DO NOTHING",
                        [[row[c] for c in columns] + [now] for row in rows])
        added = con.execute("SELECT count(*) FROM grades").fetchone()[0] - before
        con.commit()
    return added


def upgrade(db_path: str | Path, timeout_s: float = WRITE_LOCK_TIMEOUT_S) -> None:
    """Migrate an existing store to this version (what every write does first); StoreMissingError when absent."""
    with connect_read_only(db_path, timeout_s):
        pass  # raises StoreMissingError for a file that does not exist, instead of creating one
    with _connect_for_write(Path(db_path), timeout_s):
        pass
