"""Which published checkpoints still need an evaluation, and in which order.

Pending work = checkpoints listed in the runs' manifests (common.checkpoints is the contract) minus
those the store has already recorded for this eval key. Used by `bin/eval` (eval_daemon/__main__.py).

Orders (`evaluation.schedule`):
- in_order: (run_id, step) ascending, so every checkpoint of a run is evaluated in step order.
- latest:   the newest pending step of each run first (newest publication first), then the gaps
            in (run_id, step) order. The pending list is recomputed after every evaluation, so a
            newly published checkpoint jumps the queue and the gaps are filled when idle.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.checkpoints import MANIFEST_NAME, TEMP_PREFIX, ManifestError, read_manifest, read_sidecar

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    run_id: str
    step: int
    path: Path  # the step directory (a complete Hugging Face model directory)
    run_dir: Path | None  # None for a model given with --checkpoint that is not part of a run
    published_at: str = ""
    metrics: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


class WarnOnce:
    """Logs each distinct warning once, so a bad file seen on every rescan is not a flood."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, message: str) -> None:
        if message not in self._seen:
            self._seen.add(message)
            logger.warning("%s", message)


def scan_published(checkpoints_root: Path, warn: WarnOnce) -> list[Checkpoint]:
    """Every checkpoint listed in a readable manifest under the root; bad entries are warned about once."""
    root = Path(checkpoints_root)
    if not root.is_dir():
        return []
    found = []
    for child in sorted(root.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue  # dot-prefixed names are temporaries by contract; plain files are not runs
        if not (child / MANIFEST_NAME).exists():
            if any(not entry.name.startswith(TEMP_PREFIX) for entry in child.iterdir()):
                warn(f"ignoring {child}: no {MANIFEST_NAME}, not a run directory")
            # else: a run whose first checkpoint is still being written (only temporaries): not an error
            continue
        found.extend(_run_checkpoints(child, warn))
    return found


def _run_checkpoints(run_dir: Path, warn: WarnOnce) -> list[Checkpoint]:
    try:
        manifest = read_manifest(run_dir)
    except ManifestError as exc:
        # The daemon keeps serving the other runs; a later valid rewrite is picked up on its event.
        warn(f"ignoring run {run_dir.name}: {exc}")
        return []
    checkpoints = []
    for entry in manifest.checkpoints:
        path = run_dir / entry.path
        if entry.path.startswith(TEMP_PREFIX) or not path.is_dir():
            warn(f"ignoring step {entry.step} of run {manifest.run_id}: {path} is listed in the manifest but missing")
            continue
        checkpoints.append(Checkpoint(run_id=manifest.run_id, step=entry.step, path=path, run_dir=run_dir,
                                      published_at=entry.published_at, metrics=entry.metrics))
    return checkpoints


def pending(published: list[Checkpoint], recorded: set[tuple[str, int, str]], eval_key: str,
            schedule: str) -> list[Checkpoint]:
    """Checkpoints without a record for eval_key, in the order they should be evaluated."""
    todo = sorted((c for c in published if (c.run_id, c.step, eval_key) not in recorded),
                  key=lambda c: (c.run_id, c.step))
    if schedule == "in_order":
        return todo
    if schedule != "latest":
        raise ValueError(f"unknown schedule {schedule!r}")
    newest: dict[str, Checkpoint] = {}
    for checkpoint in todo:
        newest[checkpoint.run_id] = checkpoint  # ascending steps: the last one wins
    heads = sorted(newest.values(), key=lambda c: (c.published_at, c.step), reverse=True)
    return heads + [c for c in todo if c not in heads]


def checkpoint_from_argument(model: str) -> Checkpoint:
    """The Checkpoint for `--checkpoint PATH_OR_HUB_ID`.

    A published step directory keeps its run id and step (from its checkpoint.json sidecar; the
    marker is written when its run directory has a manifest). Any other model directory or hub id
    (e.g. the base model) is recorded as run_id = its directory name or hub id, step 0.
    """
    path = Path(model).expanduser()
    if not path.is_dir():
        return Checkpoint(run_id=model, step=0, path=Path(model), run_dir=None)
    try:
        sidecar = read_sidecar(path)
        run_id, step = str(sidecar["run_id"]), int(sidecar["step"])
    except (ManifestError, KeyError, TypeError, ValueError):  # not a published checkpoint: an external model
        return Checkpoint(run_id=path.resolve().name, step=0, path=path, run_dir=None)
    run_dir = path.parent if (path.parent / MANIFEST_NAME).exists() else None
    return Checkpoint(run_id=run_id, step=step, path=path, run_dir=run_dir)
