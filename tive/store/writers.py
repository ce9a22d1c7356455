"""Writing a feature store: per-record gradient features on disk, memory-mapped. Their format
and reading them are :mod:`tive.store.format`.

``tive score`` fills a store as it goes (:func:`create_store`, :class:`RowWriter`): rows are
written to the memory-mapped arrays, and every :data:`COMMIT_SECONDS` the data arrays are
flushed *before* the rows are marked in ``done.npy``. A process killed at any moment leaves
every row marked done complete; unmarked rows are computed again. ``meta.json`` says
``"complete": true`` once every row is done.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tive.errors import StoreError
from tive.store.format import (
    ARRAYS,
    DTYPES,
    FORMAT_VERSION,
    PARTS_DIR,
    IndexEntry,
    Store,
)
from tive.util.files import atomic_path, check_space, preallocate, write_json
from tive.util.hashing import file_digest

COMMIT_SECONDS = 1.0  # at most this much finished work is lost when a run is killed


def write_store(
    root: str | os.PathLike,
    *,
    features: np.ndarray,
    norms: np.ndarray,
    index: Sequence[IndexEntry],
    meta: dict[str, Any],
    loss: np.ndarray | None = None,
    ntokens: np.ndarray | None = None,
    skipped: np.ndarray | None = None,
    feature_dtype: str = "float16",
    overwrite: bool = False,
) -> Store:
    """Write a complete store at ``root`` in one go (all rows done), atomically.

    Args:
        features: ``(N, k)`` features in any float dtype; stored as ``feature_dtype``.
        norms: ``(N,)`` exact gradient norms.
        index: N entries (id, task, key).
        meta: the descriptive part of ``meta.json`` (model, projector type/seed, data, settings);
            format version, dims, dtype and time are filled in here.
        loss, ntokens, skipped: optional ``(N,)`` arrays (NaN / -1 / 0 when absent).
        overwrite: replace an existing store at ``root``.
    """
    root = Path(root)
    n, k = features.shape
    if (root / "meta.json").exists() and not overwrite:
        raise StoreError(f"{root}: a store already exists; fix: choose another --run folder, "
                         f"or pass --force to replace it")
    arrays = {
        "norms": norms,
        "loss": np.full(n, np.nan) if loss is None else loss,
        "ntokens": np.full(n, -1) if ntokens is None else ntokens,
        "done": np.ones(n, dtype=bool),
        "skipped": np.zeros(n, dtype=np.int8) if skipped is None else skipped,
    }
    full_meta = {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **meta,
        "feature_dtype": feature_dtype,
        "complete": True,
    }
    full_meta["projector"] = {**meta.get("projector", {}), "dim": int(k)}
    full_meta["data"] = {**meta["data"], "records": int(n)}
    check_space(root.parent, store_bytes(n, k, feature_dtype), f"{root}: the store")
    with atomic_path(root, directory=True) as tmp:
        tmp.mkdir()
        out = _features_file(tmp, n, k, feature_dtype)
        step = max(1, (1 << 24) // max(k, 1))
        for start in range(0, n, step):
            block = features[start:start + step]
            out[start:start + step] = _cast_rows(block, out.dtype,
                                                 np.arange(start, start + len(block)))
        out.flush()
        del out
        for name, values in arrays.items():
            np.save(tmp / f"{name}.npy", np.asarray(values, dtype=DTYPES[name]))
        _write_index_and_meta(tmp, index, full_meta)
    return Store.open(root)


def create_store(root: str | os.PathLike, *, n: int, k: int, index: Sequence[IndexEntry],
                 meta: dict[str, Any], feature_dtype: str = "float16") -> Store:
    """Create an empty store (no row done) for ``tive score`` to fill, atomically.

    ``features.npy`` is created sparse (zeros); norms and losses are NaN, token counts -1.
    """
    root = Path(root)
    full_meta = {"format_version": FORMAT_VERSION,
                 "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **meta,
                 "feature_dtype": feature_dtype, "complete": False}
    full_meta["projector"] = {**meta["projector"], "dim": int(k)}
    full_meta["data"] = {**meta["data"], "records": int(n)}
    check_space(root.parent, store_bytes(n, k, feature_dtype), f"{root}: the store")
    with atomic_path(root, directory=True) as tmp:
        tmp.mkdir()
        _empty_arrays(tmp, n, k, feature_dtype)
        _write_index_and_meta(tmp, index, full_meta)
    return Store.open(root)


def _write_index_and_meta(folder: Path, index: Sequence[IndexEntry],
                          meta: dict[str, Any]) -> None:
    """``index.jsonl`` (one ``{"id", "task", "key"}`` line per row) and ``meta.json``."""
    # a lone surrogate in an id or task is written as its \u escape: JSON reads it back as is
    with open(folder / "index.jsonl", "w", encoding="utf-8", errors="backslashreplace") as f:
        for e in index:
            f.write(json.dumps({"id": e.id, "task": e.task, "key": f"{e.key:016x}"},
                               ensure_ascii=False) + "\n")
    meta = {**meta, "index_digest": file_digest(folder / "index.jsonl")}  # edits are seen
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def store_bytes(n: int, k: int, feature_dtype: str) -> int:
    """Disk space of a store of ``n`` rows × ``k`` features (index lines estimated)."""
    per_row = sum(np.dtype(t).itemsize for t in DTYPES.values()) + 64  # arrays + index line
    return n * k * np.dtype(feature_dtype).itemsize + n * per_row + (1 << 16)


def _features_file(folder: Path, n: int, k: int, feature_dtype: str) -> np.memmap:
    """``features.npy`` ``(n, k)`` created with its blocks reserved (a full disk is an error
    here, not a SIGBUS when a mapped page is written later)."""
    out = np.lib.format.open_memmap(folder / "features.npy", mode="w+",
                                    dtype=np.dtype(feature_dtype), shape=(n, k))
    preallocate(folder / "features.npy", f"{folder.parent}: the features ({n:,} × {k})")
    return out


def _empty_arrays(folder: Path, n: int, k: int, feature_dtype: str) -> None:
    _features_file(folder, n, k, feature_dtype).flush()
    fill = {"norms": np.nan, "loss": np.nan, "ntokens": -1, "done": False, "skipped": 0}
    for name, value in fill.items():
        np.save(folder / f"{name}.npy", np.full(n, value, dtype=DTYPES[name]))


class RowWriter:
    """Writes rows into a store folder (or a rank's part of one) and commits them to ``done``.

    Args:
        folder: holds ``features.npy`` and the ``(N,)`` arrays.
        positions: for a part, the store row of each of its slots (``rows.npy``); None: the
            store itself (slot = row).
    """

    def __init__(self, folder: Path, positions: np.ndarray | None = None) -> None:
        self.folder = Path(folder)
        for name in ("features", *ARRAYS):  # written in place: never through a symlink
            if (self.folder / f"{name}.npy").is_symlink():
                raise StoreError(f"{self.folder / f'{name}.npy'}: is a symlink; tive never "
                                 f"writes through one; fix: rebuild the store (--force)")
        self.arrays = {name: np.load(self.folder / f"{name}.npy", mmap_mode="r+")
                       for name in ("features", *ARRAYS)}
        self.slot = None if positions is None else {int(r): i for i, r in enumerate(positions)}
        self._pending: list[int] = []
        self._last = time.monotonic()

    def write(self, rows: np.ndarray, features: np.ndarray, norms: np.ndarray,
              loss: np.ndarray, ntokens: np.ndarray, skipped: np.ndarray) -> None:
        """Write store rows ``rows`` (a whole batch, scored or skipped); commit when due."""
        at = rows if self.slot is None else np.array([self.slot[int(r)] for r in rows], int)
        a = self.arrays
        a["features"][at] = _cast_rows(features, a["features"].dtype, rows)
        a["norms"][at], a["loss"][at], a["ntokens"][at] = norms, loss, ntokens
        a["skipped"][at] = skipped
        self._pending.extend(int(i) for i in at)
        if time.monotonic() - self._last >= COMMIT_SECONDS:
            self.commit()

    def commit(self) -> None:
        """Flush the data, then mark the pending rows done and flush that."""
        for name, arr in self.arrays.items():
            if name != "done":
                arr.flush()
        if self._pending:
            self.arrays["done"][self._pending] = True
            self.arrays["done"].flush()
        self._pending = []
        self._last = time.monotonic()

    def close(self) -> None:
        self.commit()
        self.arrays = {}


def part_folder(store_root: Path, rank: int) -> Path:
    return Path(store_root) / PARTS_DIR / f"rank-{rank}"


def create_part(store: Store, rank: int, rows: np.ndarray) -> RowWriter:
    """A rank's own part of ``store`` for ``rows`` (replacing an older one), and its writer."""
    folder = part_folder(store.root, rank)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    _empty_arrays(folder, len(rows), store.dim, store.meta["feature_dtype"])
    np.save(folder / "rows.tmp.npy", np.asarray(rows, dtype=np.int64))
    os.replace(folder / "rows.tmp.npy", folder / "rows.npy")  # last: marks the part whole
    return RowWriter(folder, rows)


def fold_parts(store: Store) -> int:
    """Copy the done rows of every part into the store, mark them done, delete the parts.

    Safe to repeat after a crash (copying again gives the same bytes).

    Returns:
        the number of rows folded in.
    """
    parts = Path(store.root) / PARTS_DIR
    if not parts.exists():
        return 0
    main = RowWriter(store.root)
    total = 0
    for folder in sorted(p for p in parts.iterdir() if (p / "rows.npy").exists()):
        rows = np.load(folder / "rows.npy")
        done = np.load(folder / "done.npy")
        src = {name: np.load(folder / f"{name}.npy", mmap_mode="r")
               for name in ("features", *ARRAYS)}
        slots = np.flatnonzero(done)
        step = max(1, (1 << 24) // max(store.dim, 1))
        for s in range(0, len(slots), step):
            chunk = slots[s:s + step]
            for name in ("features", "norms", "loss", "ntokens", "skipped"):
                main.arrays[name][rows[chunk]] = src[name][chunk]
        main._pending.extend(int(r) for r in rows[slots])
        main.commit()
        total += len(slots)
    main.close()
    trash = parts.with_name(f".{PARTS_DIR}.folded")  # a crash mid-delete leaves no half part
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(parts, trash)
    shutil.rmtree(trash)
    return total


def mark_complete(store: Store, **extra: Any) -> Store:
    """Set ``complete`` in meta.json (atomically) once every row is done."""
    done = store.array("done")
    if not done.all():
        raise StoreError(f"{store.root}: {int((~done).sum()):,} rows are not done yet")
    write_json(store.root / "meta.json", {**store.meta, **extra, "complete": True})
    return Store.open(store.root)


def _cast_rows(block: np.ndarray, dtype: np.dtype, rows: np.ndarray) -> np.ndarray:
    """``block`` ``(n, k)`` as ``dtype``, refusing rows the cast would change by more than 1%
    (overflow to inf in float16 above 65504, or underflow of tiny features to zero); ``rows``
    ``(n,)`` are the store rows of the block, for the message.

    Raises:
        StoreError: naming the first such row and the fix (a wider --feature-dtype).
    """
    block = np.asarray(block)
    with np.errstate(over="ignore"):
        cast = block.astype(dtype)
    if dtype.itemsize >= block.dtype.itemsize:
        return cast
    src = block.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        scale = np.abs(src).max(axis=1, initial=0.0)[:, None]  # rows scaled to at most 1:
        scale[~(scale > 0)] = 1.0  # their norms cannot overflow (a row of 1e200s would)
        err = np.linalg.norm((cast.astype(np.float64) - src) / scale, axis=1)
        bad = np.isfinite(src).all(axis=1) & ~(err <= 0.01 * np.linalg.norm(src / scale, axis=1))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        peak = float(np.abs(src[row]).max())
        fix = ("--feature-dtype float32" if dtype.itemsize < 4 else "divide each row by its "
               "norm before importing (only the directions are used)")
        raise StoreError(f"features row {int(rows[row])} (largest |value| {peak:.3g}) does not fit "
                         f"{dtype.name} within 1%; fix: {fix}")
    return cast
