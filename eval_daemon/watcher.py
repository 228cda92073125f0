"""Watch the checkpoints root for manifest updates and wake the eval loop.

The trainer publishes a checkpoint by renaming a complete step directory into place and then
replacing `<run>/manifest.json` (common/contract.py). So the only event that means "new work"
is manifest.json appearing under its final name: a move (os.replace of the temp file), or a create
/ close-after-write from a writer that does not use the contract's atomic replace. Step directories
are never a trigger: they may still be being written. Events can be lost (inotify queue overflow,
network filesystems), so the loop also rescans every `evaluation.reconcile_interval_s` seconds.

Used by `bin/eval` (eval_daemon/__main__.py).
"""

from __future__ import annotations

import logging
import queue
import time
from pathlib import Path
from typing import Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from common.contract import MANIFEST_NAME

logger = logging.getLogger(__name__)

class ManifestHandler(FileSystemEventHandler):
    """Puts the run directory of each replaced manifest.json into a thread-safe queue."""

    def __init__(self, wakeups: queue.Queue) -> None:
        self.wakeups = wakeups

    def on_moved(self, event: FileSystemEvent) -> None:
        self._notify(event, str(event.dest_path))

    def on_created(self, event: FileSystemEvent) -> None:
        self._notify(event, str(event.src_path))

    def on_closed(self, event: FileSystemEvent) -> None:
        self._notify(event, str(event.src_path))

    def _notify(self, event: FileSystemEvent, path: str) -> None:
        if event.is_directory or Path(path).name != MANIFEST_NAME:
            return
        logger.debug("manifest event %s for %s", event.event_type, path)
        self.wakeups.put(Path(path).parent)


def start_observer(checkpoints_root: Path, wakeups: queue.Queue, polling: bool):
    """Start watching (recursively) before the first scan, so nothing published in between is missed."""
    Path(checkpoints_root).mkdir(parents=True, exist_ok=True)
    observer = PollingObserver(timeout=1.0) if polling else Observer()
    observer.schedule(ManifestHandler(wakeups), str(checkpoints_root), recursive=True)
    observer.start()
    logger.info("watching %s (%s)", checkpoints_root, type(observer).__name__)
    return observer


def stop_observer(observer) -> None:
    observer.stop()
    observer.join(timeout=10)


def wait_for_change(wakeups: queue.Queue, timeout_s: float, stop_requested: Callable[[], bool]) -> str:
    """Block until a manifest event, a stop request or the reconcile timeout; drain what queued up.

    Returns "stop", "event" or "reconcile". Either way the caller rescans every run (a few small
    JSON reads), which also covers events that were coalesced or lost. The stop flag is polled
    (every 0.5 s) rather than queued: a signal handler must not take the queue's lock.
    """
    deadline = time.monotonic() + timeout_s
    while not stop_requested():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "reconcile"
        try:
            wakeups.get(timeout=min(remaining, 0.5))
        except queue.Empty:
            continue
        while True:
            try:
                wakeups.get_nowait()
            except queue.Empty:
                return "event"
    return "stop"
