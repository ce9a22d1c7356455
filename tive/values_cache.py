"""Instance values kept beside a store, so that a sweep of selections does not re-read it.

Instance values (:func:`tive.values.instance_values`) are the only costly part of valuing a
store: two passes over the ``(N, k)`` features. They depend on the features, the task of each
row and which rows are valid, never on the budget, strategy, temperature, seed or excluded
tasks (an excluded task is left out after valuation). So they are computed once and written to
``RUN/cache/values-<key>.npz``, where ``key`` is a digest of

* the store's identity: ``meta.json``'s bytes and the size and modification time of each of
  its arrays (``features.npy``, ``norms.npy``, ``done.npy``, ``skipped.npy``, …), so a store
  rebuilt, resumed or replaced is a new key;
* the rows' task codes and task names (another ``--task-field`` or other data labels them
  otherwise), the valid mask (missing images checked or not, skips), and ``chunk_rows``
  (chunking changes float rounding).

A cached result is bit-identical to a fresh one. Files are written atomically; a run folder
that cannot be written to is simply not cached. At most :data:`KEEP` files are kept.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tive.errors import OutputError
from tive.fileio import atomic_path

CACHE_DIR = "cache"
KEEP = 8  # value files kept per run folder (the newest)
VERSION = 1  # bump when instance values are computed differently


def store_identity(root: Path) -> str:
    """Digest of a store folder: ``meta.json``'s bytes, and each ``.npy``'s size and mtime."""
    h = hashlib.blake2b(digest_size=16)
    h.update((root / "meta.json").read_bytes())
    for path in sorted(root.glob("*.npy")):
        st = path.stat()
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def cache_key(identity: str, codes: np.ndarray, names: list[str], valid: np.ndarray,
              chunk_rows: int | None) -> str:
    """Digest of everything the instance values depend on (see the module docstring)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v{VERSION};{identity};{chunk_rows};{len(codes)};".encode())
    h.update("\x00".join(names).encode())
    h.update(np.ascontiguousarray(codes, dtype=np.int64).tobytes())
    h.update(np.packbits(np.asarray(valid, dtype=bool)).tobytes())
    return h.hexdigest()


def cached_instance_values(
    folder: Path | None,
    identity: str | None,
    compute: Callable[..., tuple[np.ndarray, np.ndarray]],
    features: Any,
    codes: np.ndarray,
    names: list[str],
    valid: np.ndarray,
    chunk_rows: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """``compute(features, codes, len(names), valid, chunk_rows)``, read from ``folder`` when
    it holds the result for the same key, else computed and written there.

    Args:
        folder: ``RUN/cache`` (None: no caching).
        identity: :func:`store_identity` of the store the features come from.
        compute: :func:`tive.values.instance_values` (a parameter so tests can count calls).

    Returns:
        ``(values, finite)`` as :func:`tive.values.instance_values` returns them.
    """
    if folder is None or identity is None:
        return compute(features, codes, len(names), valid, chunk_rows)
    path = folder / f"values-{cache_key(identity, codes, names, valid, chunk_rows)}.npz"
    found = _read(path, len(codes))
    if found is not None:
        return found
    values, finite = compute(features, codes, len(names), valid, chunk_rows)
    _write(path, values, finite)
    return values, finite


def _read(path: Path, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached ``(values, finite)``, or None when absent or unreadable."""
    try:
        with np.load(path) as z:
            values, finite = z["values"], z["finite"]
    except (OSError, KeyError, ValueError):
        return None
    if values.shape != (n,) or finite.shape != (n,):
        return None
    try:
        os.utime(path)  # the newest-used files are the ones kept
    except OSError:
        pass
    return values, finite


def _write(path: Path, values: np.ndarray, finite: np.ndarray) -> None:
    """Write atomically and keep the :data:`KEEP` newest files; an unwritable folder is skipped."""
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, values=values, finite=finite)
    except OutputError:
        return
    old = sorted(path.parent.glob("values-*.npz"), key=lambda p: p.stat().st_mtime_ns)
    for stale in old[:-KEEP]:
        stale.unlink(missing_ok=True)
