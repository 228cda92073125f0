"""bin/query on a filled store: output formats, views by name, refused writes, one-line errors, every
SQL in README.md (checked against the data that was written), and a reader looping in its own
process while another process commits evaluations."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from store_fixtures import fill_synthetic_store

from common.store import schema
from common.store.query import format_cell, run_query

REPO_ROOT = Path(__file__).resolve().parents[1]
DOC = REPO_ROOT / "README.md"


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    return fill_synthetic_store(tmp_path_factory.mktemp("query") / "results.duckdb")


def env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}"}


def query(*args: str) -> subprocess.CompletedProcess:
    """The real tool in its own process (bin/query runs exactly this after setting up the venv)."""
    return subprocess.run([sys.executable, "-m", "common.store.query", *args], capture_output=True, text=True,
                          env=env(), cwd=REPO_ROOT, timeout=120)


def as_dicts(columns, rows):
    return [dict(zip(columns, row)) for row in rows]


# ---- output --------------------------------------------------------------------------------------


@pytest.mark.slow  # a real process
def test_a_view_by_name_prints_an_aligned_table(filled):
    result = query("--db", str(filled.db_path), "progress")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["run_id", "step", "eval_set", "eval_key", "accuracy", "accuracy_low", "accuracy_high",
                                "format_accuracy", "format_accuracy_low", "format_accuracy_high",
                                "pct_correct", "pct_wrong_answer", "pct_format_failure", "avg_response_length",
                                "avg_response_length_correct", "avg_response_length_incorrect", "avg_token_entropy",
                                "entropy_method", "samples_per_problem", "interval_method"]
    assert lines[-1] == "(7 rows)"
    body = lines[2:-1]
    assert len(body) == 7
    # Aligned: every value of the accuracy column ends at the same character position as its header.
    end = lines[0].index("accuracy") + len("accuracy")
    for line, (key, evaluation) in zip(body, sorted(filled.evaluations.items())):
        assert line[:end].rstrip().endswith(f"{evaluation['accuracy']:.4f}".rstrip("0").rstrip("."))
        assert line.startswith(f"{key[0]}  ") and f" {key[1]} " in line


@pytest.mark.slow  # a real process
def test_csv_and_json_carry_full_values(filled):
    sql = "SELECT run_id, step, accuracy, avg_token_entropy FROM progress"
    as_csv = list(csv.DictReader(io.StringIO(query("--db", str(filled.db_path), "--format", "csv", sql).stdout)))
    as_json = json.loads(query("--db", str(filled.db_path), "--format", "json", sql).stdout)
    assert len(as_csv) == len(as_json) == len(filled.evaluations)
    for from_csv, from_json in zip(as_csv, as_json):
        evaluation = filled.evaluations[(from_json["run_id"], from_json["step"])]
        assert from_json["accuracy"] == pytest.approx(evaluation["accuracy"], abs=0)
        assert float(from_csv["accuracy"]) == pytest.approx(evaluation["accuracy"], rel=1e-12)
        assert from_json["avg_token_entropy"] == pytest.approx(evaluation["avg_token_entropy"])


@pytest.mark.slow  # a real process
def test_long_responses_stay_on_one_line_in_a_table(filled):
    result = query("--db", str(filled.db_path), "--max-width", "30",
                   "SELECT problem_id, response FROM samples WHERE step = 0 AND run_id = 'run_a'")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 2 + 70 + 1
    assert all(len(line) <= 40 + 30 for line in lines)
    assert any(line.endswith("...") for line in lines[2:-1])


@pytest.mark.slow  # a real process
def test_list_shows_every_view_with_its_description():
    result = query("--list")
    assert result.returncode == 0
    listed = {line.split()[0]: line.split(None, 1)[1] for line in result.stdout.splitlines()}
    assert listed == {name: description for name, (description, _) in schema.VIEWS.items()}


def query_into_head(*args: str) -> tuple[subprocess.CompletedProcess, bytes]:
    """`python -m common.store.query ARGS | head -c 1`: the reader takes one byte and exits, closing the pipe
    while the tool is still writing; returns the tool's exit code and stderr, and what head printed."""
    tool = subprocess.Popen([sys.executable, "-m", "common.store.query", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env(), cwd=REPO_ROOT)
    head = subprocess.Popen(["head", "-c", "1"], stdin=tool.stdout, stdout=subprocess.PIPE)
    tool.stdout.close()  # only head holds the read end now: its exit closes the pipe
    shown, _ = head.communicate(timeout=120)
    stderr = tool.stderr.read().decode()
    tool.stderr.close()
    return subprocess.CompletedProcess(tool.args, tool.wait(timeout=120), stderr=stderr), shown


def query_into_closed_pipe(*args: str) -> subprocess.CompletedProcess:
    """The tool's stdout is a pipe whose reader has already gone: every write fails (EPIPE), whatever
    the size of the output and however fast the tool is."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "common.store.query", *args], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO_ROOT, timeout=120)
    finally:
        os.close(write_end)


@pytest.mark.slow  # a real process
def test_a_reader_that_closes_the_pipe_early_stops_the_output_quietly(filled):
    # `bin/query --format csv "SELECT * FROM samples" | head -c 1`: ~1 MB of output, far more than the
    # pipe holds, so the tool is still writing when head exits.
    done, shown = query_into_head("--db", str(filled.db_path), "--format", "csv", "SELECT * FROM samples")
    assert shown == b"r"  # the start of the header line, `run_id,...`
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.stderr == "" and done.returncode == 1


@pytest.mark.slow  # a real process
@pytest.mark.parametrize("args", [["progress"], ["--format", "json", "by_subject"], ["--list"]],
                         ids=["table", "json", "list"])
def test_a_pipe_closed_before_the_first_write_is_quiet_too(filled, args):
    # Short outputs fit the pipe's buffer: without an explicit flush the error would surface only at
    # interpreter exit, as "Exception ignored ... BrokenPipeError" and exit code 120.
    done = query_into_closed_pipe("--db", str(filled.db_path), *args)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.stderr == "" and done.returncode == 1


# ---- refusals and errors -------------------------------------------------------------------------


@pytest.mark.slow  # a real process
@pytest.mark.parametrize("sql, kind", [
    ("INSERT INTO meta VALUES ('x', 'y')", "INSERT"),
    ("DELETE FROM samples", "DELETE"),
    ("UPDATE evaluations SET accuracy = 1", "UPDATE"),
    ("DROP VIEW progress", "DROP"),
    ("CREATE TABLE notes (a INT)", "CREATE"),
    ("COPY samples TO '/tmp/mathsft_copy_test.csv'", "COPY"),
    ("SELECT 1; DELETE FROM samples", "DELETE"),
    ("INSTALL httpfs", "INSTALL"),  # DuckDB files INSTALL under its LOAD statement type
    ("FORCE INSTALL httpfs", "FORCE INSTALL"),
    ("LOAD httpfs", "LOAD"),
])
def test_write_statements_are_refused_and_change_nothing(filled, sql, kind):
    before = query("--db", str(filled.db_path), "--format", "json", "SELECT count(*) AS n FROM samples").stdout
    result = query("--db", str(filled.db_path), sql)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"query: error: bin/query is read-only: {kind} statements are refused (the eval daemon is the store's only writer)"
        + ("; to export, use --format csv > file.csv" if kind == "COPY" else "")]
    assert query("--db", str(filled.db_path), "--format", "json", "SELECT count(*) AS n FROM samples").stdout == before
    assert not Path("/tmp/mathsft_copy_test.csv").exists()


@pytest.mark.slow  # a real process
def test_the_read_only_file_refuses_what_slips_past_the_statement_check(filled):
    # EXPLAIN ANALYZE runs the INSERT it explains; the read-only connection stops it.
    result = query("--db", str(filled.db_path), "EXPLAIN ANALYZE INSERT INTO meta VALUES ('x', 'y')")
    assert result.returncode == 2
    assert result.stderr.strip() == ("query: error: bin/query is read-only: statements that write are refused "
                                     "(the eval daemon is the store's only writer)")


@pytest.mark.slow  # a real process
@pytest.mark.parametrize("sql, message", [
    ("SELEC * FROM progress", 'query: error: Parser Error: syntax error at or near "SELEC"'),
    ("progres", 'query: error: Catalog Error: Table with name progres does not exist! Did you mean "progress"?'),
    ("SELECT nope FROM progress", 'query: error: Binder Error: Referenced column "nope" not found in FROM clause!'),
])
def test_bad_sql_is_one_line_without_traceback(filled, sql, message):
    result = query("--db", str(filled.db_path), sql)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(message)
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # a real process
def test_missing_store_names_db_and_the_eval_daemon(tmp_path):
    result = query("--db", str(tmp_path / "none.duckdb"), "progress")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"query: error: no results store at {tmp_path / 'none.duckdb'}: the eval daemon "
                                     f"(bin/eval) creates it with its first evaluation; or pass --db PATH")
    assert not (tmp_path / "none.duckdb").exists()


@pytest.mark.slow  # a real process
def test_a_file_that_is_not_a_store_is_one_line(tmp_path):
    (tmp_path / "notes.duckdb").write_text("not a database")
    result = query("--db", str(tmp_path / "notes.duckdb"), "progress")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f'query: error: cannot open {tmp_path / "notes.duckdb"}: IO Error: The file "{tmp_path / "notes.duckdb"}" exists, '
        f'but it is not a valid DuckDB database file!']


@pytest.mark.slow  # a real process
def test_bin_query_wrapper_runs_from_another_directory(filled, tmp_path):
    stamp = Path(os.environ.get("MATHSFT_VENV", REPO_ROOT / ".venv")) / ".mathsft-stamp"
    if not stamp.exists():
        pytest.skip("the venv was not set up by bin/_env.sh; bin/query would try to install it")
    (tmp_path / "copy.duckdb").write_bytes(filled.db_path.read_bytes())
    result = subprocess.run([str(REPO_ROOT / "bin" / "query"), "--db", "copy.duckdb", "run_compare"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "(2 rows)"


# ---- the SQL in README.md -----------------------------------------------------------------


def doc_queries() -> dict[str, str]:
    text = DOC.read_text()
    blocks = re.findall(r"```sql\n(.*?)```", text, re.S)
    named = dict(re.findall(r"<!-- sql: (\w+) -->\n```sql\n(.*?)```", text, re.S))
    assert len(named) == len(blocks), "every ```sql block in README.md needs a <!-- sql: name --> line"
    return named


def first_and_last(filled) -> dict[str, tuple[int, int]]:
    steps: dict[str, list[int]] = {}
    for run_id, step in filled.evaluations:
        steps.setdefault(run_id, []).append(step)
    return {run: (min(s), max(s)) for run, s in steps.items()}


def check_accuracy_over_steps(filled, result):
    assert [(r["run_id"], r["step"]) for r in result] == sorted(filled.evaluations)
    for r in result:
        assert r["accuracy_pct"] == round(100 * filled.evaluations[(r["run_id"], r["step"])]["accuracy"], 1)


def check_subjects_improved(filled, result):
    def accuracy(run, step, subject):
        subset = [s for s in filled.samples[(run, step)] if s["subject"] == subject]
        return sum(s["category"] == "correct" for s in subset) / len(subset)

    ends = first_and_last(filled)
    assert len(result) == 7 * len(ends)
    for r in result:
        first, last = ends[r["run_id"]]
        assert r["first_accuracy"] == pytest.approx(accuracy(r["run_id"], first, r["subject"]))
        assert r["change"] == pytest.approx(accuracy(r["run_id"], last, r["subject"]) - r["first_accuracy"])
    for run in ends:
        changes = [r["change"] for r in result if r["run_id"] == run]
        assert changes == sorted(changes, reverse=True)
    # The fixture makes geometry worse in run_a: the query must show a drop, not only gains.
    assert [r["change"] for r in result if r["run_id"] == "run_a" and r["subject"] == "geometry"][0] < 0


def check_became_correct(filled, result):
    expected = set()
    for run, (first, last) in first_and_last(filled).items():
        before = {s["problem_id"]: s["category"] for s in filled.samples[(run, first)]}
        expected |= {(run, s["problem_id"]) for s in filled.samples[(run, last)]
                     if s["category"] == "correct" and before[s["problem_id"]] != "correct"}
    assert {(r["run_id"], r["problem_id"]) for r in result} == expected and expected


def check_longest_wrong_answers(filled, result):
    lengths = sorted((s["response_length"] for run, (_, last) in first_and_last(filled).items()
                      for s in filled.samples[(run, last)] if s["category"] == "wrong_answer"), reverse=True)
    assert [r["response_length"] for r in result] == lengths[:10]
    for r in result:
        assert r["given_answer"] and r["given_answer"] != r["ground_truth"]


def check_format_failures_first_vs_last(filled, result):
    ends = first_and_last(filled)
    assert {(r["run_id"], r["step"]) for r in result} == {(run, s) for run, pair in ends.items() for s in pair}
    for r in result:
        kinds = Counter(s["format_failure_type"] for s in filled.samples[(r["run_id"], r["step"])])
        assert r["missing_think_close"] == kinds["missing_think_close"]
        assert r["incomplete_generation"] == kinds["incomplete_generation"]
        assert r["num_format_failure"] == sum(s["category"] == "format_failure"
                                              for s in filled.samples[(r["run_id"], r["step"])])


def check_evaluation_latency(filled, result):
    assert {(r["run_id"], r["step"]) for r in result if r["status"] == "failed"} == set(filled.failed)
    assert all(str(r["published_to_done"]) == "0:00:41.500000" for r in result if r["status"] == "ok")


CHECKS = {
    "accuracy_over_steps": check_accuracy_over_steps,
    "subjects_improved": check_subjects_improved,
    "became_correct": check_became_correct,
    "longest_wrong_answers": check_longest_wrong_answers,
    "format_failures_first_vs_last": check_format_failures_first_vs_last,
    "evaluation_latency": check_evaluation_latency,
}


def test_every_sql_in_the_docs_runs_and_gives_the_right_answer(filled):
    queries = doc_queries()
    assert set(CHECKS) <= set(queries), f"README.md lost {set(CHECKS) - set(queries)}"
    for name, sql in queries.items():
        columns, rows = run_query(filled.db_path, sql)
        assert rows, f"{name} returned no rows on the filled store"
        if name in CHECKS:
            CHECKS[name](filled, as_dicts(columns, rows))


@pytest.mark.slow  # a real process
def test_every_bin_query_command_in_the_docs_runs(filled):
    commands = [line.split("#")[0].strip() for line in re.findall(r"^bin/query .*$", DOC.read_text(), re.M)]
    runnable = [shlex.split(c)[1:] for c in commands if ">" not in c and "[" not in c and "--db" not in c]  # --db: a store of its own
    assert len(runnable) >= 4
    for args in runnable:
        result = query("--db", str(filled.db_path), *args)
        assert result.returncode == 0, f"bin/query {shlex.join(args)}: {result.stderr}"
        assert result.stdout.strip()


# ---- a reader while another process writes -------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    from common.store.writer import record_evaluation
    from store_fixtures import summarise, synthetic_samples
    db, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    for step in range(1, count + 1):
        samples = synthetic_samples("live", step * 10, size)
        assert record_evaluation(db, summarise("live", step * 10, samples), samples)
    print("done", flush=True)
""")

