"""Find the content of the last `\\boxed{...}` in a LaTeX string (balanced braces).

Used for SFT targets (final answer of a MATH solution) and by the grader.
"""

from __future__ import annotations

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`); None when absent or unbalanced."""
    start = max(text.rfind(command) for command in _BOX_COMMANDS)
    if start < 0:
        return None
    command = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    rest = text[start + len(command):]
    if rest.startswith(" ") and not rest.lstrip().startswith("{"):
        # `\boxed 5` form: the answer runs to the next `$` or whitespace.
        token = rest.lstrip().split("$")[0].split()
        return token[0] if token else None
    rest = rest.lstrip()
    if not rest.startswith("{"):
        return None
    depth = 0
    for index, char in enumerate(rest):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return rest[1:index]
    return None  # unbalanced: no closing brace
