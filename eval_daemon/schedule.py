"""Which published checkpoints still need an evaluation, and in which order.

Pending work = checkpoints listed in the runs' manifests (common/contract.py discovers them) minus
those the store has already recorded for this eval key. Used by `bin/eval` (eval_daemon/__main__.py).

Orders (`evaluation.schedule`):
- in_order: (run_id, step) ascending, so every checkpoint of a run is evaluated in step order.
- latest:   the newest pending step of each run first (newest publication first), then the gaps
            in (run_id, step) order. The pending list is recomputed after every evaluation, so a
            newly published checkpoint jumps the queue and the gaps are filled when idle.
"""

from __future__ import annotations

from common.contract import Checkpoint


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