# Every evaluation a reader can see must have all its samples.
HALF_WRITTEN = """SELECT count(*) AS evaluations,
       count(*) FILTER (WHERE e.num_test_cases <> (SELECT count(*) FROM samples s WHERE s.run_id = e.run_id
                        AND s.step = e.step AND s.eval_key = e.eval_key)) AS half_written
FROM evaluations e WHERE status = 'ok'"""


@pytest.mark.slow  # a real process
def test_reader_loop_never_fails_while_another_process_commits(tmp_path):
    db = tmp_path / "results.duckdb"
    fill_synthetic_store(db, runs={"seed": (0,)}, failed={})
    count, size = 12, 2000
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(count), str(size)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    seen, failures = [], []
    deadline = time.monotonic() + 240
    while writer.poll() is None and time.monotonic() < deadline:
        result = query("--db", str(db), "--format", "json", HALF_WRITTEN)
        if result.returncode != 0 or result.stderr:
            failures.append(result.stderr)
            continue
        [row] = json.loads(result.stdout)
        assert row["half_written"] == 0
        seen.append(row["evaluations"])
    print("reader saw evaluation counts:", seen)
    out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0 and out.strip() == "done", err
    assert failures == []
    # The reader really ran while the writer was committing: it saw the count grow.
    assert len(seen) >= 3 and len(set(seen)) >= 2, seen
    assert seen == sorted(seen)
    assert run_query(db, "SELECT count(*) FROM evaluations")[1] == [(1 + count,)]


def test_a_tiny_nonzero_number_is_shown_as_such_not_as_zero():
    """bin/query compare prints McNemar p-values; 43 learned vs 8 forgotten is p ~ 1e-6, not "0"."""
    assert format_cell(1.234e-7, 40) == "1.23e-07"
    assert format_cell(0.0, 40) == "0" and format_cell(-0.0, 40) == "0"
    assert format_cell(0.25, 40) == "0.25" and format_cell(0.00012, 40) == "0.0001"
