"""bin/plot on a filled store: the drawn data equals the store's, for one run and for two; the PNGs
are written and valid; --summary prints the progression table; missing/empty stores and unknown runs
give one line."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import matplotlib.pyplot as plt
import pytest
from store_fixtures import SUBJECTS, fill_synthetic_store

from common import grading
from common.store import plots, writer
from common.store.query import run_query

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    return fill_synthetic_store(tmp_path_factory.mktemp("plot") / "results.duckdb")


def view(db: Path, name: str) -> list[dict]:
    columns, rows = run_query(db, f"SELECT * FROM {name}")
    return [dict(zip(columns, row)) for row in rows]


def plot(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "common.store.plots", *args], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=300)


def lines_by_label(ax) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def same(drawn: list, stored: list) -> bool:
    return len(drawn) == len(stored) and all(
        (s is None and math.isnan(d)) or d == pytest.approx(s) for d, s in zip(drawn, stored))


def progress_of(db: Path, run_id: str) -> list[dict]:
    return [row for row in view(db, "progress") if row["run_id"] == run_id]


# ---- drawn values equal stored values ------------------------------------------------------------


@pytest.mark.parametrize("runs", [["run_a"], []], ids=["one run", "two runs"])
def test_line_charts_draw_the_stored_values(filled, runs):
    db = filled.db_path
    series = plots.load_series(db, runs)
    expected_runs = runs or ["run_a", "run_b"]
    assert [s.label for s in series] == expected_runs

    fig = plots.draw_accuracy(series)
    accuracy, format_accuracy = lines_by_label(fig.axes[0]), lines_by_label(fig.axes[1])
    assert set(accuracy) == set(format_accuracy) == set(expected_runs)
    for run in expected_runs:
        rows = progress_of(db, run)
        steps, values = accuracy[run]
        assert steps == [r["step"] for r in rows] and same(values, [r["accuracy"] for r in rows])
        assert same(format_accuracy[run][1], [r["format_accuracy"] for r in rows])
    assert fig.axes[0].get_xlabel() == "training step" and fig.legends
    plt.close(fig)

    fig = plots.draw_metrics(series)
    length_all, length_correct, length_incorrect, entropy = (lines_by_label(ax) for ax in fig.axes[:4])
    for run in expected_runs:
        rows = progress_of(db, run)
        assert same(length_all[run][1], [r["avg_response_length"] for r in rows])
        assert same(length_correct[run][1], [r["avg_response_length_correct"] for r in rows])
        assert same(length_incorrect[run][1], [r["avg_response_length_incorrect"] for r in rows])
        assert same(entropy[run][1], [r["avg_token_entropy"] for r in rows])
    plt.close(fig)

    fig = plots.draw_format_failures(series)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == expected_runs
    for ax, run in zip(panels, expected_runs):
        rows = [r for r in view(db, "format_failures") if r["run_id"] == run]
        drawn = lines_by_label(ax)
        for kind in grading.FORMAT_FAILURE_TYPES:
            assert same(drawn[kind.replace("_", " ")][1], [r[kind] for r in rows])
        assert same(drawn["all format failures"][1], [r["num_format_failure"] for r in rows])
    plt.close(fig)

    fig = plots.draw_by_subject(series)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert set(panels) == {subject.replace("_", " ") for subject in SUBJECTS}
    for row_subject in SUBJECTS:
        drawn = lines_by_label(panels[row_subject.replace("_", " ")])
        assert set(drawn) == set(expected_runs)
        for run in expected_runs:
            rows = [r for r in view(db, "by_subject") if r["run_id"] == run and r["subject"] == row_subject]
            assert drawn[run][0] == [r["step"] for r in rows]
            assert same(drawn[run][1], [r["accuracy"] for r in rows])
    plt.close(fig)


@pytest.mark.parametrize("runs", [["run_b"], []], ids=["one run", "two runs"])
def test_stacked_categories_are_the_stored_percentages(filled, runs):
    series = plots.load_series(filled.db_path, runs)
    fig = plots.draw_categorization(series)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [s.run_id for s in series]
    for ax, s in zip(panels, series):
        rows = progress_of(filled.db_path, s.run_id)
        bars = {container.get_label(): container for container in ax.containers}
        assert set(bars) == {"correct", "wrong answer", "format failure"}
        assert same(list(bars["correct"].datavalues), [r["pct_correct"] for r in rows])
        assert same(list(bars["wrong answer"].datavalues), [r["pct_wrong_answer"] for r in rows])
        assert same(list(bars["format failure"].datavalues), [r["pct_format_failure"] for r in rows])
        # Stacked: each bar starts where the one below ends, and the stack reaches 100 %.
        tops = [p.get_y() + p.get_height() for p in bars["format failure"].patches]
        assert all(top == pytest.approx(100) for top in tops)
        assert [p.get_x() + p.get_width() / 2 for p in bars["correct"].patches] == pytest.approx(
            [r["step"] for r in rows])
    plt.close(fig)


# ---- the command ---------------------------------------------------------------------------------


@pytest.mark.slow  # a real process
@pytest.mark.parametrize("args, labels", [(["--run", "run_a"], ["run_a"]), ([], ["run_a", "run_b"])],
                         ids=["one run", "two runs"])
def test_bin_plot_writes_five_valid_pngs(filled, tmp_path, args, labels):
    out = tmp_path / "plots"
    result = plot("--db", str(filled.db_path), "--out", str(out), *args)
    assert result.returncode == 0, result.stderr
    names = sorted(plots.CHARTS)
    assert sorted(Path(line).name for line in result.stdout.split()) == names
    assert sorted(p.name for p in out.iterdir()) == names  # no temporary files left behind
    for name in names:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 300 and image.shape[1] > 600
        # Not a blank canvas: a chart has many distinct colours.
        assert len({tuple(pixel) for pixel in image[::7, ::7].reshape(-1, image.shape[2])}) > 20


@pytest.mark.slow  # a real process
def test_summary_prints_the_progression_table(filled):
    result = plot("--db", str(filled.db_path), "--summary")
    assert result.returncode == 0, result.stderr
    blocks = result.stdout.strip().split("\n\n")
    assert [block.splitlines()[0].split()[0] for block in blocks] == ["run_a", "run_b"]
    for block in blocks:
        lines = block.splitlines()
        assert lines[1].split() == ["step", "accuracy", "format_accuracy", "mean_length", "mean_entropy"]
        run = lines[0].split()[0]
        assert lines[0].split()[-2:] == ["entropy:", "mean_token_entropy"]  # the block names its estimator
        for line, row in zip(lines[3:-1], progress_of(filled.db_path, run)):
            step, accuracy, format_accuracy, length, entropy = line.split()
            assert int(step) == row["step"]
            assert float(accuracy) == pytest.approx(row["accuracy"], abs=5e-5)
            assert float(format_accuracy) == pytest.approx(row["format_accuracy"], abs=5e-5)
            assert float(length) == pytest.approx(row["avg_response_length"], abs=5e-5)
            assert float(entropy) == pytest.approx(row["avg_token_entropy"], abs=5e-5)
        assert lines[-1] == f"({len(progress_of(filled.db_path, run))} rows)"


@pytest.mark.slow  # a real process
def test_summary_into_a_closed_pipe_is_quiet(filled):
    # `bin/plot --summary | head -1` when head has gone before the table is written: no traceback.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "common.store.plots", "--db", str(filled.db_path), "--summary"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.stderr == "" and done.returncode == 1


@pytest.mark.slow  # a real process
def test_unknown_run_names_the_runs_there(filled, tmp_path):
    result = plot("--db", str(filled.db_path), "--run", "run_z", "--out", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"plot: error: no successful evaluation of run run_z in {filled.db_path}; "
                                     f"runs there: run_a, run_b")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a real process
def test_missing_and_empty_stores_say_so(tmp_path):
    result = plot("--db", str(tmp_path / "none.duckdb"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "eval daemon (bin/eval) creates it" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # A store holding only a failed evaluation: nothing to plot yet.
    db = tmp_path / "results.duckdb"
    fill_synthetic_store(db, runs={"run_a": ()}, failed={"run_a": (0,)})
    result = plot("--db", str(db), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f"plot: error: no successful evaluation in {db} yet")
    assert not (tmp_path / "out").exists()


def test_a_single_evaluation_and_missing_entropy_still_draw(tmp_path):
    db = tmp_path / "results.duckdb"
    generated = fill_synthetic_store(db, runs={"run_a": (0,)}, failed={})
    (evaluation,), (samples,) = generated.evaluations.values(), generated.samples.values()
    # A second eval config of the same run, without entropy: labels name the config.
    evaluation = {**evaluation, "eval_key": "math500-x", "eval_set": "math500", "avg_token_entropy": None}
    writer.record_evaluation(db, evaluation, [{**s, "token_entropy": None} for s in samples])
    series = plots.load_series(db)
    assert [s.label for s in series] == [f"run_a [{s.eval_key}]" for s in series]
    fig = plots.draw_metrics(series)
    assert fig.axes[3].get_title().endswith("not recorded for run_a [math500-x]")
    assert [line.get_label() for line in fig.axes[3].get_lines()] == [series[0].label]
    plt.close(fig)
    assert len(plots.save_charts(series, tmp_path / "out")) == 5


def test_accuracy_bands_are_the_stored_95_percent_intervals(filled):
    series = plots.load_series(filled.db_path, ["run_a"])
    fig = plots.draw_accuracy(series)
    try:
        ax = fig.axes[0]  # the accuracy panel
        accuracy_band = ax.collections[0]  # drawn right after the accuracy line
        vertices = {(round(x, 9), round(y, 9)) for path in accuracy_band.get_paths() for x, y in path.vertices}
    finally:
        plt.close(fig)
    for row in progress_of(filled.db_path, "run_a"):
        assert row["accuracy_low"] < row["accuracy"] < row["accuracy_high"]
        assert (row["step"], round(row["accuracy_low"], 9)) in vertices
        assert (row["step"], round(row["accuracy_high"], 9)) in vertices
