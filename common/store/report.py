"""bin/report: one self-contained HTML page to browse a results store: the progression charts, the
progress / by_subject / by_level tables, and the generations of every checkpoint.

    bin/report                                    # results/results.duckdb -> results/report.html
    bin/report --db results/demo/results.duckdb   # the demo's store -> results/demo/report.html
    bin/report --run RUN_ID --max-problems 500 --out /tmp/report.html

The page needs no server and no network (open it from disk): the charts are embedded PNGs, the
samples one embedded JSON document that a short script in the page filters (category, failure type,
subject, level) and pages. A large store stays a page a browser opens: per run and eval config at
most --max-problems problems (the same ones at every step, picked by a hash of problem_id, so each
can be followed from step to step), responses cut at --max-response-chars; the page says what it
left out. Safe while the eval daemon writes: the store is read once, read-only, then released.
Exit codes: 0 written, 2 no store / unknown run / bad option, 1 nothing evaluated yet or store busy.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import duckdb
import matplotlib.pyplot as plt

from common.cli import ToolParser, fail
from common.durable import atomic_write_text
from common.grading import CATEGORIES, FORMAT_FAILURE_TYPES, extract_answer
from common.store import plots
from common.store.query import DEFAULT_DB
from common.store.schema import StoreBusyError, StoreError, connect_read_only, one_line_error

DEFAULT_MAX_PROBLEMS = 200  # per (run, eval config): 200 x 1,024-token responses x 20 steps ~ 16 MB
DEFAULT_MAX_RESPONSE_CHARS = 4000
TABLES = ("progress", "by_subject", "by_level")
SAMPLE_COLUMNS = ("step", "problem_id", "subject", "level", "prompt", "ground_truth", "response", "category",
                  "format_failure_type", "grading_note", "response_length", "finish_reason")

# Per (run, eval key): the first max_problems problem ids in md5 order (stable from step to step).
CHOSEN_SAMPLES_SQL = f"""
WITH ok AS (SELECT run_id, step, eval_key FROM evaluations WHERE status = 'ok'),
problems AS (SELECT DISTINCT s.run_id, s.eval_key, s.problem_id FROM samples s JOIN ok USING (run_id, step, eval_key)),
chosen AS (SELECT * FROM problems
           QUALIFY row_number() OVER (PARTITION BY run_id, eval_key ORDER BY md5(problem_id)) <= $max_problems)
SELECT s.run_id, s.eval_key, {", ".join(f"s.{c}" for c in SAMPLE_COLUMNS)}
FROM samples s JOIN ok USING (run_id, step, eval_key) JOIN chosen USING (run_id, eval_key, problem_id)
ORDER BY s.run_id, s.eval_key, s.problem_id, s.step
"""
PROBLEM_COUNTS_SQL = """SELECT s.run_id, s.eval_key, count(DISTINCT s.problem_id) AS problems
FROM samples s JOIN evaluations e USING (run_id, step, eval_key) WHERE e.status = 'ok' GROUP BY ALL"""


class ReportError(ValueError):
    """Nothing (or not what was asked for) to report; one-line message."""


@dataclass
class StoreContents:
    tables: dict[str, tuple[list[str], list[tuple]]]  # view -> (columns, rows)
    samples: list[dict]
    problem_counts: dict[tuple[str, str], int]


def read_store(db: Path, run_ids: Sequence[str], max_problems: int) -> StoreContents:
    """The views and the chosen samples, in one short read-only connection."""
    where = " WHERE run_id IN (SELECT unnest($runs))" if run_ids else ""
    params = {"runs": list(run_ids)} if run_ids else {}
    with connect_read_only(db) as con:
        try:
            tables = {}
            for name in TABLES:
                result = con.execute(f"SELECT * FROM {name}{where}", params)
                tables[name] = ([c[0] for c in result.description], result.fetchall())
            result = con.execute(CHOSEN_SAMPLES_SQL, {"max_problems": max_problems})
            names = [c[0] for c in result.description]
            samples = [dict(zip(names, row)) for row in result.fetchall()]
            counts = {(r, k): n for r, k, n in con.execute(PROBLEM_COUNTS_SQL).fetchall()}
        except duckdb.Error as exc:  # e.g. a file that is not a results store
            raise ReportError(f"{db}: {one_line_error(exc)}") from None
    if run_ids:
        samples = [s for s in samples if s["run_id"] in run_ids]
    return StoreContents(tables, samples, counts)


# ---- the page's parts ----------------------------------------------------------------------------


def chart_images(series: Sequence[plots.Series]) -> list[tuple[str, str]]:
    """(title, base64 PNG) of each bin/plot chart; a chart with nothing to draw is left out."""
    images = []
    for name, draw in plots.CHARTS.items():
        try:
            fig = draw(series)
        except plots.PlotError:  # e.g. no subjects recorded: the other charts still help
            continue
        buffer = io.BytesIO()
        try:
            fig.savefig(buffer, format="png", dpi=plots.DPI)
        finally:
            plt.close(fig)
        images.append((name.removesuffix(".png"), base64.b64encode(buffer.getvalue()).decode("ascii")))
    return images


def table_html(name: str, columns: list[str], rows: list[tuple]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    return (f'<h3 id="table-{name}">{name} <small>({len(rows)} rows)</small></h3>'
            f'<div class="scroll"><table class="data"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def browser_data(samples: list[dict], series: Sequence[plots.Series], counts: dict[tuple[str, str], int],
                 max_response_chars: int) -> dict:
    """The JSON the page's script reads: per series its problems once, then per step one row per problem."""
    labels = {(s.run_id, s.eval_key): s.label for s in series}
    out: dict[tuple[str, str], dict] = {}
    for sample in samples:
        key = (sample["run_id"], sample["eval_key"])
        if key not in labels:  # only failed evaluations, or a run left out with --run
            continue
        entry = out.setdefault(key, {"label": labels[key], "run_id": key[0], "eval_key": key[1],
                                     "total_problems": counts.get(key, 0), "problems": [], "index": {}, "steps": {}})
        if sample["problem_id"] not in entry["index"]:
            entry["index"][sample["problem_id"]] = len(entry["problems"])
            entry["problems"].append([sample["problem_id"], sample["subject"] or "unknown", sample["level"],
                                      sample["prompt"] or "", sample["ground_truth"] or ""])
        response = sample["response"] or ""
        cut = len(response) > max_response_chars
        entry["steps"].setdefault(str(sample["step"]), []).append([
            entry["index"][sample["problem_id"]], sample["category"], sample["format_failure_type"],
            response[:max_response_chars] + ("\n[... cut at %d characters]" % max_response_chars if cut else ""),
            extract_answer(response), sample["grading_note"], sample["response_length"], sample["finish_reason"]])
    for entry in out.values():
        del entry["index"]
    return {"categories": list(CATEGORIES), "failure_types": list(FORMAT_FAILURE_TYPES), "series": list(out.values())}


