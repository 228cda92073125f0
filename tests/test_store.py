"""The results store: round trip, idempotence, bad input, schema, views, and the two-process rules
(a reader waits for the writer and the other way round; a writer killed mid-transaction leaves nothing)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import duckdb
import pytest
from store_fixtures import EVAL_KEY, SAMPLING, fill_synthetic_store, summarise, synthetic_samples

from common import grading
from common.store import schema, writer

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    return fill_synthetic_store(tmp_path_factory.mktemp("store") / "results.duckdb")


def rows(db: Path, sql: str, params=()) -> list[dict]:
    with schema.connect_read_only(db) as con:
        result = con.execute(sql, params)
        names = [column[0] for column in result.description]
        return [dict(zip(names, row)) for row in result.fetchall()]


def one_evaluation(run_id="run_x", step=0, n=12):
    samples = synthetic_samples(run_id, step, n)
    return summarise(run_id, step, samples), samples


def python_env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}"}


# ---- keys ----------------------------------------------------------------------------------------


def test_eval_key_is_stable_readable_and_distinguishes_configs():
    key = writer.eval_key("math", SAMPLING, 0, 0)
    assert re.fullmatch(r"math-t1\.0-p1\.0-m1024-[0-9a-f]{8}", key)
    # Same config written with ints instead of floats, keys in another order: same key.
    reordered = {"max_tokens": 1024, "top_p": 1, "temperature": 1, "stop": ["</answer>"]}
    assert writer.eval_key("math", reordered, 0, 0) == key
    others = {
        writer.eval_key("math500", SAMPLING, 0, 0),
        writer.eval_key("math", {**SAMPLING, "temperature": 0.6}, 0, 0),
        writer.eval_key("math", {**SAMPLING, "max_tokens": 2048}, 0, 0),
        writer.eval_key("math", {**SAMPLING, "stop": []}, 0, 0),
        writer.eval_key("math", SAMPLING, 500, 0),
        writer.eval_key("math", SAMPLING, 500, 1),
    }
    assert key not in others and len(others) == 6
    assert writer.eval_key("math", SAMPLING, 500, 1).startswith("math-t1.0-p1.0-m1024-n500-")
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", writer.eval_key("MATH/500 test", SAMPLING, 0, 0))  # safe in file names


# ---- writing and reading back --------------------------------------------------------------------


def test_evaluation_and_samples_round_trip(filled):
    db = filled.db_path
    evaluation = filled.evaluations[("run_a", 100)]
    [row] = rows(db, "SELECT * FROM evaluations WHERE run_id = 'run_a' AND step = 100")
    for key in ("eval_key", "eval_set", "status", "num_test_cases", "num_correct", "num_format_correct",
                "num_wrong_answer", "num_format_failure", "accuracy", "format_accuracy", "avg_response_length",
                "avg_token_entropy", "entropy_sample_size", "engine", "worker_id", "total_seconds"):
        want = evaluation[key]
        assert row[key] == (pytest.approx(want) if isinstance(want, float) else want), key
    assert row["status"] == "ok" and row["error"] is None
    assert json.loads(row["sampling"]) == SAMPLING
    assert row["finished_at"].isoformat() == "2026-11-26T05:10:41.500000"

    stored = rows(db, "SELECT * FROM samples WHERE run_id = 'run_a' AND step = 100 ORDER BY problem_id")
    written = sorted(filled.samples[("run_a", 100)], key=lambda s: s["problem_id"])
    assert len(stored) == len(written) == 70
    for got, want in zip(stored, written):
        assert got["eval_key"] == EVAL_KEY
        assert {k: got[k] for k in want} == want

    [run] = rows(db, "SELECT * FROM runs WHERE run_id = 'run_a'")
    assert json.loads(run["run_config"])["training"]["seed"] == 42
    [checkpoint] = rows(db, "SELECT * FROM checkpoints WHERE run_id = 'run_a' AND step = 100")
    assert json.loads(checkpoint["checkpoint_metrics"]) == {"train_loss": 1.0}
    assert checkpoint["checkpoint_path"] == "results/checkpoints/run_a/step_000100"


def test_recording_twice_writes_nothing_the_second_time(tmp_path):
    db = tmp_path / "results.duckdb"
    evaluation, samples = one_evaluation()
    assert not writer.is_recorded(db, "run_x", 0, EVAL_KEY)
    assert writer.record_evaluation(db, evaluation, samples) is True
    assert writer.is_recorded(db, "run_x", 0, EVAL_KEY)
    assert writer.record_evaluation(db, evaluation, samples) is False
    assert writer.record_failed_evaluation(db, evaluation, "late failure") is False
    assert rows(db, "SELECT count(*) AS n FROM samples")[0]["n"] == len(samples)
    assert rows(db, "SELECT count(*) AS n FROM evaluations")[0]["n"] == 1
    assert writer.recorded_keys(db) == {("run_x", 0, EVAL_KEY)}


def test_failed_evaluation_is_recorded_kept_out_of_views_and_replaced_by_a_success(tmp_path):
    db = tmp_path / "results.duckdb"
    evaluation, samples = one_evaluation(step=50)
    failed = {k: evaluation[k] for k in ("run_id", "step", "eval_key", "eval_set", "sampling")}
    assert writer.record_failed_evaluation(db, failed, "vLLM engine died") is True
    assert writer.is_recorded(db, "run_x", 50, EVAL_KEY)
    assert ("run_x", 50, EVAL_KEY) in writer.recorded_keys(db)
    [row] = rows(db, "SELECT status, error, accuracy FROM evaluations")
    assert row == {"status": "failed", "error": "vLLM engine died", "accuracy": None}
    assert rows(db, "SELECT * FROM progress") == [] and rows(db, "SELECT * FROM run_compare") == []
    # A retry that succeeds replaces the failure (and only then are samples stored).
    assert writer.record_evaluation(db, evaluation, samples) is True
    [row] = rows(db, "SELECT status, error, accuracy FROM evaluations")
    assert row == {"status": "ok", "error": None, "accuracy": pytest.approx(evaluation["accuracy"])}
    assert len(rows(db, "SELECT * FROM progress")) == 1


def test_missing_entropy_is_stored_as_null(tmp_path):
    db = tmp_path / "results.duckdb"
    evaluation, samples = one_evaluation()
    samples[0]["token_entropy"] = math.nan
    evaluation["avg_token_entropy"] = math.nan
    writer.record_evaluation(db, evaluation, samples)
    assert rows(db, "SELECT avg_token_entropy FROM progress") == [{"avg_token_entropy": None}]
    assert rows(db, "SELECT count(token_entropy) AS n FROM samples")[0]["n"] == sum(
        s["token_entropy"] is not None for s in samples) - 1


def test_numpy_numbers_are_stored_as_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    db = tmp_path / "results.duckdb"
    evaluation, samples = one_evaluation()
    evaluation.update(step=np.int64(0), accuracy=np.float64(0.25), num_correct=np.int64(3))
    samples[0].update(token_entropy=np.float32(0.5), response_length=np.int64(7), level=np.int32(2))
    assert writer.record_evaluation(db, evaluation, samples)
    assert rows(db, "SELECT step, accuracy, num_correct FROM evaluations") == [
        {"step": 0, "accuracy": 0.25, "num_correct": 3}]
    [first] = rows(db, "SELECT token_entropy, response_length, level FROM samples WHERE problem_id = ?",
                   [samples[0]["problem_id"]])
    assert first == {"token_entropy": 0.5, "response_length": 7, "level": 2}


@pytest.mark.parametrize("break_it, message", [
    (lambda ev, s: ev.update(acuracy=0.5), r"unknown keys \['acuracy'\]"),
    (lambda ev, s: ev.pop("eval_key"), r"missing \['eval_key'\]"),
    (lambda ev, s: ev.update(status="failed"), "use record_failed_evaluation"),
    (lambda ev, s: ev.update(finished_at="yesterday"), r"evaluation\['finished_at'\].*ISO 8601"),
    (lambda ev, s: ev.update(num_test_cases=99), "num_test_cases=99 but 12 samples"),
    (lambda ev, s: s[3].update(category="right"), r"sample 3 .* category 'right'"),
    (lambda ev, s: s[4].update(format_failure_type="no_box"), "format_failure_type 'no_box'"),
    (lambda ev, s: s[5].update(level="Level 3"), "sample column 'level'"),
    (lambda ev, s: s[6].update(answer="5"), r"sample 6 has unknown keys \['answer'\]"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, break_it, message):
    db = tmp_path / "results.duckdb"
    writer.record_evaluation(db, *one_evaluation(step=0))
    evaluation, samples = one_evaluation(step=50)
    break_it(evaluation, samples)
    with pytest.raises(schema.StoreError, match=message) as error:
        writer.record_evaluation(db, evaluation, samples)
    assert "\n" not in str(error.value)
    assert rows(db, "SELECT step FROM evaluations") == [{"step": 0}]
    assert rows(db, "SELECT count(*) AS n FROM samples WHERE step = 50")[0]["n"] == 0


# ---- schema and views ----------------------------------------------------------------------------


def test_schema_version_and_views_are_in_the_file(filled):
    # A plain DuckDB connection (as `duckdb results.duckdb` would be) sees the views and their descriptions.
    con = duckdb.connect(str(filled.db_path), read_only=True)
    try:
        version = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        assert version == (str(schema.SCHEMA_VERSION),)
        views = {row[0] for row in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        described = dict(con.execute("SELECT name, description FROM view_descriptions").fetchall())
    finally:
        con.close()
    assert views == set(schema.VIEWS) == set(described)
    assert all(described.values())


def test_a_store_of_another_schema_version_is_refused(tmp_path):
    db = tmp_path / "results.duckdb"
    writer.record_evaluation(db, *one_evaluation(step=0))
    con = duckdb.connect(str(db))
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(schema.StoreError, match=f"schema version 99, this code writes version {schema.SCHEMA_VERSION}; move the file aside"):
        writer.record_evaluation(db, *one_evaluation(step=50))


def test_views_agree_with_the_samples(filled):
    db = filled.db_path
    progress = {(r["run_id"], r["step"]): r for r in rows(db, "SELECT * FROM progress")}
    assert set(progress) == set(filled.evaluations)  # the failed evaluation is not there
    for key, samples in filled.samples.items():
        categories = Counter(s["category"] for s in samples)
        assert progress[key]["pct_format_failure"] == pytest.approx(100 * categories["format_failure"] / len(samples))
        assert progress[key]["pct_wrong_answer"] == pytest.approx(100 * categories["wrong_answer"] / len(samples))
        assert progress[key]["accuracy"] == pytest.approx(categories["correct"] / len(samples))

    for row in rows(db, "SELECT * FROM by_subject"):
        subset = [s for s in filled.samples[(row["run_id"], row["step"])] if s["subject"] == row["subject"]]
        assert row["num_examples"] == len(subset)
        assert row["accuracy"] == pytest.approx(sum(s["category"] == "correct" for s in subset) / len(subset))
    assert len(rows(db, "SELECT * FROM by_subject")) == 7 * len(filled.samples)

    for row in rows(db, "SELECT * FROM by_level"):
        subset = [s for s in filled.samples[(row["run_id"], row["step"])] if s["level"] == row["level"]]
        assert row["num_correct"] == sum(s["category"] == "correct" for s in subset)

    for row in rows(db, "SELECT * FROM format_failures"):
        kinds = Counter(s["format_failure_type"] for s in filled.samples[(row["run_id"], row["step"])])
        assert {k: row[k] for k in grading.FORMAT_FAILURE_TYPES} == {k: kinds[k] for k in grading.FORMAT_FAILURE_TYPES}
        assert row["num_format_failure"] == sum(kinds[k] for k in grading.FORMAT_FAILURE_TYPES)

    compare = {r["run_id"]: r for r in rows(db, "SELECT * FROM run_compare")}
    for run_id in ("run_a", "run_b"):
        accuracy = {step: ev["accuracy"] for (run, step), ev in filled.evaluations.items() if run == run_id}
        best = max(accuracy.values())
        assert compare[run_id]["best_accuracy"] == pytest.approx(best)
        assert compare[run_id]["best_step"] == min(s for s, a in accuracy.items() if a == best)
        assert compare[run_id]["last_step"] == max(accuracy)
        assert compare[run_id]["last_accuracy"] == pytest.approx(accuracy[max(accuracy)])
        assert compare[run_id]["num_evaluations"] == len(accuracy)


def test_no_store_yet(tmp_path):
    db = tmp_path / "results.duckdb"
    assert writer.recorded_keys(db) == set()
    assert writer.is_recorded(db, "run", 0, EVAL_KEY) is False
    with pytest.raises(schema.StoreMissingError, match="eval daemon .* creates it .* --db"):
        with schema.connect_read_only(db):
            pass
    assert not db.exists()


# ---- two processes -------------------------------------------------------------------------------


def hold_open(db: Path, read_only: bool, seconds: float) -> subprocess.Popen:
    """Another process that keeps the store open; returns once it has the file."""
    code = textwrap.dedent(f"""
        import sys, time, duckdb
        con = duckdb.connect({str(db)!r}, read_only={read_only})
        print("open", flush=True)
        time.sleep({seconds})
        con.close()
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "open"
    return holder


