"""bin/report on a filled store: one self-contained HTML file (nothing loaded from elsewhere) whose
embedded data are the store's samples, with the extracted answers of common/grading.py; the caps
hold the same problems at every step; errors are one line. Then a real headless Chromium opens the
file from disk, a mouse click on the "wrong answer" filter leaves only wrong answers, a click on a
row shows its prompt and response, a click on another step jumps to the same problem there, and a
screenshot is taken (kept in $REPORT_SCREENSHOT_OUT when set, to look at).

    /work/tools/pt tests/test_report.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
from browser_support import Browser, find_chromium
from store_fixtures import fill_synthetic_store

from common.grading import extract_answer
from common.store.query import run_query

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.slow  # bin/report as a real process (and a real browser)


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    return fill_synthetic_store(tmp_path_factory.mktemp("report") / "results.duckdb")


def report(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "common.store.report", *args], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=300)


def embedded_data(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def page(filled, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("page") / "report.html"
    done = report("--db", str(filled.db_path), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(str(out))
    return out


def test_the_page_holds_every_sample_and_needs_nothing_else(filled, page):
    text = page.read_text()
    # Self-contained: no script, style, image or frame from a URL (links to #anchors only).
    assert not re.search(r'(src|href)="(?!#|data:)', text)
    assert "<link" not in text and "@import" not in text
    assert text.count("data:image/png;base64,") == 5  # the five bin/plot charts
    for name in ("progress", "by_subject", "by_level"):
        assert f'id="table-{name}"' in text
    data = embedded_data(text)
    assert [s["run_id"] for s in data["series"]] == ["run_a", "run_b"]
    for series in data["series"]:
        problems = series["problems"]
        # Only successful evaluations (run_b's step 150 failed), every sample of each, fewer than the cap.
        assert sorted(map(int, series["steps"])) == sorted(step for run, step in filled.evaluations
                                                           if run == series["run_id"])
        for step, rows in series["steps"].items():
            stored = {s["problem_id"]: s for s in filled.samples[(series["run_id"], int(step))]}
            assert len(rows) == len(stored) == series["total_problems"]
            for index, category, failure, response, extracted, *_ in rows:
                sample = stored[problems[index][0]]
                assert (category, failure, response) == (sample["category"], sample["format_failure_type"],
                                                         sample["response"])
                assert extracted == extract_answer(sample["response"])
                assert problems[index][4] == sample["ground_truth"] and problems[index][3] == sample["prompt"]


def test_the_caps_keep_the_same_problems_at_every_step(filled, page, tmp_path):
    out = tmp_path / "small.html"
    done = report("--db", str(filled.db_path), "--out", str(out), "--max-problems", "5", "--max-response-chars", "40",
                  "--run", "run_a")
    assert done.returncode == 0, done.stderr
    (series,) = embedded_data(out.read_text())["series"]
    assert series["run_id"] == "run_a" and len(series["problems"]) == 5 and series["total_problems"] == 70
    for rows in series["steps"].values():
        assert sorted(row[0] for row in rows) == list(range(5))  # the same five problems at each step
        assert all(len(row[3]) <= 40 + len("\n[... cut at 40 characters]") for row in rows)
    assert out.stat().st_size < page.stat().st_size / 2


def test_errors_are_one_line(filled, tmp_path):
    missing = report("--db", str(tmp_path / "none.duckdb"), "--out", str(tmp_path / "r.html"))
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    unknown = report("--db", str(filled.db_path), "--run", "run_z", "--out", str(tmp_path / "r.html"))
    assert unknown.returncode == 2 and unknown.stderr.startswith("report: error: no successful evaluation of run run_z")
    assert not (tmp_path / "r.html").exists()


# ---- in a real browser ---------------------------------------------------------------------------


def wrong_answers_at(db: Path, run_id: str, step: int) -> int:
    _, rows = run_query(db, f"SELECT count(*) FROM samples WHERE run_id = '{run_id}' AND step = {step} "
                            "AND category = 'wrong_answer'")
    return rows[0][0]


def test_a_browser_filters_shows_and_jumps(filled, page, tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip("no chromium on PATH (.ci/run installs the Debian package when apt can reach a mirror)")
    with Browser.start(binary, tmp_path / "profile") as browser:
        browser.open(page.as_uri())
        assert browser.evaluate("document.querySelectorAll('#charts ~ figure img').length") == 5
        # The latest step of the first run is shown first; all its samples are listed (50 per page).
        assert browser.evaluate("document.getElementById('step-select').value") == "150"
        browser.click("#category-filter button[data-category=wrong_answer]")
        expected = wrong_answers_at(filled.db_path, "run_a", 150)
        assert expected > 0
        shown = browser.evaluate("[...document.querySelectorAll('tr.sample')].map(r => r.dataset.category)")
        assert shown == ["wrong_answer"] * min(expected, 50)
        assert browser.evaluate("document.getElementById('shown-count').textContent").startswith(f"{expected} of 70")
        # A row shows its prompt, response, extracted answer and verdict.
        problem_id = browser.evaluate("document.querySelector('tr.sample').dataset.problem")
        browser.click("tr.sample")
        sample = next(s for s in filled.samples[("run_a", 150)] if s["problem_id"] == problem_id)
        assert browser.evaluate("document.querySelector('#detail pre.prompt').textContent") == sample["prompt"]
        assert browser.evaluate("document.querySelector('#detail pre.response').textContent") == sample["response"]
        facts = browser.evaluate("document.querySelector('#detail dl.facts').textContent")
        assert "wrong answer" in facts and f"ground truth{sample['ground_truth']}" in facts
        # Jump to step 0 for the same problem.
        browser.click("#detail .steps button[data-step='0']")
        assert browser.evaluate("document.getElementById('step-select').value") == "0"
        before = next(s for s in filled.samples[("run_a", 0)] if s["problem_id"] == problem_id)
        assert browser.evaluate("document.querySelector('#detail pre.response').textContent") == before["response"]
        browser.click("#category-filter button[data-category=wrong_answer]")  # scrolls the browser into view
        png = browser.screenshot()
    assert png.startswith(PNG_MAGIC) and len(png) > 20_000
    shot = tmp_path / "report.png"
    shot.write_bytes(png)
    image = matplotlib.image.imread(shot)
    assert image.shape[0] >= 1000 and image.shape[1] >= 1000
    assert len({tuple(pixel) for pixel in image[::9, ::9].reshape(-1, image.shape[2])}) > 20  # not a blank page
    keep = os.environ.get("REPORT_SCREENSHOT_OUT")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / "report.png").write_bytes(png)
