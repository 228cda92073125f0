"""bin/plot: training-progression charts (PNG) from the results store, or a summary table.

    bin/plot                                  # every run -> results/training_progression_*.png
    bin/plot --run 20261126-0502 --out results/plots
    bin/plot --summary                        # step, accuracy, format accuracy, length, entropy

One line (or panel) per run; a run evaluated with two eval configs gets one per config. Safe while
the eval daemon writes: the store is read once, read-only, and released before drawing.
Exit codes: 0 ok, 2 no store / unknown run, 1 nothing to plot yet, store busy too long, or stdout
closed before everything was printed (`bin/plot --summary | head -1`: no traceback, no message).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import duckdb
import matplotlib

matplotlib.use("Agg")  # files only: works on servers without a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator, PercentFormatter  # noqa: E402

from common.cli import ToolParser, fail  # noqa: E402
from common.durable import atomic_write  # noqa: E402
from common.grading import FORMAT_FAILURE_TYPES  # noqa: E402
from common.store.query import BROKEN_PIPE_EXIT_CODE, DEFAULT_DB, REPO_ROOT, format_table, print_stdout  # noqa: E402
from common.store.schema import StoreBusyError, StoreError, connect_read_only, one_line_error  # noqa: E402
from common.store.writer import is_stratified_subset  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "results"
CATEGORY_STYLES = (("pct_correct", "correct", "#2ca02c"), ("pct_wrong_answer", "wrong answer", "#ff7f0e"),
                   ("pct_format_failure", "format failure", "#d62728"))
FAILURE_COLORS = dict(zip(FORMAT_FAILURE_TYPES, ("#9467bd", "#8c564b", "#e377c2", "#17becf")))
DPI = 120


class PlotError(ValueError):
    """Nothing (or not what was asked for) to plot; one-line message."""


@dataclass
class Series:
    """What one run, evaluated with one eval config, contributes to every chart (rows by step)."""
    run_id: str
    eval_key: str
    label: str = ""
    color: tuple | str = ""
    linestyle: str = "-"
    marker: str = "o"
    progress: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    by_subject: dict[str, list[dict]] = field(default_factory=dict)
    entropy_methods: list[str] = field(default_factory=list)  # the estimators behind avg_token_entropy
    sampling: list[dict] = field(default_factory=list)  # the sampling view: pass@k, maj@k

    def steps(self) -> list[int]:
        return [row["step"] for row in self.progress]

    def values(self, column: str, rows: list[dict] | None = None) -> list[float]:
        """A column as floats; NULL becomes NaN, which matplotlib leaves as a gap."""
        return [math.nan if row[column] is None else float(row[column]) for row in (rows or self.progress)]

    def style(self) -> dict:
        """Keyword arguments for ax.plot: this series' colour, line style and marker."""
        return {"color": self.color, "linestyle": self.linestyle, "marker": self.marker, "label": self.label}


# ---- loading -------------------------------------------------------------------------------------


def _rows(con, sql: str) -> list[dict]:
    result = con.execute(sql)
    names = [column[0] for column in result.description]
    return [dict(zip(names, row)) for row in result.fetchall()]


ENTROPY_METHODS_SQL = """SELECT run_id, eval_key, list(DISTINCT entropy_method ORDER BY entropy_method) AS methods
FROM evaluations WHERE status = 'ok' AND entropy_method IS NOT NULL GROUP BY run_id, eval_key"""


def _has_view(con, name: str) -> bool:
    """False on a store not yet migrated by the eval daemon (written by an older version)."""
    return con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = ?", [name]).fetchone()[0] > 0