@pytest.mark.slow  # a real process
def test_writer_waits_while_a_reader_holds_the_file(tmp_path):
    db = tmp_path / "results.duckdb"
    writer.record_evaluation(db, *one_evaluation(step=0))
    holder = hold_open(db, read_only=True, seconds=1.5)
    start = time.monotonic()
    assert writer.record_evaluation(db, *one_evaluation(step=50))
    assert time.monotonic() - start > 0.5  # it really had to wait
    holder.wait(timeout=10)
    assert {r["step"] for r in rows(db, "SELECT step FROM evaluations")} == {0, 50}


@pytest.mark.slow  # a real process
def test_reader_waits_while_the_writer_holds_the_file(tmp_path):
    db = tmp_path / "results.duckdb"
    writer.record_evaluation(db, *one_evaluation(step=0))
    holder = hold_open(db, read_only=False, seconds=1.0)
    assert writer.is_recorded(db, "run_x", 0, EVAL_KEY)
    holder.wait(timeout=10)


@pytest.mark.slow  # a real process
def test_a_file_held_too_long_gives_one_line_naming_the_holder(tmp_path):
    db = tmp_path / "results.duckdb"
    writer.record_evaluation(db, *one_evaluation(step=0))
    holder = hold_open(db, read_only=True, seconds=3)
    try:
        with pytest.raises(schema.StoreBusyError, match=rf"stayed busy .*PID {holder.pid}.*close any duckdb shell"):
            writer.record_evaluation(db, *one_evaluation(step=50), timeout_s=0.5)
    finally:
        holder.kill()
        holder.wait()
    assert writer.recorded_keys(db) == {("run_x", 0, EVAL_KEY)}


