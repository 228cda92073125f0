"""Analysis on a store filled by a REAL evaluation: the tiny model published as two checkpoints,
evaluated by `python -m eval_daemon --once` (Hugging Face engine on CPU), then read back through
bin/query's module and bin/plot's module. The views must agree with the raw samples.

    bin/test tests/test_analysis_real_eval.py
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_eval_daemon import REPO, daemon_args, publish_model

from common.store.plots import draw_accuracy, load_series, save_charts
from common.store.schema import FORMAT_FAILURE_TYPES, connect_read_only

pytestmark = pytest.mark.slow  # real processes


@pytest.fixture(scope="module")
def evaluated_store(tmp_path_factory, tiny_model_dir):
    from conftest import write_math_layout

    work = tmp_path_factory.mktemp("real_eval")
    math_dir = write_math_layout(work / "MATH")
    checkpoints = work / "results" / "checkpoints"
    publish_model(checkpoints, "run_real", 0, tiny_model_dir, noise_seed=None)
    publish_model(checkpoints, "run_real", 10, tiny_model_dir, noise_seed=3, noise_scale=0.5)
    result = subprocess.run(
        [sys.executable, "-m", "eval_daemon", "--once", *daemon_args(math_dir)],
        cwd=work, env={"PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
                       "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return work, work / "results" / "results.duckdb"


def query_json(db, sql: str) -> list[dict]:
    result = subprocess.run([sys.executable, "-m", "common.store.query", "--db", str(db), "--format", "json", sql],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_progress_view_matches_the_samples(evaluated_store):
    _work, db = evaluated_store
    progress = query_json(db, "progress")
    assert [row["step"] for row in progress] == [0, 10]
    with connect_read_only(db) as con:
        for row in progress:
            n, correct, format_ok, mean_length = con.execute(
                "SELECT count(*), sum(reward), sum(format_reward), avg(response_length) FROM samples "
                "WHERE run_id = ? AND step = ?", [row["run_id"], row["step"]]).fetchone()
            assert n == 7  # the fixture's test split
            assert row["accuracy"] == pytest.approx(correct / n)
            assert row["format_accuracy"] == pytest.approx(format_ok / n)
            assert row["avg_response_length"] == pytest.approx(mean_length)
            pct = row["pct_correct"] + row["pct_wrong_answer"] + row["pct_format_failure"]
            assert pct == pytest.approx(100.0)


def test_subject_level_and_failure_views_cover_every_sample(evaluated_store):
    _work, db = evaluated_store
    by_subject = query_json(db, "SELECT * FROM by_subject WHERE step = 0")
    assert {row["subject"] for row in by_subject} == {"algebra", "number_theory", "prealgebra"}
    by_level = query_json(db, "SELECT * FROM by_level WHERE step = 0")
    assert {row["level"] for row in by_level} == {1, 2, 3}
    failures = query_json(db, "SELECT * FROM format_failures WHERE step = 10")
    with connect_read_only(db) as con:
        expected = dict(con.execute("SELECT format_failure_type, count(*) FROM samples WHERE step = 10 "
                                    "AND format_failure_type IS NOT NULL GROUP BY 1").fetchall())
    (row,) = failures  # one evaluation at step 10; one column per failure type
    counted = {kind: row[kind] for kind in FORMAT_FAILURE_TYPES if row[kind]}
    assert counted == expected


def test_plots_draw_the_store_values(evaluated_store, tmp_path):
    _work, db = evaluated_store
    series = load_series(db)
    assert len(series) == 1
    figure = draw_accuracy(series)
    lines = {line.get_label(): line for ax in figure.axes for line in ax.get_lines()}
    plotted = [list(line.get_ydata()) for line in lines.values()]
    progress = query_json(db, "progress")
    assert [row["accuracy"] for row in progress] in [pytest.approx(y) for y in plotted]
    written = save_charts(series, tmp_path)
    assert len(written) == 5
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_a_write_statement_is_refused(evaluated_store):
    _work, db = evaluated_store
    result = subprocess.run([sys.executable, "-m", "common.store.query", "--db", str(db), "DELETE FROM samples"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert query_json(db, "SELECT count(*) AS n FROM samples")[0]["n"] == 14
