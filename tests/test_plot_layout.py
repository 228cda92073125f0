"""bin/plot's charts hold up with 1, 3 and 12 series (runs x eval keys): every legend, title and axes
lies inside the figure, no legend covers an axes, no axes collapses, each series keeps its own
(colour, line style, marker), and the entropy panel names its estimator. The charts are rendered
for real (Agg) and measured in display pixels, as they are written to the PNG.

    /work/tools/pt tests/test_plot_layout.py
    PLOT_LAYOUT_OUT=/tmp/charts /work/tools/pt tests/test_plot_layout.py   # also keep the PNGs to look at
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from store_fixtures import summarise, synthetic_samples

from common.store import plots, writer

pytestmark = pytest.mark.slow  # renders every chart at 1, 3 and 12 series (seconds each)

SERIES_CASES = {"1 series": (1, 1), "3 series": (3, 1), "12 series": (6, 2)}  # (runs, eval keys per run)
LONG_RUN_ID = "sft-qwen2.5-math-1.5b-lr2e-5-{index}"  # realistic run ids make long labels


def fill(db: Path, runs: int, eval_keys: int) -> None:
    for index in range(runs):
        run_id = LONG_RUN_ID.format(index=index) if runs > 1 else "run_a"
        for key_index in range(eval_keys):
            for step in (0, 50, 100, 150):
                samples = synthetic_samples(f"{run_id}/{key_index}", step, 28)  # each series its own numbers
                evaluation = summarise(run_id, step, samples)
                if key_index:  # a second eval config: another set, and the vLLM estimator for entropy
                    evaluation.update(eval_key=f"math500-t0.0-p1.0-m1024-{key_index:08x}", eval_set="math500",
                                      entropy_method="vllm_prompt_logprobs_top20_lower_bound")
                assert writer.record_evaluation(db, evaluation, samples)


@pytest.fixture(scope="module", params=list(SERIES_CASES), ids=list(SERIES_CASES))
def series(request, tmp_path_factory):
    db = tmp_path_factory.mktemp("layout") / "results.duckdb"
    fill(db, *SERIES_CASES[request.param])
    loaded = plots.load_series(db)
    runs, keys = SERIES_CASES[request.param]
    assert len(loaded) == runs * keys
    return request.param, loaded


def inside(box, outer, slack: float = 1.0) -> bool:
    return (box.x0 >= outer.x0 - slack and box.y0 >= outer.y0 - slack and box.x1 <= outer.x1 + slack
            and box.y1 <= outer.y1 + slack)


def overlaps(a, b) -> bool:
    return a.x0 < b.x1 - 1 and b.x0 < a.x1 - 1 and a.y0 < b.y1 - 1 and b.y0 < a.y1 - 1


def legends(fig) -> list:
    return [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]


@pytest.mark.parametrize("name", list(plots.CHARTS))
def test_every_chart_fits_its_figure(series, name, tmp_path):
    case, loaded = series
    fig = plots.CHARTS[name](loaded)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = fig.bbox
    panels = [ax for ax in fig.axes if ax.axison]
    assert panels and legends(fig)
    for legend in legends(fig):
        box = legend.get_window_extent(renderer)
        assert inside(box, frame), f"{name}: legend {box} outside the figure {frame}"
        for ax in panels:
            assert not overlaps(box, ax.get_window_extent(renderer)), f"{name}: the legend covers an axes"
    for ax in panels:
        box = ax.get_window_extent(renderer)
        assert inside(box, frame)
        # Not collapsed: each panel keeps at least a tenth of the figure each way, and a data range.
        assert box.width >= frame.width / 10 and box.height >= frame.height / 10, f"{name}: axes {box} collapsed"
        assert ax.get_ylim()[1] > ax.get_ylim()[0] and ax.get_xlim()[1] > ax.get_xlim()[0]
        assert inside(ax.get_tightbbox(renderer), frame), f"{name}: tick labels or title outside the figure"
    if fig.get_suptitle():
        assert inside(fig._suptitle.get_window_extent(renderer), frame)
    keep = os.environ.get("PLOT_LAYOUT_OUT")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(keep) / f"{case.replace(' ', '_')}-{name}", dpi=plots.DPI)
    plt.close(fig)


@pytest.mark.parametrize("draw", [plots.draw_accuracy, plots.draw_metrics, plots.draw_by_subject],
                         ids=["accuracy", "metrics", "by_subject"])
def test_each_series_keeps_its_own_style(series, draw):
    _, loaded = series
    fig = draw(loaded)
    for ax in fig.axes:
        lines = [line for line in ax.get_lines() if line.get_label() in {s.label for s in loaded}]
        if lines:
            styles = {(tuple(line.get_color()), line.get_linestyle(), line.get_marker()) for line in lines}
            assert len(styles) == len(lines) == len({line.get_label() for line in lines})
    entries = fig.legends[0].get_texts()
    assert [text.get_text().replace("\n", " ") for text in entries] == [s.label for s in loaded]
    plt.close(fig)


def test_the_entropy_panel_names_its_estimators(series):
    case, loaded = series
    fig = plots.draw_metrics(loaded)
    title = fig.axes[3].get_title()
    assert "estimator: mean_token_entropy" in title
    assert ("vllm_prompt_logprobs_top20_lower_bound" in title) == (case == "12 series")
    plt.close(fig)
