"""Errors shown to a person: one short line each."""
from __future__ import annotations


def first_line(err: BaseException, limit: int = 300) -> str:
    """An error as one short line, its type first (tensorstore's and torch's messages run to pages)."""
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(err).__name__}: {line[:limit]}{'...' if len(line) > limit else ''}"
