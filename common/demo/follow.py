"""Turn the two daemons' output into a few readable progress lines for `bin/demo`.

Not run on its own: `bin/demo` (`python -m common.demo.run`) uses it.

Each daemon writes everything to its own log file (results/demo/logs/); the terminal gets only
the lines a newcomer needs: training loss every logging.log_every steps (from the trainer's
train_log.jsonl), each published checkpoint, each evaluation result, and every WARNING or ERROR
of the product's own loggers. vLLM's start-up chatter stays in the log file.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

# The daemons' log format (logging.basicConfig in their entry points).
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d (?P<time>\d\d:\d\d:\d\d),\d+ (?P<level>[A-Z]+) (?P<name>[\w.]+): (?P<message>.*)$")
OWN_LOGGERS = ("train_daemon", "eval_daemon", "common")
# INFO lines worth a newcomer's attention: (logger, message start).
SHOWN_INFO = [
    ("train_daemon", re.compile(r"run \S+: (starting|resuming)|run \S+ done at step|stopped at step")),
    ("train_daemon.publisher", re.compile(r"published step")),
    ("eval_daemon", re.compile(r"eval worker|run \S+ step \d+: accuracy|all published checkpoints are evaluated")),
]


def shown(line: str, width: int = 150) -> str | None:
    """The terminal form of one daemon log line, or None when it stays in the log file only.
    INFO lines are cut to `width` characters; WARNING and ERROR lines never are."""
    match = LOG_LINE.match(line)
    if match is None:
        return None
    level, name, message = match["level"], match["name"], match["message"]
    if not name.startswith(OWN_LOGGERS):
        return None
    if level in ("WARNING", "ERROR", "CRITICAL"):
        return f"{match['time']} {level} {message}"
    if level == "INFO" and any(name == logger and pattern.match(message) for logger, pattern in SHOWN_INFO):
        text = f"{match['time']} {message}"
        return text if len(text) <= width else text[: width - 3] + "..."
    return None


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


class Progress:
    """Prints what is new in both daemons' logs and in the trainer's train_log.jsonl."""

    def __init__(self, logs_dir: Path, train_log: Path, run_id: str, total_steps: int) -> None:
        self.logs = {"train": logs_dir / f"train-{run_id}.log", "eval": logs_dir / f"eval-{run_id}.log"}
        self._followers = {name: LineFollower(path) for name, path in self.logs.items()}
        self._metrics = LineFollower(train_log)
        self._total_steps = total_steps
        self._width = shutil.get_terminal_size((150, 24)).columns - 8  # minus the "[train] " prefix

    def print_new(self) -> tuple[bool, bool]:
        """Print the new lines; returns (anything new at all, a new evaluation result)."""
        active = new_result = False
        for name, follower in self._followers.items():
            for line in follower.new_lines():
                active = True
                text = shown(line, self._width)
                if text is not None:
                    print(f"[{name:5}] {text}", flush=True)
                    new_result |= name == "eval" and ": accuracy" in text
        for record in self._metrics.new_lines():
            active = True
            text = loss_line(record, self._total_steps)
            if text is not None:
                print(f"[train] {text}", flush=True)
        return active, new_result
