"""Checks on a mixture's path that need nothing heavy (no numpy), so that the CLI reports a
mistyped ``--data`` before it loads torch."""

from __future__ import annotations

from pathlib import Path

from tive.errors import DataError


def require_mixture_path(path: str | Path) -> Path:
    """``path`` when something is there.

    Raises:
        DataError: nothing at ``path``, with the forms a mixture takes.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; expected a mixture (.json, .jsonl, "
                        f".parquet or a datasets folder); fix: check the path and its spelling")
    return path
