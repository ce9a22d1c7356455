"""Atomic writes: outputs appear whole under their final name or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from tive.errors import OutputError


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` when the block succeeds.

    Args:
        target: final file or folder name.
        directory: the block writes a folder (e.g. ``save_to_disk``) rather than a file.

    On any exception the temporary file or folder is removed and ``target`` is untouched;
    operating-system errors (no space, no permission, a file where a folder should be) become
    one-line :class:`~tive.errors.OutputError` s.
    """
    target = Path(target)
    if target.is_dir() and not directory:
        raise OutputError(f"{target}: is a folder; expected a file name; fix: give a file path")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as e:
        raise OutputError(f"{target}: cannot write there ({e.strerror or e}); fix: choose "
                          f"another output path") from None
    work = tmp / target.name
    try:
        yield work
        if directory and target.is_dir():
            old = tmp / ".replaced"
            os.replace(target, old)
        os.replace(work, target)
    except OSError as e:
        raise OutputError(f"{target}: writing failed ({e.strerror or e}); nothing was written; "
                          f"fix: check space and permissions there") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(target: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``target`` atomically and return the path."""
    with atomic_path(target) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=indent)
            f.write("\n")
    return Path(target)
