"""Instance values kept beside a store, so that a sweep of selections does not re-read it.

Instance values (:func:`tive.selection.values.instance_values`) are the only costly part of valuing a
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

The same mechanism (:func:`cached_arrays`) keeps ``--method kmeans --clusters C``'s
assignment of each task's rows to its clusters (``kmeans-<key>.npz``, keyed by the store's
identity, the task's rows, their seeded uniforms, C, the seed and ``chunk_rows``): only the
share of each cluster depends on the budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tive.errors import OutputError
from tive.util.sealed import note_recomputed, read_sealed, write_sealed

CACHE_DIR = "cache"
KEEP = {"values": 8, "kmeans": 512}  # files kept per run folder and prefix (the newest used):
#     instance values, and one task's --clusters assignment (tive.selection.kmeans.Clusters)
VERSION = 2  # bump when instance values are computed (or cached) differently


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
    h.update("\x00".join(names).encode("utf-8", "surrogatepass"))  # lone surrogates too
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
        compute: :func:`tive.selection.values.instance_values` (a parameter so tests can count calls).

    Returns:
        ``(values, finite)`` as :func:`tive.selection.values.instance_values` returns them.
    """
    if folder is None or identity is None:
        return compute(features, codes, len(names), valid, chunk_rows)
    n = len(codes)
    found = cached_arrays(
        folder, "values", cache_key(identity, codes, names, valid, chunk_rows),
        lambda: dict(zip(("values", "finite"),
                         compute(features, codes, len(names), valid, chunk_rows))),
        lambda a: exact(a, {"values": ((n,), "f"), "finite": ((n,), "b")}))
    return found["values"], found["finite"]


def digest(*parts: Any) -> str:
    """Digest of strings, numbers and arrays (their type, shape and bytes), in order."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, np.ndarray):
            a = np.ascontiguousarray(part)
            h.update(f"{a.dtype.str}{a.shape};".encode())
            h.update(a.tobytes())
        else:
            h.update(f"{part!r};".encode())
    return h.hexdigest()


def cached_arrays(folder: Path, prefix: str, key: str, compute: Callable[[], dict[str, Any]],
                  check: Callable[[dict[str, np.ndarray]], bool] | None = None
                  ) -> dict[str, np.ndarray]:
    """The arrays ``compute()`` returns, kept in ``folder/<prefix>-<key>.npz``: read back when
    the file is there, whole (:func:`tive.util.sealed.read_sealed`) and passes ``check`` (the
    exact names, shapes and ranges the caller expects), else computed and written (atomically;
    an unwritable folder is skipped) — a damaged file is said on stderr. At most :data:`KEEP`
    ``[prefix]`` files are kept, the newest used."""
    path = folder / f"{prefix}-{key}.npz"
    found, why = read_sealed(path)
    if found is not None and check is not None and not check(found):
        found, why = None, "its arrays are not those expected"
    if found is not None:
        with contextlib.suppress(OSError):
            os.utime(path, follow_symlinks=False)  # the newest-used files are the ones kept
        return found
    if why is not None:
        note_recomputed(path, why)
    arrays = {name: np.asarray(value) for name, value in compute().items()}
    _write(path, arrays)
    return arrays


def _write(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically and keep the newest files of the same prefix; an unwritable folder is
    skipped."""
    prefix = path.name.split("-", 1)[0]
    try:
        write_sealed(path, arrays)
    except OutputError:
        return
    try:  # another selection may prune the same folder: never fail for it
        old = sorted((_mtime(p), p) for p in path.parent.glob(f"{prefix}-*.npz"))
        for _, stale in old[:-KEEP.get(prefix, 8)]:
            stale.unlink(missing_ok=True)
    except OSError:
        pass


def exact(arrays: dict[str, np.ndarray], expected: dict[str, tuple[tuple[int, ...], str]]
          ) -> bool:
    """``arrays`` has exactly the names of ``expected``, each of its shape and kind
    (``numpy.dtype.kind``: ``f`` float, ``i`` integer, ``b`` bool)."""
    return set(arrays) == set(expected) and all(
        arrays[name].shape == shape and arrays[name].dtype.kind == kind
        for name, (shape, kind) in expected.items())


def _mtime(path: Path) -> int:
    """Modification time in ns; 0 for a file removed meanwhile (pruned first)."""
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0