def _script_json(data: dict) -> str:
    """JSON that is safe inside <script>: no '</' can end the element early."""
    return json.dumps(data, separators=(",", ":")).replace("</", "<\\/")


def render(db: Path, contents: StoreContents, series: Sequence[plots.Series], max_problems: int,
           max_response_chars: int) -> str:
    charts = "".join(f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{html.escape(title)}</figcaption></figure>" for title, data in chart_images(series))
    tables = "".join(table_html(name, *contents.tables[name]) for name in TABLES)
    data = browser_data(contents.samples, series, contents.problem_counts, max_response_chars)
    cap = (f"At most {max_problems} problems per run and eval config (the same ones at every step, chosen by a "
           f"hash of problem_id; bin/report --max-problems N for more), responses cut at {max_response_chars} "
           f"characters.")
    return PAGE.format(title=html.escape(f"mathsft report: {db}"), db=html.escape(str(db)),
                       generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                       charts=charts, tables=tables, cap=html.escape(cap), data=_script_json(data), script=SCRIPT,
                       style=STYLE)


# ---- entry point ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ToolParser("report", description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=DEFAULT_DB, help="store file (default: %(default)s)")
    parser.add_argument("--run", action="append", default=[], metavar="RUN_ID",
                        help="only this run (repeat for several; default: every run)")
    parser.add_argument("--out", type=Path, help="HTML file to write (default: report.html beside the store)")
    parser.add_argument("--max-problems", type=int, default=DEFAULT_MAX_PROBLEMS,
                        help="problems per run and eval config in the sample browser (default: %(default)s)")
    parser.add_argument("--max-response-chars", type=int, default=DEFAULT_MAX_RESPONSE_CHARS,
                        help="longer responses are cut (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.max_problems < 1 or args.max_response_chars < 1:
        parser.error("--max-problems and --max-response-chars must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or args.db.parent / "report.html"
    try:
        series = plots.load_series(args.db, args.run)
        if not series:
            return fail("report", f"no successful evaluation in {args.db} yet; the report appears after the "
                                  "eval daemon's first evaluation", 1)
        contents = read_store(args.db, args.run, args.max_problems)
    except StoreBusyError as exc:
        return fail("report", exc, 1)
    except (StoreError, plots.PlotError, ReportError) as exc:
        return fail("report", exc)
    page = render(args.db, contents, series, args.max_problems, args.max_response_chars)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    checkpoints = sum(len(s.progress) for s in series)
    print(f"{out} ({len(page.encode()) / 2**20:.1f} MiB: {len(series)} run(s) x eval config, {checkpoints} "
          f"checkpoints, {len(contents.samples)} samples); open it in a browser")
    return 0


# ---- the page ------------------------------------------------------------------------------------

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
.meta { color: #666; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; max-width: calc(50% - 1em); }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #666; font-size: 0.9em; }
.scroll { max-height: 24em; overflow: auto; border: 1px solid #ddd; }
table.data { border-collapse: collapse; font-size: 0.9em; }
table.data th, table.data td { padding: 0.2em 0.6em; border-bottom: 1px solid #eee; text-align: left; }
table.data th { position: sticky; top: 0; background: #f6f6f6; }
#controls { display: flex; flex-wrap: wrap; gap: 0.6em 1.2em; align-items: center; margin: 0.6em 0; }
#category-filter button { margin-right: 0.2em; padding: 0.2em 0.7em; border: 1px solid #aaa; background: #fff;
  border-radius: 1em; cursor: pointer; }
#category-filter button.active { background: #333; color: #fff; }
tr.sample { cursor: pointer; } tr.sample:hover { background: #f3f3ff; } tr.sample.selected { background: #e3e3ff; }
.cat-correct { color: #1a7f1a; } .cat-wrong_answer { color: #c25e00; } .cat-format_failure { color: #c62828; }
#detail { margin-top: 1em; padding: 0.8em; border: 1px solid #ccc; background: #fafafa; }
#detail pre { white-space: pre-wrap; background: #fff; border: 1px solid #eee; padding: 0.5em; max-height: 20em;
  overflow: auto; }
#detail .steps button { margin: 0.1em; padding: 0.1em 0.5em; border: 1px solid #aaa; background: #fff; cursor: pointer; }
#detail .steps button.current { outline: 2px solid #333; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 0.2em 1em; }
dl.facts dt { font-weight: 600; }
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{style}</style></head>
<body>
<h1>mathsft report</h1>
<p class="meta">store <code>{db}</code>, written {generated} by <code>bin/report</code>.
<a href="#charts">charts</a> | <a href="#tables">tables</a> | <a href="#samples">samples</a></p>
<h2 id="charts">Progression</h2>
{charts}
<h2 id="tables">Tables</h2>
{tables}
<h2 id="samples">Samples</h2>
<p class="meta" id="cap">{cap} <span id="series-note"></span></p>
<div id="controls">
  <label>run <select id="series-select"></select></label>
  <label>step <select id="step-select"></select></label>
  <span id="category-filter"></span>
  <label>failure type <select id="failure-select"></select></label>
  <label>subject <select id="subject-select"></select></label>
  <label>level <select id="level-select"></select></label>
</div>
<p><span id="shown-count"></span> <button id="prev-page">&lsaquo; previous</button>
<span id="page-note"></span> <button id="next-page">next &rsaquo;</button></p>
<div class="scroll"><table class="data" id="sample-table"><thead><tr><th>problem</th><th>subject</th><th>level</th>
<th>verdict</th><th>extracted answer</th><th>ground truth</th><th>length</th></tr></thead><tbody></tbody></table></div>
<div id="detail" hidden></div>
<script type="application/json" id="report-data">{data}</script>
<script>{script}</script>
</body></html>
"""

SCRIPT = """
"use strict";
const DATA = JSON.parse(document.getElementById("report-data").textContent);
const PAGE_SIZE = 50;
const state = {series: 0, step: null, category: "all", failure: "all", subject: "all", level: "all", page: 0,
               problem: null};
const $ = (id) => document.getElementById(id);
const LABELS = {correct: "correct", wrong_answer: "wrong answer", format_failure: "format failure"};

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}
function options(select, values, label) {
  select.replaceChildren(...values.map((v) => el("option", {value: v}, label ? label(v) : v)));
}
function series() { return DATA.series[state.series]; }
function steps() { return Object.keys(series().steps).map(Number).sort((a, b) => a - b); }
function rowsAt(step) { return series().steps[String(step)] || []; }
function problem(row) { return series().problems[row[0]]; }
function verdict(row) { return row[1] === "format_failure" ? "format failure: " + row[2] : LABELS[row[1]]; }

function matches(row) {
  const p = problem(row);
  return (state.category === "all" || row[1] === state.category)
    && (state.failure === "all" || row[2] === state.failure)
    && (state.subject === "all" || p[1] === state.subject)
    && (state.level === "all" || String(p[2]) === state.level);
}

function setupSeries() {
  const s = series();
  options($("step-select"), steps().map(String));
  state.step = steps()[steps().length - 1];
  $("step-select").value = String(state.step);
  options($("subject-select"), ["all", ...new Set(s.problems.map((p) => p[1]))].sort((a, b) =>
    a === "all" ? -1 : b === "all" ? 1 : a.localeCompare(b)));
  options($("level-select"), ["all", ...[...new Set(s.problems.map((p) => String(p[2])))].sort()]);
  $("series-note").textContent = "This run: " + s.problems.length + " of " + s.total_problems + " problems shown.";
  state.subject = state.level = "all";
  state.problem = null;
}

function draw() {
  for (const button of $("category-filter").children)
    button.classList.toggle("active", button.dataset.category === state.category);
  $("failure-select").disabled = state.category !== "all" && state.category !== "format_failure";
  const shown = rowsAt(state.step).filter(matches);
  const pages = Math.max(1, Math.ceil(shown.length / PAGE_SIZE));
  state.page = Math.min(state.page, pages - 1);
  $("shown-count").textContent = shown.length + " of " + rowsAt(state.step).length + " samples at step " +
    state.step + " match.";
  $("page-note").textContent = "page " + (state.page + 1) + " of " + pages;
  $("prev-page").disabled = state.page === 0;
  $("next-page").disabled = state.page >= pages - 1;
  const body = $("sample-table").tBodies[0];
  body.replaceChildren(...shown.slice(state.page * PAGE_SIZE, (state.page + 1) * PAGE_SIZE).map((row) => {
    const p = problem(row);
    const tr = el("tr", {class: "sample" + (row[0] === state.problem ? " selected" : ""), "data-category": row[1],
                         "data-problem": p[0]});
    tr.append(el("td", {}, p[0]), el("td", {}, p[1]), el("td", {}, p[2]),
              el("td", {class: "cat-" + row[1]}, verdict(row)), el("td", {}, row[4] === null ? "(none)" : row[4]),
              el("td", {}, p[4]), el("td", {}, row[6]));
    tr.addEventListener("click", () => { state.problem = row[0]; draw(); });
    return tr;
  }));
  drawDetail();
}

function drawDetail() {
  const box = $("detail");
  const row = rowsAt(state.step).find((r) => r[0] === state.problem);
  if (state.problem === null) { box.hidden = true; return; }
  box.hidden = false;
  const p = series().problems[state.problem];
  box.replaceChildren(el("h3", {}, p[0] + " (" + p[1] + ", level " + p[2] + ")"));
  const jump = el("p", {class: "steps"}, "This problem at step: ");
  for (const step of steps()) {
    const other = rowsAt(step).find((r) => r[0] === state.problem);
    const button = el("button", {class: (step === state.step ? "current " : "") + (other ? "cat-" + other[1] : ""),
                                 title: other ? verdict(other) : "not evaluated", "data-step": step}, step);
    button.disabled = !other;
    button.addEventListener("click", () => { state.step = step; $("step-select").value = String(step); draw(); });
    jump.append(button);
  }
  box.append(jump);
  if (!row) { box.append(el("p", {}, "Not evaluated at step " + state.step + ".")); return; }
  const facts = el("dl", {class: "facts"});
  const fact = (name, value, cls) => facts.append(el("dt", {}, name), el("dd", cls ? {class: cls} : {}, value));
  fact("verdict", verdict(row) + (row[5] ? " (note: " + row[5] + ")" : ""), "cat-" + row[1]);
  fact("extracted answer", row[4] === null ? "(no complete <answer> tag)" : row[4]);
  fact("ground truth", p[4]);
  fact("response", row[6] + " tokens, finish reason " + row[7]);
  box.append(facts, el("h4", {}, "Prompt"), el("pre", {class: "prompt"}, p[3]),
             el("h4", {}, "Response"), el("pre", {class: "response"}, row[3]));
}

function setup() {
  if (!DATA.series.length) { $("shown-count").textContent = "No samples in this store."; return; }
  options($("series-select"), DATA.series.map((_, i) => String(i)), (i) => DATA.series[i].label);
  for (const category of ["all", ...DATA.categories]) {
    const button = el("button", {"data-category": category}, category === "all" ? "all" : LABELS[category]);
    button.addEventListener("click", () => {
      state.category = category;
      if (category !== "format_failure") { state.failure = "all"; $("failure-select").value = "all"; }
      state.page = 0; draw(); });
    $("category-filter").append(button);
  }
  options($("failure-select"), ["all", ...DATA.failure_types]);
  const on = (id, key, after) => $(id).addEventListener("change", (event) => {
    state[key] = key === "series" || key === "step" ? Number(event.target.value) : event.target.value;
    state.page = 0; if (after) after(); draw(); });
  on("series-select", "series", setupSeries);
  on("step-select", "step");
  on("failure-select", "failure", () => { if (state.failure !== "all") state.category = "format_failure"; });
  on("subject-select", "subject");
  on("level-select", "level");
  $("prev-page").addEventListener("click", () => { state.page -= 1; draw(); });
  $("next-page").addEventListener("click", () => { state.page += 1; draw(); });
  setupSeries();
  draw();
}
setup();
"""


if __name__ == "__main__":
    sys.exit(main())
