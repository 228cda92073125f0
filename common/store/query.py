"""bin/query: run read-only SQL, or one of the store's views by name, and print the result.

    bin/query progress                                   # a view by name
    bin/query "SELECT run_id, max(accuracy) FROM progress GROUP BY run_id"
    bin/query --format csv by_subject > by_subject.csv   # csv | json | table (default)
    bin/query --list                                     # the views, one line each
    bin/query compare run_a:250 run_a:300 [--flips]      # paired: difference, McNemar, flips (common/store/compare.py)

Safe while the eval daemon writes: the store is opened read-only, and a busy file is retried
(common.store), so a query waits at most a moment and sees whole evaluations only.
Exit codes: 0 ok, 2 bad SQL / refused statement / no store / unknown view, 1 store busy too long
or stdout closed before everything was printed (`bin/query ... | head -1`: no traceback, no message).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import decimal
import io
import json
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import duckdb

from common.cli import USAGE_EXIT_CODE, ToolParser, fail
from common.config import PathsConfig
from common.contract import Layout
from common.store.compare import CompareError, compare
from common.store.schema import VIEWS, StoreBusyError, StoreError, connect_read_only, one_line_error

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DB = Layout(REPO_ROOT / PathsConfig().results_dir).store  # what bin/eval writes by default
BUSY_EXIT_CODE = 1
BROKEN_PIPE_EXIT_CODE = 1  # the reader closed stdout early (`| head`); the output is cut short

# Statement types that cannot change the store; everything else is refused before it runs.
READ_ONLY_TYPES = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN, duckdb.StatementType.PRAGMA,
                   duckdb.StatementType.CALL, duckdb.StatementType.SET, duckdb.StatementType.VARIABLE_SET}


class QueryError(ValueError):
    """A query bin/query will not run (one-line message)."""


# ---- what to run ---------------------------------------------------------------------------------


def resolve_sql(text: str) -> str:
    """A lone name (a view such as `progress`, or a table) means SELECT * FROM it."""
    name = text.strip().rstrip(";").strip()
    if re.fullmatch(r"[A-Za-z_]\w*", name):
        return f"SELECT * FROM {name}"
    return text


def check_read_only(sql: str) -> None:
    """Refuse statements that would write (the store is read-only anyway; this says why clearly)."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(one_line_error(exc)) from None
    if not statements:
        raise QueryError("no SQL statement given")
    for statement in statements:
        if statement.type not in READ_ONLY_TYPES:
            kind = statement_name(statement)
            hint = "; to export, use --format csv > file.csv" if kind.startswith(("COPY", "EXPORT")) else ""
            raise QueryError(f"bin/query is read-only: {kind} statements are refused "
                             f"(the eval daemon is the store's only writer){hint}")


def statement_name(statement: duckdb.Statement) -> str:
    """The statement's SQL keyword: DuckDB files INSTALL (and FORCE INSTALL) under its LOAD type."""
    if statement.type == duckdb.StatementType.LOAD:
        words = statement.query.upper().split()
        return " ".join(words[:2]) if words[:1] == ["FORCE"] else words[0]
    return statement.type.name.replace("_", " ")


def run_query(db_path: Path, sql: str) -> tuple[list[str], list[tuple]]:
    """Run every statement in `sql`; return the columns and rows of the last one."""
    check_read_only(sql)
    with connect_read_only(db_path) as con:
        try:
            result = con.execute(sql)
            if result.description is None:  # e.g. SET: nothing to print
                return [], []
            return [column[0] for column in result.description], result.fetchall()
        except duckdb.Error as exc:
            if "read-only mode" in str(exc):
                raise QueryError("bin/query is read-only: statements that write are refused "
                                 "(the eval daemon is the store's only writer)") from None
            raise QueryError(one_line_error(exc)) from None


# ---- output --------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A JSON-friendly version of a DuckDB value."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (datetime.date, datetime.datetime, datetime.time)):
        return value.isoformat()
    if isinstance(value, (datetime.timedelta, decimal.Decimal)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def format_cell(value: Any, max_width: int) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        if math.isfinite(value) and 0 < abs(value) < 5e-5:  # a McNemar p of 1e-7 is not "0"
            return f"{value:.2e}"
        text = f"{value:.4f}".rstrip("0").rstrip(".") if math.isfinite(value) else str(value)
        return "0" if text == "-0" else text
    if isinstance(value, (list, dict)):
        text = json.dumps(_plain(value))
    else:
        text = str(_plain(value))
    # One line per row: long responses would otherwise wreck the alignment.
    text = text.replace("\r", "").replace("\n", "\\n")
    return text if max_width == 0 or len(text) <= max_width else text[: max_width - 3] + "..."


def format_table(columns: Sequence[str], rows: Sequence[tuple], max_width: int = 60) -> str:
    cells = [[format_cell(value, max_width) for value in row] for row in rows]
    numeric = [all(isinstance(row[i], (int, float)) and not isinstance(row[i], bool) or row[i] is None
                   for row in rows) for i in range(len(columns))]
    widths = [max([len(name)] + [len(row[i]) for row in cells]) for i, name in enumerate(columns)]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    lines = [line(columns), "  ".join("-" * w for w in widths)]
    lines += [line(row) for row in cells]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


def format_csv(columns: Sequence[str], rows: Sequence[tuple]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if v is None else json.dumps(_plain(v)) if isinstance(v, (list, dict)) else _plain(v)
                         for v in row])
    return out.getvalue().rstrip("\n")


def format_json(columns: Sequence[str], rows: Sequence[tuple]) -> str:
    return json.dumps([{name: _plain(value) for name, value in zip(columns, row)} for row in rows], indent=1)