def load_series(db_path: Path, run_ids: Sequence[str] = ()) -> list[Series]:
    """Read the progress, format_failures and by_subject views, grouped per (run, eval config)."""
    with connect_read_only(db_path) as con:
        try:
            progress = _rows(con, "SELECT * FROM progress ORDER BY run_id, eval_key, step")
            failures = _rows(con, "SELECT * FROM format_failures ORDER BY run_id, eval_key, step")
            subjects = _rows(con, "SELECT * FROM by_subject ORDER BY run_id, eval_key, subject, step")
            methods = _rows(con, ENTROPY_METHODS_SQL)
            sampling = _rows(con, "SELECT * FROM sampling ORDER BY run_id, eval_key, step") if _has_view(con, "sampling") else []
        except duckdb.Error as exc:  # e.g. a file that is not a results store
            raise PlotError(f"{db_path}: {one_line_error(exc)}") from None
    known = sorted({row["run_id"] for row in progress})
    unknown = [run for run in run_ids if run not in known]
    if unknown:
        raise PlotError(f"no successful evaluation of run {', '.join(unknown)} in {db_path}; "
                        f"runs there: {', '.join(known) or 'none yet'}")
    series: dict[tuple[str, str], Series] = {}
    for row in progress:
        if not run_ids or row["run_id"] in run_ids:
            key = (row["run_id"], row["eval_key"])
            series.setdefault(key, Series(*key)).progress.append(row)
    for row in failures:
        if (row["run_id"], row["eval_key"]) in series:
            series[(row["run_id"], row["eval_key"])].failures.append(row)
    for row in sampling:
        if (row["run_id"], row["eval_key"]) in series:
            series[(row["run_id"], row["eval_key"])].sampling.append(row)
    for row in subjects:
        if (row["run_id"], row["eval_key"]) in series:
            series[(row["run_id"], row["eval_key"])].by_subject.setdefault(row["subject"] or "unknown", []).append(row)
    for row in methods:
        if (row["run_id"], row["eval_key"]) in series:
            series[(row["run_id"], row["eval_key"])].entropy_methods = list(row["methods"])
    result = list(series.values())
    assign_styles(result)
    return result


LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def assign_styles(series: Sequence[Series]) -> None:
    """Labels, and a (colour, line style, marker) per series that no other series shares: ten
    colours, then the next line style, so 11+ series stay apart (40 before a style repeats)."""
    one_config_per_run = len({s.run_id for s in series}) == len(series)
    colors = plt.get_cmap("tab10").colors
    for index, s in enumerate(series):
        s.label = s.run_id if one_config_per_run else f"{s.run_id} [{s.eval_key}]"
        if one_config_per_run and s.progress and is_stratified_subset(s.progress[0]["eval_set"]):
            s.label += f" [{s.progress[0]['eval_set']} subset]"  # never a subset number that looks like a full one
        s.color = colors[index % len(colors)]
        s.linestyle = LINESTYLES[(index // len(colors)) % len(LINESTYLES)]
        s.marker = MARKERS[index % len(MARKERS)]


# ---- drawing -------------------------------------------------------------------------------------


def _style_step_axis(ax: Axes, steps: Sequence[int]) -> None:
    """x axis = training step; with few evaluations the ticks sit on the evaluated steps."""
    ax.set_xlabel("training step")
    distinct = sorted(set(steps))
    if len(distinct) <= 8:
        ax.set_xticks(distinct)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    ax.tick_params(labelbottom=True)  # shared x axes would hide them on upper rows
    ax.grid(True, alpha=0.3)
    if len(distinct) == 1:  # one evaluation: give the lone point some room
        ax.set_xlim(distinct[0] - 1, distinct[0] + 1)


def _style_share_axis(ax: Axes, label: str) -> None:
    ax.set_ylabel(label)
    ax.set_ylim(0, 1.02)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))


def _panel_grid(count: int, max_cols: int, panel_size: tuple[float, float], extra_width: float = 0.0,
                sharey: bool = True, min_height: float = 0.0) -> tuple[Figure, list[Axes]]:
    """count panels in rows of max_cols; extra_width inches on the right for a legend that needs
    min_height inches."""
    cols = min(count, max_cols)
    rows = math.ceil(count / cols)
    size = (panel_size[0] * cols + extra_width, max(panel_size[1] * rows, min_height))
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, sharex=True, sharey=sharey,
                             layout="constrained")
    flat = list(axes.flat)
    for spare in flat[count:]:
        spare.set_axis_off()
    return fig, flat


