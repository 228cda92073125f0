"""Tried / passed per fault for the fault suite (tests/test_faults.py); conftest.py prints it."""

from __future__ import annotations

import contextlib
from collections import defaultdict

TALLY: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # fault -> [tried, passed]
FAILURES: list[str] = []


@contextlib.contextmanager
def trial(fault: str):
    """Count one try of `fault`; it passed when the block raised nothing. Failures are collected,
    not raised, so every trial of a test runs and the counts stay whole (check_all raises them)."""
    TALLY[fault][0] += 1
    try:
        yield
    except AssertionError as exc:
        FAILURES.append(f"{fault}: {str(exc)[:2000]}")
        return
    TALLY[fault][1] += 1


def check_all() -> None:
    failures = list(FAILURES)
    FAILURES.clear()
    assert not failures, "\n\n".join(failures)


def report() -> list[str]:
    return [f"{fault:<58} tried {tried:>3}  passed {passed:>3}" for fault, (tried, passed) in sorted(TALLY.items())]
