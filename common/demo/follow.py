"""Turn the two daemons' structured outputs into a few readable progress lines for `bin/demo`.

Not run on its own: `bin/demo` (`python -m common.demo.run`) uses it.

The demo reads what the daemons write for every reader, never the wording of their log messages:
- the trainer's `runs/<run>/train_log.jsonl`: the loss every logging.log_every steps;
- the run's manifest (`checkpoints/<run>/manifest.json`, common/contract.py): each published checkpoint;
- the eval daemon's `eval_logs/summary_eval_step_<N>_<ts>.json` (one per evaluation, written
  atomically, naming its run_id, unlike `eval_logs/eval_metrics.jsonl`, whose records carry only the
  step): each evaluation result.
Each daemon's own log (results/demo/logs/) stays in its file; only its WARNING and ERROR records
reach the terminal, picked by the level field of the daemons' log format.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from common.contract import Layout, ManifestError, read_manifest

# The level field of the daemons' log format (logging.basicConfig in their entry points).
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d (?P<time>\d\d:\d\d:\d\d),\d+ (?P<level>[A-Z]+) (?P<name>[\w.]+): (?P<message>.*)$")
OWN_LOGGERS = ("train_daemon", "eval_daemon", "common")
SHOWN_LEVELS = ("WARNING", "ERROR", "CRITICAL")


def problem_record(line: str) -> str | None:
    """'06:05:45 WARNING <message>' for a WARNING or ERROR record of our own loggers, else None."""
    match = LOG_RECORD.match(line)
    if match is None or match["level"] not in SHOWN_LEVELS or not match["name"].startswith(OWN_LOGGERS):
        return None
    return f"{match['time']} {match['level']} {match['message']}"


class LineFollower:
    """Reads the complete lines appended to a file since the last call (the file may not exist yet)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        # tqdm redraws with \r; a line is complete only once its \n arrived.
        *lines, self._partial = (self._partial + data).replace(b"\r", b"\n").split(b"\n")
        return [line.decode("utf-8", "replace") for line in lines if line.strip()]


def loss_line(record_text: str, total_steps: int) -> str | None:
    """'step 20/150  loss 1.234  lr 2.00e-03' from one train_log.jsonl line (None if unreadable)."""
    try:
        record = json.loads(record_text)
        step, loss = int(record["train_step"]), float(record["train/loss"])
    except (ValueError, KeyError, TypeError):  # a line cut short by a crash: skip it
        return None
    rate = record.get("train/learning_rate")
    text = f"step {step}/{total_steps}  loss {loss:.3f}"
    return text + (f"  lr {rate:.2e}" if isinstance(rate, (int, float)) else "")


def result_line(summary: dict) -> str:
    """'step 100: accuracy 45.0%, format 100.0% (n=140); generation 1.2 s' from an eval summary."""
    accuracy, format_accuracy = summary.get("accuracy") or 0.0, summary.get("format_accuracy") or 0.0
    return (f"step {summary['eval_step']}: accuracy {accuracy:.1%}, format {format_accuracy:.1%} "
            f"(n={summary.get('num_test_cases')}); generation {summary.get('generation_seconds', 0.0):.1f} s")


class Progress:
    """Prints what is new in the run's train_log.jsonl, manifest and eval summaries, and the daemons'
    WARNING and ERROR records."""

    def __init__(self, layout: Layout, logs_dir: Path, run_id: str, total_steps: int) -> None:
        self.logs = {"train": logs_dir / f"train-{run_id}.log", "eval": logs_dir / f"eval-{run_id}.log"}
        self._run_id, self._total_steps, self._layout = run_id, total_steps, layout
        self._followers = {name: LineFollower(path) for name, path in self.logs.items()}
        self._train_log = LineFollower(layout.train_log(run_id))
        self._published: set[int] = set()
        self._summaries_seen: set[Path] = set()

    def print_new(self) -> tuple[bool, bool]:
        """Print the new lines; returns (anything new at all, a new evaluation result of this run)."""
        active = False
        for name, follower in self._followers.items():
            for line in follower.new_lines():
                active = True
                text = problem_record(line)
                if text is not None:  # never cut: a warning is read in full
                    self._say(name, text)
        for record in self._train_log.new_lines():
            active = True
            text = loss_line(record, self._total_steps)
            if text is not None:
                self._say("train", text)
        published = self._new_published()
        results = self._new_results()
        return active or published or results, results

    def _new_published(self) -> bool:
        try:
            manifest = read_manifest(self._layout.run_checkpoints(self._run_id))
        except ManifestError:  # not written yet (or mid-replace on a filesystem without atomic rename)
            return False
        entries = [entry for entry in manifest.checkpoints if entry.step not in self._published]
        for entry in entries:
            self._published.add(entry.step)
            self._say("train", f"published step {entry.step} ({entry.path})")
        return bool(entries)

    def _new_results(self) -> bool:
        new = False
        for path in sorted(self._layout.eval_logs.glob("summary_eval_step_*.json")):
            if path in self._summaries_seen:
                continue
            self._summaries_seen.add(path)
            try:
                summary = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):  # written by temp file + rename: only a foreign file fails
                continue
            if summary.get("run_id") == self._run_id:
                self._say("eval", result_line(summary))
                new = True
        return new

    def _say(self, name: str, text: str) -> None:
        print(f"[{name:5}] {text}", flush=True)
