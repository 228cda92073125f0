"""How long the eval daemon holds the results store per evaluation, and what readers wait meanwhile.

    PYTHONPATH=. .venv/bin/python bench/store_commit.py [--samples 5000] [--evaluations 8]

Prints a table: record_evaluation wall time (open + insert + commit + close) for a 5,000-sample
evaluation into a new and into a growing store, the executemany alternative it replaced, and
reader latency (in-process reads and real `python -m common.store.query` runs) while another process
commits evaluations back to back.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from store_fixtures import summarise, synthetic_samples  # noqa: E402

from common.store import schema, writer  # noqa: E402


def evaluation(run_id: str, step: int, n: int) -> tuple[dict, list[dict]]:
    samples = synthetic_samples(run_id, step, n, entropy_sample=256)
    return summarise(run_id, step, samples), samples


def time_commits(db: Path, n_samples: int, count: int) -> list[float]:
    times = []
    for index in range(count):
        ev, samples = evaluation("bench", index * 50, n_samples)
        start = time.perf_counter()
        assert writer.record_evaluation(db, ev, samples)
        times.append(time.perf_counter() - start)
    return times


def time_executemany(db: Path, n_samples: int) -> float:
    """The alternative: one parameterised INSERT per row, in one transaction."""
    ev, samples = evaluation("bench_executemany", 0, n_samples)
    # A failed record creates the schema without adding samples.
    writer.record_failed_evaluation(db, {k: ev[k] for k in ("run_id", "step", "eval_key", "eval_set")}, "schema only")
    columns = list(schema.SAMPLE_COLUMNS)
    rows = [[ev["run_id"], ev["step"], ev["eval_key"], *(s.get(c) for c in columns)] for s in samples]
    con = duckdb.connect(str(db))
    start = time.perf_counter()
    con.begin()
    con.executemany(f"INSERT INTO samples (run_id, step, eval_key, {', '.join(columns)}) "
                    f"VALUES ({', '.join('?' for _ in range(len(columns) + 3))})", rows)
    con.commit()
    con.close()
    return time.perf_counter() - start


def _writer(db: str, n_samples: int, count: int, started) -> None:
    started.set()
    for index in range(count):
        ev, samples = evaluation("writer", index + 1, n_samples)
        writer.record_evaluation(db, ev, samples)


def reader_latency(db: Path, n_samples: int, count: int) -> tuple[list[float], list[float], float]:
    """Latency of in-process reads and of `python -m common.store.query` runs while a writer commits."""
    time_commits(db, n_samples, 1)  # the file exists before the first read
    started = multiprocessing.Event()
    writer = multiprocessing.Process(target=_writer, args=(str(db), n_samples, count, started))
    writer.start()
    started.wait()
    begin = time.perf_counter()
    reads, cli = [], []
    while writer.is_alive():
        start = time.perf_counter()
        with schema.connect_read_only(db) as con:
            con.execute("SELECT count(*) FROM progress").fetchall()
        reads.append(time.perf_counter() - start)
        if len(reads) % 10 == 0:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "common.store.query", "--db", str(db), "progress"], check=True,
                           capture_output=True, cwd=REPO_ROOT)
            cli.append(time.perf_counter() - start)
    writer.join()
    return reads, cli, time.perf_counter() - begin


def cli_idle(db: Path, repeats: int = 5) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "common.store.query", "--db", str(db), "progress"], check=True,
                       capture_output=True, cwd=REPO_ROOT)
        times.append(time.perf_counter() - start)
    return times


def row(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    p95 = sorted(ms)[max(0, int(round(0.95 * len(ms))) - 1)]
    return f"{name:58s} {len(ms):5d} {statistics.median(ms):9.1f} {p95:9.1f} {max(ms):9.1f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--evaluations", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cold = time_commits(tmp / "cold.duckdb", args.samples, 1)  # includes importing and warming up Arrow
        first = time_commits(tmp / "new.duckdb", args.samples, 1)
        growing = time_commits(tmp / "growing.duckdb", args.samples, args.evaluations)
        size_mb = (tmp / "growing.duckdb").stat().st_size / 2**20
        slow = time_executemany(tmp / "executemany.duckdb", args.samples)
        idle_cli = cli_idle(tmp / "growing.duckdb")
        reads, cli, elapsed = reader_latency(tmp / "contended.duckdb", args.samples, args.evaluations)
    n = args.samples
    print(f"{'measurement (milliseconds)':58s} {'n':>5s} {'median':>9s} {'p95':>9s} {'max':>9s}")
    print(row(f"record_evaluation, {n} samples, new store, first in process", cold))
    print(row(f"record_evaluation, {n} samples, new store", first))
    print(row(f"record_evaluation, {n} samples, store growing to {args.evaluations * n} rows", growing))
    print(row(f"executemany INSERT of {n} samples (not used)", [slow]))
    print(row("python -m common.store.query progress, store idle", idle_cli))
    print(row("read-only open + query + close, writer committing", reads))
    print(row("python -m common.store.query progress, writer committing", cli))
    print(f"\nstore size after {args.evaluations} evaluations of {n} samples: {size_mb:.1f} MiB; "
          f"contended phase: {args.evaluations} commits in {elapsed:.1f} s, {len(reads)} reads, none failed")


if __name__ == "__main__":
    main()