def print_stdout(text: str) -> bool:
    """Print text to stdout; False when the reader closed the pipe early (`bin/query ... | head -1`).

    Flushed here, so a closed pipe is caught here and not at interpreter exit ("Exception ignored
    ... BrokenPipeError"); then stdout points at /dev/null, so the final flush at exit is quiet too.
    Shared by bin/query and bin/plot."""
    try:
        print(text, flush=True)
        return True
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return False


def report_error(tool: str, exc: Exception) -> int:
    """Print a tool's one-line error; its exit code: 1 for a store that stayed busy, else 2. Shared by
    bin/query and bin/regrade."""
    return fail(tool, exc, BUSY_EXIT_CODE if isinstance(exc, StoreBusyError) else USAGE_EXIT_CODE)


def list_views() -> str:
    width = max(len(name) for name in VIEWS)
    return "\n".join(f"{name.ljust(width)}  {description}" for name, (description, _) in VIEWS.items())


# ---- entry point ---------------------------------------------------------------------------------


EPILOG = """examples:
  bin/query progress                                   # a view by name (bin/query --list names them)
  bin/query "SELECT run_id, max(accuracy) FROM progress GROUP BY run_id"
  bin/query --format csv by_subject > by_subject.csv
  bin/query --max-width 0 "SELECT response FROM samples LIMIT 1"   # whole cells
  bin/query compare run_a:100 run_a:200 --flips         # what changed between two evaluations

Only statements that read run: INSERT, COPY, INSTALL, ATTACH, ... are refused (the eval daemon is
the store's only writer). SQL examples: README.md, section "Ready SQL".

exit codes:
  0  ok
  1  the store stayed busy for 30 s, or stdout was closed early (`| head`): the output is cut short
  2  bad SQL, a refused statement, no store at --db, an unknown view, a bad argument"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ToolParser("query", description="Read-only SQL on the results store (safe while bin/eval writes it).",
                        epilog=EPILOG)
    parser.add_argument("sql", nargs="?", help="a SQL statement, or the name of a view (see --list), or compare")
    parser.add_argument("refs", nargs="*", metavar="RUN:STEP", help="with compare: the evaluations before and after")
    parser.add_argument("--flips", action="store_true", help="with compare: list every problem that flipped")
    parser.add_argument("--db", type=Path, default=DEFAULT_DB, help="store file (default: %(default)s)")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table",
                        help="table: aligned columns for reading (default); csv: RFC 4180 with a header row; "
                             "json: one array of {column: value} objects")
    parser.add_argument("--max-width", type=int, default=60, metavar="N",
                        help="table format: cut cells longer than N characters, marking the cut with ... "
                             "(default %(default)s; 0: never cut); csv and json are never cut")
    parser.add_argument("--list", action="store_true", help="list the views with one line each")
    args = parser.parse_args(argv)
    if not args.list and not args.sql:
        parser.error("give a SQL statement or a view name, or --list")
    if args.max_width < 0 or 0 < args.max_width < 4:
        parser.error(f"--max-width {args.max_width}: give 0 (never cut) or at least 4 (room for the ...)")
    if args.sql == "compare" and len(args.refs) != 2:
        parser.error("compare takes two evaluations: bin/query compare RUN:STEP RUN:STEP")
    if args.sql != "compare" and (args.refs or args.flips):
        parser.error("give the SQL as one quoted argument; RUN:STEP arguments and --flips go with compare")
    return args


def print_comparison(db_path: Path, args: argparse.Namespace) -> bool:
    """bin/query compare: summary, flips by subject and by level (and each flip with --flips);
    warnings (one line each) on stderr. False when stdout was closed early."""
    with connect_read_only(db_path) as con:
        try:
            result = compare(con, *args.refs)
        except duckdb.CatalogException:  # a store of an older version, before the eval daemon migrated it
            raise QueryError(f"{db_path} predates bin/query compare (no problem_outcomes view); the eval daemon's "
                             f"next evaluation upgrades it, or copy it and record into the copy") from None
    for warning in result.warnings:
        print(f"query: warning: {warning}", file=sys.stderr)
    sections = {"summary": [result.summary], "by_subject": result.by_subject, "by_level": result.by_level}
    if args.flips:
        sections["flips"] = result.flips
    if args.format == "json":
        return print_stdout(json.dumps({name: [_plain(row) for row in rows] for name, rows in sections.items()}, indent=1))
    blocks = []
    for name, rows in sections.items():
        columns = list(rows[0]) if rows else ["problem_id"]
        values = [tuple(row.values()) for row in rows]
        body = format_csv(columns, values) if args.format == "csv" else format_table(columns, values, args.max_width)
        blocks.append(f"{name}\n{body}")
    return print_stdout("\n\n".join(blocks))


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="bin/query: %(message)s")
    args = parse_args(argv)
    if args.list:
        return 0 if print_stdout(list_views()) else BROKEN_PIPE_EXIT_CODE
    try:
        if args.sql == "compare":
            return 0 if print_comparison(args.db, args) else BROKEN_PIPE_EXIT_CODE
        columns, rows = run_query(args.db, resolve_sql(args.sql))
    except (QueryError, StoreError, CompareError) as exc:
        return report_error("query", exc)
    if columns:
        formatters = {"table": lambda: format_table(columns, rows, args.max_width),
                      "csv": lambda: format_csv(columns, rows), "json": lambda: format_json(columns, rows)}
        if not print_stdout(formatters[args.format]()):
            return BROKEN_PIPE_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
