"""Which published checkpoints still need an evaluation, of which kind, and in which order.

Pending work = checkpoints listed in the runs' manifests (common/contract.py discovers them) minus
those the store has already recorded for the eval key. Used by `bin/eval` (eval_daemon/__main__.py);
the list is recomputed after every evaluation, and each worker of a fleet claims the first item
of it that no other worker holds (eval_daemon/lease.py).

Orders (`evaluation.schedule`):
- in_order: (run_id, step) ascending, so every checkpoint of a run is evaluated in step order.
- latest:   the newest pending step of each run first (newest publication first), then the gaps
            in (run_id, step) order: a newly published checkpoint jumps the queue, the gaps are
            filled when idle.
- keep_up (the default): bounds the lag when checkpoints arrive faster than full evaluations
            finish. A checkpoint is *waiting* when it has no record of either kind and no worker
            holds it. When the only waiting one is its run's newest (the fleet keeps up): it gets
            the full evaluation. Otherwise (the fleet is behind): each waiting one gets the quick
            evaluation on a fixed,
            seeded subset stratified by subject and level (`evaluation.keep_up_subset` problems,
            its own eval key), newest first, so that every checkpoint has a number soon. None
            waiting (idle): the full evaluations of the checkpoints that only have the subset
            number are back-filled, newest first. Nothing is skipped for good: once training
            stops, the back-fill reaches every checkpoint. When the eval set is no larger than
            the subset, keep_up orders full evaluations like `latest`.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.contract import Checkpoint

SCHEDULES = ("in_order", "latest", "keep_up")


@dataclass(frozen=True)
class Work:
    checkpoint: Checkpoint
    eval_key: str
    subset: bool = False  # keep_up's quick evaluation on the stratified subset, not the full eval set


def pending(published: list[Checkpoint], recorded: set[tuple[str, int, str]], eval_key: str,
            schedule: str) -> list[Checkpoint]:
    """Checkpoints without a record for eval_key, in the order in_order or latest evaluates them."""
    todo = sorted((c for c in published if (c.run_id, c.step, eval_key) not in recorded),
                  key=lambda c: (c.run_id, c.step))
    if schedule == "in_order":
        return todo
    if schedule not in ("latest", "keep_up"):
        raise ValueError(f"unknown schedule {schedule!r}")
    newest: dict[str, Checkpoint] = {}
    for checkpoint in todo:
        newest[checkpoint.run_id] = checkpoint  # ascending steps: the last one wins
    heads = _newest_first(newest.values())
    return heads + [c for c in todo if c not in heads]


def plan(published: list[Checkpoint], recorded: set[tuple[str, int, str]], held: set[tuple[str, int, str]],
         eval_key: str, subset_key: str | None, schedule: str) -> list[Work]:
    """The work to do next, first item first. `held`: (run_id, step, eval_key) that other workers
    hold a live lease on; `subset_key`: keep_up's subset eval key (None: no subset, the eval set is
    not larger than it)."""
    if schedule != "keep_up" or subset_key is None:
        return [Work(c, eval_key) for c in pending(published, recorded, eval_key, schedule)]

    def has(c: Checkpoint, key: str) -> bool:
        return (c.run_id, c.step, key) in recorded

    free = [c for c in _newest_first(published)
            if (c.run_id, c.step, eval_key) not in held and (c.run_id, c.step, subset_key) not in held]
    waiting = [c for c in free if not has(c, eval_key) and not has(c, subset_key)]
    backfill = [Work(c, eval_key) for c in free if has(c, subset_key) and not has(c, eval_key)]
    newest = {}
    for c in published:
        if c.run_id not in newest or (c.published_at, c.step) > (newest[c.run_id].published_at, newest[c.run_id].step):
            newest[c.run_id] = c
    if len(waiting) == 1 and newest[waiting[0].run_id] == waiting[0]:
        return [Work(waiting[0], eval_key)] + backfill  # keeping up: the new checkpoint, in full
    return [Work(c, subset_key, subset=True) for c in waiting] + backfill


def _newest_first(checkpoints) -> list[Checkpoint]:
    return sorted(checkpoints, key=lambda c: (c.published_at, c.step), reverse=True)
