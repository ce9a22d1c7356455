"""Stage 1, the data: a mixture file read into records, their task labels, subsets written back."""

from pathlib import Path as _Path

from tive.errors import DataError as _DataError


def require_mixture_path(path: str | _Path) -> _Path:
    """``path`` when something is there; light (no numpy), so that the CLI checks ``--data``
    before it loads torch.

    Raises:
        DataError: nothing at ``path``, with the forms a mixture takes.
    """
    path = _Path(path)
    if not path.exists():
        raise _DataError(f"{path}: no such file or folder; expected a mixture (.json, .jsonl, "
                         f".parquet or a datasets folder); fix: check the path and its spelling")
    return path
