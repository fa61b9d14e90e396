"""A statement's result as AgentBench prints it, cut at its 800 characters."""

from __future__ import annotations

from collections.abc import Callable

RESULT_CHARS = 800
"""AgentBench's cut of a statement's printed result; longer ones end with TRUNCATED_MARK."""

TRUNCATED_MARK = "[TRUNCATED]"


def truncate(text: str, limit: int = RESULT_CHARS) -> str:
    """AgentBench's cut: the first `limit` characters, then TRUNCATED_MARK."""
    return text[:limit] + TRUNCATED_MARK if len(text) > limit else text


def read_result(cursor, limit: int = RESULT_CHARS, shown: Callable[[str], str] = str) -> tuple[str, bool]:
    """`str(cursor.fetchall())` cut as AgentBench cuts it, reading no more rows than needed.

    Returns the text and whether the result was read to its end. A statement without a result
    set prints as '[]', as AgentBench's client returns no rows for it. `shown` rewrites each
    printed row before it is counted (ItemDatabase shows its alias in place of its name).
    """
    if cursor.description is None:
        return "[]", True
    parts: list[str] = []
    length = 1
    while True:
        rows = cursor.fetchmany(64)
        if not rows:
            break
        for row in rows:
            text = shown(repr(tuple(row)))
            length += len(text) + (2 if parts else 0)
            parts.append(text)
            if length > limit + 1:
                return ("[" + ", ".join(parts))[:limit] + TRUNCATED_MARK, False
    return truncate("[" + ", ".join(parts) + "]", limit), True
