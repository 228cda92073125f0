"""One-line messages from exceptions, for the one-line errors both daemons log and record."""

from __future__ import annotations


def first_line(exc: BaseException, empty: str = "") -> str:
    """The message's first line, or its first two when the first only introduces the second (ends
    in ':', as huggingface_hub's config validation errors do); `empty` for an empty message."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return empty
    return " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]
