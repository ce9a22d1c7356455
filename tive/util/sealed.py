"""Caches of arrays that can be trusted or are computed again: ``.npz`` files sealed with a
digest of their own contents.

A cache in the run folder (``RUN/cache/*.npz``) may be truncated, bit-flipped, hand-edited,
replaced by a FIFO or a symlink; a cache folder that is a symlink is neither read nor written
(nothing outside the run changes). :func:`read_sealed` reads one back only when it is a regular
file, a readable zip of plain (non-object) arrays, and its ``_seal`` equals the digest of the
arrays' names, types, shapes and bytes; anything else is reported as damaged (with the reason)
so that the caller computes the result again and says so (:func:`note_recomputed`).
:func:`write_sealed` writes atomically (:func:`tive.util.files.atomic_path`).
"""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from tive.errors import OutputError
from tive.util.files import NPY_HEADER_ERRORS, atomic_path, special_kind

SEAL = "_seal"


def seal(arrays: dict[str, np.ndarray]) -> str:
    """Digest of ``arrays``: each name, type, shape and bytes, in name order."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name};{a.dtype.str};{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def read_sealed(path: Path) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """The arrays of the sealed cache ``path`` without the seal, or why they are not usable.

    Returns:
        ``(arrays, None)`` when whole; ``(None, None)`` when there is no file; ``(None, why)``
        when the file is damaged (``why`` a few words, for :func:`note_recomputed`).
    """
    if os.path.islink(path.parent):  # a cache folder elsewhere: neither read nor written
        return None, None
    kind = special_kind(path)
    if kind is not None:
        return None, f"a {kind}"
    if not os.path.lexists(path):
        return None, None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except FileNotFoundError:
        return None, None  # a dangling symlink, or pruned meanwhile
    except (*NPY_HEADER_ERRORS, KeyError, zipfile.BadZipFile, RuntimeError) as e:
        return None, f"unreadable: {str(e)[:80] or type(e).__name__}"
    stamp = arrays.pop(SEAL, None)
    if stamp is None or stamp.shape != () or str(stamp) != seal(arrays):
        return None, "its contents do not match their seal"
    return arrays, None


def write_sealed(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` and their seal to ``path`` atomically.

    Raises:
        OutputError: the folder cannot be written (callers skip caching then).
    """
    if os.path.islink(path.parent):
        raise OutputError(f"{path.parent}: is a symlink; tive writes no cache through one; fix: "
                          f"make it a folder")
    arrays = {name: np.asarray(value) for name, value in arrays.items()}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays, **{SEAL: np.array(seal(arrays))})


def note_recomputed(path: Path, why: str) -> None:
    """Say on stderr that the damaged cache ``path`` is computed again (and replaced)."""
    print(f"note: {path}: damaged cache ({why}); computed again", file=sys.stderr)
