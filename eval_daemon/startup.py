"""What `bin/eval` does before its first evaluation: check that the store can be written, remove
what a killed attempt left, and complete what a kill between the store commit and the end of the
recording left undone.

- check_store: paths.results_dir must exist (a mistyped path is an error, not a new empty tree
  watched forever; only the default `results/` is created) and the store file must be creatable
  and writable there, before any model is loaded or any evaluation spent.
- clean_leftovers: temporaries (.tmp-*) of dead writers and the uncommitted eval log files of a dead
  attempt (eval_daemon/records.py names them) are deleted; uncommitted files whose evaluation
  is in the store (a kill just after the commit) get their committed names.
- reconcile: every stored evaluation whose run directory is still there gets its retention marker,
  and every successful one whose metrics never reached W&B / eval_metrics.jsonl (tracked_at is
  NULL) is logged, then marked, so each is sent once.
Only what a dead writer left is touched: this worker id, or hostname-PID of this host with PID gone.
Used by eval_daemon/__main__.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from pathlib import Path

from common.config import ConfigError, PathsConfig
from common.contract import MANIFEST_NAME, MARKER_DIR, Layout, marker_path, step_dir_name
from common.durable import TEMP_PREFIX
from common.store.writer import committed_evaluations, mark_tracked
from eval_daemon.records import UNCOMMITTED, commit_eval_files, committed_name, write_marker

logger = logging.getLogger(__name__)

TEMP_MIN_AGE_S = 60.0  # an atomic write's temporary lives well under a second; older ones of dead PIDs are junk


def check_store(layout: Layout) -> None:
    """ConfigError naming the fix when the store cannot be created or written. The default results
    root (`results/`, which cannot be mistyped) is created when missing; any other must exist."""
    root, store = layout.root, layout.store
    if not root.is_dir() and str(root) == PathsConfig.results_dir and not root.exists():
        root.mkdir()
        logger.info("created the results root %s (the default paths.results_dir)", root)
    if not root.is_dir():
        raise ConfigError(f"paths.results_dir {root} does not exist; create it (mkdir -p {root}) or fix the path "
                          f"(bin/train creates it with its first checkpoint)")
    if store.exists() and not store.is_file():
        raise ConfigError(f"the results store {store} is not a regular file; move it aside or set paths.results_dir")
    probe = root / f"{TEMP_PREFIX}write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")  # the store's directory must take new files (DuckDB writes a .wal beside it)
        probe.unlink()
        if store.exists():
            with open(store, "r+b"):
                pass
    except OSError as exc:
        raise ConfigError(f"the results store {store} cannot be written ({exc.strerror}); fix the permissions "
                          f"or set paths.results_dir to a writable directory") from exc


def writer_is_gone(writer: str, own_worker_id: str) -> bool:
    """True when `writer` (a worker id, or a PID) is this worker or a dead process of this host."""
    if writer == own_worker_id:
        return True
    host, _, pid = writer.rpartition("-")
    if host and host != socket.gethostname():
        return False
    return pid.isdigit() and not _pid_alive(int(pid))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def clean_leftovers(layout: Layout, worker_id: str, committed: set[tuple[str, int, str, str]]) -> list[Path]:
    """Delete dead writers' temporaries and uncommitted eval logs; rename committed ones. Returns the deleted."""
    deleted = []
    now = time.time()
    folders = [layout.eval_logs, layout.analysis, *layout.checkpoints.glob(f"*/{MARKER_DIR}")]
    for folder in folders:
        for path in folder.glob(f"{TEMP_PREFIX}*") if folder.is_dir() else ():
            pid = path.name.rsplit("-", 1)[-1]
            if path.is_file() and pid.isdigit() and not _pid_alive(int(pid)) and now - path.stat().st_mtime > TEMP_MIN_AGE_S:
                path.unlink(missing_ok=True)
                deleted.append(path)
    for summary in sorted(layout.eval_logs.glob(f"summary_eval_step_*{UNCOMMITTED}.json")) if layout.eval_logs.is_dir() else ():
        match = _UNCOMMITTED_SUMMARY.fullmatch(summary.name)
        writer = match.group(1) if match else ""
        log = summary.with_name(summary.name.replace("summary_eval_step_", "eval_step_", 1)[: -len(".json")] + ".jsonl")
        key = _summary_key(summary)
        if key is not None and key in committed:
            commit_eval_files([p for p in (log, summary) if p.exists()])
            logger.info("eval log %s belongs to a stored evaluation: renamed to %s", log.name, committed_name(log).name)
        elif writer_is_gone(writer, worker_id):
            for path in (log, summary):
                if path.exists():
                    path.unlink()
                    deleted.append(path)
    if deleted:
        logger.info("removed %d file(s) left by killed evaluation attempts (temporaries, uncommitted eval logs)",
                    len(deleted))
    return deleted


_UNCOMMITTED_SUMMARY = re.compile(rf"summary_eval_step_\d+_\w+\.(.+){re.escape(UNCOMMITTED)}\.json")


def _summary_key(summary: Path) -> tuple[str, int, str, str] | None:
    try:
        data = json.loads(summary.read_text())
        return str(data["run_id"]), int(data["step"]), str(data["eval_key"]), str(data["started_at"])
    except (OSError, ValueError, KeyError, TypeError):  # torn or foreign: treated as not committed
        return None


def reconcile(layout: Layout, worker_id: str, log_metrics) -> dict[str, int]:
    """Markers and metrics records of stored evaluations that a kill cut short; returns the counts."""
    rows = committed_evaluations(layout.store)
    committed = {(r["run_id"], r["step"], r["eval_key"], _iso(r["started_at"])) for r in rows}
    clean_leftovers(layout, worker_id, committed)
    counts = {"markers": 0, "metrics": 0}
    for row in rows:
        run_dir = Path(row["checkpoint_path"] or "").parent
        step_dir = run_dir / step_dir_name(row["step"])
        if (run_dir / MANIFEST_NAME).is_file() and step_dir.is_dir() \
                and not marker_path(run_dir, row["step"], row["eval_key"]).exists():
            counts["markers"] += write_marker(run_dir, row["step"], row["eval_key"], row["status"], row["worker_id"])
        if row["status"] == "ok" and row["tracked_at"] is None and writer_is_gone(row["worker_id"] or "", worker_id):
            log_metrics(row)
            mark_tracked(layout.store, row["run_id"], row["step"], row["eval_key"])
            counts["metrics"] += 1
    if any(counts.values()):
        logger.warning("completed %d marker(s) and %d metrics record(s) of evaluations stored before a crash",
                       counts["markers"], counts["metrics"])
    return counts


def _iso(value) -> str:
    """A stored TIMESTAMP as the ISO text the eval files carry (common.contract.now_iso: ms and Z)."""
    if value is None:
        return ""
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