def _all_steps(series: Sequence[Series]) -> list[int]:
    return [step for s in series for step in s.steps()]


LABEL_WIDTH = 48  # characters; longer series labels are wrapped onto a second line
LEGEND_COLUMN_ROWS = 14  # entries per legend column before a second column starts


def _wrapped(label: str) -> str:
    return "\n".join(textwrap.wrap(label, LABEL_WIDTH, break_on_hyphens=False)) or label


def _legend_columns(count: int) -> int:
    return 1 if count <= LEGEND_COLUMN_ROWS else 2


def _legend_size(labels: Sequence[str]) -> tuple[float, float]:
    """(width, height) in inches of the series legend at 10 pt: ~0.075 in per character, ~0.23 in per line."""
    columns = _legend_columns(len(labels))
    wrapped = [_wrapped(label).splitlines() for label in labels]
    longest = max((len(line) for lines in wrapped for line in lines), default=0)
    lines_per_column = math.ceil(sum(len(lines) for lines in wrapped) / columns)
    return columns * (0.7 + 0.075 * longest), 0.6 + 0.23 * lines_per_column


def _series_legend(fig: Figure, series: Sequence[Series], title: str = "run") -> None:
    """One legend entry per series, outside the axes on the right (constrained layout makes room)."""
    handles = [Line2D([], [], color=s.color, linestyle=s.linestyle, marker=s.marker, label=_wrapped(s.label))
               for s in series]
    fig.legend(handles=handles, loc="outside right upper", frameon=False, title=title,
               ncols=_legend_columns(len(handles)))


def _series_figure(panels: int, series: Sequence[Series], max_cols: int, panel_size: tuple[float, float],
                   sharey: bool = True) -> tuple[Figure, list[Axes]]:
    """A grid of panels that each draw every series, with room on the right for their legend."""
    width, height = _legend_size([s.label for s in series])
    return _panel_grid(panels, max_cols, panel_size, width, sharey, min_height=height)


def _band(ax: Axes, rows: list[dict], s: Series, metric: str) -> None:
    """The metric's 95% interval (the views' <metric>_low / _high) as a shaded band behind its line."""
    if rows and f"{metric}_low" in rows[0]:
        ax.fill_between([row["step"] for row in rows], s.values(f"{metric}_low", rows), s.values(f"{metric}_high", rows),
                        color=s.color, alpha=0.15, linewidth=0)


def _plot_pass_at_k(ax: Axes, s: Series) -> None:
    """pass@k (dotted) for evaluations with k > 1 responses per problem; accuracy is then pass@1."""
    rows = [row for row in s.sampling if row["samples_per_problem"] > 1]
    if rows:
        k = max(row["samples_per_problem"] for row in rows)
        ax.plot([row["step"] for row in rows], s.values("pass_at_k", rows), marker=s.marker, linestyle=":",
                color=s.color, label=f"{s.label}: pass@{k}")


def draw_accuracy(series: Sequence[Series]) -> Figure:
    """Two panels, accuracy and format accuracy, one line per series."""
    fig, (ax_accuracy, ax_format) = _series_figure(2, series, max_cols=2, panel_size=(5.5, 4.5))
    for ax, column, title in ((ax_accuracy, "accuracy", "Accuracy"), (ax_format, "format_accuracy", "Format accuracy")):
        for s in series:
            ax.plot(s.steps(), s.values(column), **s.style())
            _band(ax, s.progress, s, column)
            if column == "accuracy":
                _plot_pass_at_k(ax, s)
        ax.set_title(title)
        _style_share_axis(ax, "share of test problems")
        _style_step_axis(ax, _all_steps(series))
    fig.suptitle("Accuracy and format accuracy vs training step (bands: 95% intervals; dotted: pass@k)")
    _series_legend(fig, series)
    return fig