@pytest.mark.slow  # a real process
def test_writer_killed_mid_transaction_leaves_nothing(tmp_path):
    db = tmp_path / "results.duckdb"
    writer.record_evaluation(db, *one_evaluation(step=0))
    # A writer that stops between inserting the samples and committing (kill -9 lands there).
    code = textwrap.dedent(f"""
        import time
        from common.store import schema, writer
        from store_fixtures import summarise, synthetic_samples
        insert = writer._insert_samples
        def insert_then_hang(con, table):
            insert(con, table)
            print("inserted", flush=True)
            time.sleep(60)
        writer._insert_samples = insert_then_hang
        samples = synthetic_samples("run_x", 50, 12)
        writer.record_evaluation({str(db)!r}, summarise("run_x", 50, samples), samples)
    """)
    killed = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=python_env())
    assert killed.stdout.readline().strip() == "inserted"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert writer.recorded_keys(db) == {("run_x", 0, EVAL_KEY)}
    assert rows(db, "SELECT count(*) AS n FROM samples WHERE step = 50")[0]["n"] == 0
    assert rows(db, "SELECT count(*) AS n FROM checkpoints WHERE step = 50")[0]["n"] == 0
    # The next writer records that evaluation normally.
    assert writer.record_evaluation(db, *one_evaluation(step=50))
    assert rows(db, "SELECT count(*) AS n FROM samples WHERE step = 50")[0]["n"] == 12