def _bar_width(steps: Sequence[int]) -> float:
    gaps = [b - a for a, b in zip(sorted(set(steps)), sorted(set(steps))[1:])]
    return 0.8 * min(gaps) if gaps else 0.8


def _per_series_grid(series: Sequence[Series]) -> tuple[Figure, list[Axes]]:
    """One panel per series (small multiples), titled with the series' (wrapped) label."""
    fig, axes = _panel_grid(len(series), max_cols=3, panel_size=(6.5, 4.5))
    for ax, s in zip(axes, series):
        ax.set_title("\n".join(textwrap.wrap(s.label, 60, break_on_hyphens=False)), fontsize="medium")
    return fig, axes


def draw_categorization(series: Sequence[Series]) -> Figure:
    """Stacked bars per run: correct, wrong answer and format failure add up to 100 %."""
    fig, axes = _per_series_grid(series)
    width = _bar_width(_all_steps(series))
    for ax, s in zip(axes, series):
        bottom = [0.0] * len(s.progress)
        for column, label, color in CATEGORY_STYLES:
            values = [0.0 if math.isnan(v) else v for v in s.values(column)]
            ax.bar(s.steps(), values, width, bottom=bottom, color=color, label=label)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_ylabel("% of test problems")
        ax.set_ylim(0, 100)
        _style_step_axis(ax, _all_steps(series))
    fig.suptitle("Outcome of each test problem vs training step")
    # Below the panels: beside them it would collide with the title when there is only one panel.
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3, frameon=False)
    return fig


METRIC_PANELS = (("avg_response_length", "Mean response length: all"),
                 ("avg_response_length_correct", "Mean response length: correct"),
                 ("avg_response_length_incorrect", "Mean response length: incorrect"))


def _has_entropy(s: Series) -> bool:
    return not all(math.isnan(v) for v in s.values("avg_token_entropy"))


def entropy_title(series: Sequence[Series]) -> str:
    """The entropy panel's title: the estimator(s) behind the numbers, and whose are missing."""
    drawn = [s for s in series if _has_entropy(s)]
    methods = sorted({method for s in drawn for method in s.entropy_methods})
    title = "Mean token entropy (sampled responses)"
    title += "\nestimator: " + (", ".join(methods) if methods else "not recorded")
    if len(methods) > 1:
        title += "\n(different estimators: compare lines of one estimator only)"
    missing = [s.label for s in series if not _has_entropy(s)]
    if drawn and missing:  # in the title, where it cannot cover a line
        title += "\nnot recorded for " + _shortened(", ".join(missing), 70)
    return title


def _shortened(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def draw_metrics(series: Sequence[Series]) -> Figure:
    """Four panels: mean response length of all / correct / incorrect responses, mean token entropy."""
    fig, axes = _series_figure(4, series, max_cols=2, panel_size=(5.5, 4.0), sharey=False)  # tokens vs nats
    for ax, (column, title) in zip(axes, METRIC_PANELS):
        for s in series:
            ax.plot(s.steps(), s.values(column), **s.style())
        ax.set_title(title)
        ax.set_ylabel("tokens")
        ax.set_ylim(bottom=0)
    _draw_entropy(axes[3], series)
    for ax in axes:
        _style_step_axis(ax, _all_steps(series))
    fig.suptitle("Response length and token entropy vs training step")
    _series_legend(fig, series)
    return fig


def _draw_entropy(ax: Axes, series: Sequence[Series]) -> None:
    for s in filter(_has_entropy, series):
        ax.plot(s.steps(), s.values("avg_token_entropy"), **s.style())
    if not ax.get_lines():
        ax.text(0.5, 0.5, "no token entropy recorded", ha="center", va="center", transform=ax.transAxes,
                color="gray")
    ax.set_title(entropy_title(series), fontsize="medium")
    ax.set_ylabel("nats per token")


def draw_format_failures(series: Sequence[Series]) -> Figure:
    fig, axes = _per_series_grid(series)
    for ax, s in zip(axes, series):
        steps = [row["step"] for row in s.failures]
        ax.plot(steps, s.values("num_format_failure", s.failures), color="black", linestyle="--", marker=".",
                label="all format failures")
        for kind in FORMAT_FAILURE_TYPES:
            ax.plot(steps, s.values(kind, s.failures), marker="o", color=FAILURE_COLORS[kind],
                    label=kind.replace("_", " "))
        ax.set_ylabel("test problems")
        ax.set_ylim(bottom=0)
        _style_step_axis(ax, _all_steps(series))
    fig.suptitle("Format failures by type vs training step")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3, frameon=False)
    return fig


def draw_by_subject(series: Sequence[Series]) -> Figure:
    subjects = sorted({subject for s in series for subject in s.by_subject})
    if not subjects:
        raise PlotError("the store has evaluations but no samples with a subject; nothing to draw per subject")
    fig, axes = _series_figure(len(subjects), series, max_cols=4, panel_size=(4.2, 3.4))
    for ax, subject in zip(axes, subjects):
        for s in series:
            rows = s.by_subject.get(subject, [])
            if rows:
                ax.plot([row["step"] for row in rows], s.values("accuracy", rows), **s.style())
                _band(ax, rows, s, "accuracy")
        ax.set_title(subject.replace("_", " "))
        _style_share_axis(ax, "accuracy")
        _style_step_axis(ax, _all_steps(series))
    fig.suptitle("Accuracy per subject vs training step (bands: 95% intervals)")
    _series_legend(fig, series)
    return fig


CHARTS: dict[str, Callable[[Sequence[Series]], Figure]] = {
    "training_progression_accuracy.png": draw_accuracy,
    "training_progression_categorization.png": draw_categorization,
    "training_progression_metrics.png": draw_metrics,
    "training_progression_format_failures.png": draw_format_failures,
    "training_progression_by_subject.png": draw_by_subject,
}


def save_charts(series: Sequence[Series], out_dir: Path) -> list[Path]:
    """Draw every chart and write it atomically (a viewer never sees half a PNG)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in CHARTS.items():
        fig = draw(series)
        path = out_dir / name
        try:
            atomic_write(path, lambda handle: fig.savefig(handle, dpi=DPI, format="png"), binary=True)
        finally:
            plt.close(fig)
        written.append(path)
    return written


def summary_text(series: Sequence[Series]) -> str:
    blocks = []
    for s in series:
        rows = [(r["step"], r["accuracy"], r["format_accuracy"], r["avg_response_length"], r["avg_token_entropy"])
                for r in s.progress]
        table = format_table(("step", "accuracy", "format_accuracy", "mean_length", "mean_entropy"), rows)
        method = f"  entropy: {', '.join(s.entropy_methods)}" if s.entropy_methods else ""
        blocks.append(f"{s.run_id}  ({s.eval_key}){method}\n{table}")
    return "\n\n".join(blocks)


# ---- entry point ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ToolParser("plot", description="Training-progression charts from the store.")
    parser.add_argument("--db", type=Path, default=DEFAULT_DB, help="store file (default: %(default)s)")
    parser.add_argument("--run", action="append", default=[], metavar="RUN_ID",
                        help="only this run (repeat for several; default: every run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the PNGs (default: %(default)s)")
    parser.add_argument("--summary", action="store_true", help="print the progression table instead of drawing")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="bin/plot: %(message)s")
    args = parse_args(argv)
    try:
        series = load_series(args.db, args.run)
    except StoreBusyError as exc:
        return fail("plot", exc, 1)
    except (StoreError, PlotError) as exc:
        return fail("plot", exc)
    if not series:
        return fail("plot", f"no successful evaluation in {args.db} yet; plots appear after the eval daemon's "
                            "first evaluation", 1)
    if args.summary:
        return 0 if print_stdout(summary_text(series)) else BROKEN_PIPE_EXIT_CODE
    try:
        paths = save_charts(series, args.out)
    except PlotError as exc:
        return fail("plot", exc, 1)
    if paths and not print_stdout("\n".join(str(path) for path in paths)):
        return BROKEN_PIPE_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
