"""The feature store's format, and reading it (:class:`Store`): per-record gradient features on disk,
memory-mapped.

Layout of ``RUN/store/``::

    meta.json      format version, model/adapter, key parameters, projector, data identity
    features.npy   (N, k) projected gradients, fp16 by default; np.load(mmap_mode="r")-able
                   (``tive score`` stores each row at unit length: only directions are used)
    norms.npy      (N,) float64 exact ‖g‖₂ of the unprojected gradient
    loss.npy       (N,) float64 each record's mean token loss (NaN when unknown)
    ntokens.npy    (N,) int64 supervised tokens (-1 when unknown)
    done.npy       (N,) bool, rows written
    skipped.npy    (N,) int8 reason a row could not be scored (0: not skipped; tive.models.skips.CODES)
    index.jsonl    one line per row: {"id", "task", "key"}
    parts/rank-R/  while ``tive score`` runs in several processes: each rank's own rows

A store describes itself: :meth:`Store.check_data` refuses data other than the data it was
built from, showing both identities and the remedy.

Writing a store is :mod:`tive.store.writers`'s part (which also hands on every name of this module);
the format is described in docs/design.md, "The store".
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tive.errors import StoreError
from tive.models.skips import BY_CODE
from tive.util.files import NPY_HEADER_ERRORS, special_kind

FORMAT_VERSION = 1
STORE_DIR = "store"
PARTS_DIR = "parts"
ARRAYS = ("norms", "loss", "ntokens", "done", "skipped")
DTYPES = {"norms": np.float64, "loss": np.float64, "ntokens": np.int64, "done": np.bool_,
          "skipped": np.int8}


@dataclass(frozen=True)
class IndexEntry:
    """One row of ``index.jsonl``."""

    id: str
    task: str
    key: int  # 64-bit content digest of the record (see tive.data.mixture)


class Store:
    """An opened store. Arrays are read on demand; ``features`` is a read-only memmap.

    Attributes:
        root: the ``store`` folder.
        meta: the parsed ``meta.json``.
    """

    def __init__(self, root: Path, meta: dict[str, Any]) -> None:
        self.root = root
        self.meta = meta

    @classmethod
    def open(cls, root: str | os.PathLike) -> Store:
        """Open ``root`` (a ``store`` folder, or a run folder holding one)."""
        root = Path(root)
        if not (root / "meta.json").exists() and (root / STORE_DIR / "meta.json").exists():
            root = root / STORE_DIR
        meta_path = root / "meta.json"
        check_kind(meta_path)
        if not meta_path.exists():
            raise StoreError(f"{root}: no feature store here (no meta.json); fix: run `tive "
                             f"score` or `tive import` first, or pass --run to the run folder")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            why = getattr(e, "msg", None) or type(e).__name__
            raise StoreError(f"{meta_path}: damaged ({why}); fix: rebuild the store") from None
        except OSError as e:
            raise StoreError(f"{meta_path}: cannot read ({e.strerror or e}); fix: check "
                             f"permissions") from None
        validate_meta(meta, meta_path)
        store = cls(root, meta)
        store._check_files()
        return store

    @property
    def n_records(self) -> int:
        return int(self.meta["data"]["records"])

    @property
    def dim(self) -> int:
        return int(self.meta["projector"]["dim"])

    @property
    def complete(self) -> bool:
        """Every row is done (stores written by ``tive import`` always are)."""
        return bool(self.meta.get("complete", True))

    def require_complete(self) -> None:
        """Raise unless :attr:`complete`: values from a partial store would be wrong."""
        if not self.complete:
            done = int(self.array("done").sum())
            raise StoreError(f"{self.root}: only {done:,} of {self.n_records:,} records are "
                             f"scored; fix: finish it by running the same `tive score` command "
                             f"again (it resumes)")

    @property
    def features(self) -> np.ndarray:
        """``(N, k)`` read-only memmap of the projected gradients."""
        return np.load(self.root / "features.npy", mmap_mode="r")

    def array(self, name: str) -> np.ndarray:
        """One of ``norms``, ``loss``, ``ntokens``, ``done``, ``skipped`` as an ``(N,)`` array,
        its values checked: norms ≥ 0 or NaN (not scored), token counts ≥ -1 (-1: unknown),
        skip codes 0 or a known reason's.

        Raises:
            StoreError: a value no writer makes, naming the file, the row and the fix.
        """
        path = self.root / f"{name}.npy"
        values = np.load(path)
        bad = {"norms": lambda a: a < 0, "ntokens": lambda a: a < -1,
               "skipped": lambda a: ~np.isin(a, [0, *BY_CODE])}.get(name)
        rows = np.flatnonzero(bad(values)) if bad is not None else ()
        if len(rows):
            raise StoreError(f"{path}: row {rows[0]} is {values[rows[0]].item()!r}, which no "
                             f"writer makes; the store is damaged; fix: rebuild it "
                             f"(`tive score`/`tive import` with --force)")
        return values

    def index(self) -> list[IndexEntry]:
        """The rows' ids, tasks and content keys.

        Raises:
            StoreError: ``index.jsonl`` missing, unreadable, malformed or of another length.
        """
        path = self.root / "index.jsonl"
        entries, line = [], 1
        check_kind(path)
        digest = hashlib.blake2b(digest_size=16)
        try:
            with open(path, "rb") as f:
                for line, raw in enumerate(f, 1):
                    digest.update(raw)
                    e = json.loads(raw.decode("utf-8"))
                    if not (isinstance(e, dict) and isinstance(e.get("id"), str)
                            and isinstance(e.get("task"), str) and isinstance(e.get("key"), str)):
                        raise ValueError("expected {id, task, key} strings")
                    entries.append(IndexEntry(e["id"], e["task"], int(e["key"], 16)))
        except FileNotFoundError:
            raise StoreError(f"{path}: missing from the store; fix: rebuild the store") from None
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise StoreError(f"{path}: line {line} is damaged ({e}); fix: rebuild the "
                             f"store") from None
        if len(entries) != self.n_records:
            raise StoreError(f"{path}: {len(entries):,} rows, meta.json says "
                             f"{self.n_records:,}; the store is damaged; fix: rebuild it")
        want = self.meta.get("index_digest")  # absent in stores written before it was kept
        if want is not None and digest.hexdigest() != want:
            raise StoreError(f"{path}: changed since the store was written (its digest is not "
                             f"meta.json's index_digest): the store is damaged; fix: rebuild it "
                             f"(`tive import`/`tive score` with --force; tasks are labelled "
                             f"from the data, --task-field names the field)")
        return entries

    def check_data(self, fingerprint: str, n_records: int, path: str | os.PathLike) -> None:
        """Refuse data other than the data this store was built from.

        Raises:
            StoreError: with both identities (records, fingerprint) and the remedy.
        """
        want = self.meta["data"]
        if want["records"] == n_records and want["fingerprint"] == fingerprint:
            return
        raise StoreError(
            f"{self.root}: built from {want['path']} ({want['records']:,} records, fingerprint "
            f"{want['fingerprint'][:12]}), but {path} has {n_records:,} records, fingerprint "
            f"{fingerprint[:12]}; fix: pass the same --data (same records, same order) or "
            f"rebuild the store for this data in another --run folder")

    def _check_files(self) -> None:
        """Every array present, readable, of the shape and type meta.json implies, and not
        shorter on disk than its header says (a truncated file would be read past its end)."""
        n, k = self.n_records, self.dim
        expected = {"features": ((n, k), np.dtype(self.meta["feature_dtype"])),
                    **{a: ((n,), np.dtype(DTYPES[a])) for a in ARRAYS}}
        for name, (shape, dtype) in expected.items():
            path = self.root / f"{name}.npy"
            check_kind(path)
            if not path.exists():
                raise StoreError(f"{path}: missing from the store; fix: rebuild the store")
            try:
                with open(path, "rb") as f:
                    version = np.lib.format.read_magic(f)
                    header = {(1, 0): np.lib.format.read_array_header_1_0,
                              (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if header is None:
                        raise ValueError(f".npy format version {version}")
                    got, _, kind = header(f)
                    offset = f.tell()
            except NPY_HEADER_ERRORS as e:
                raise StoreError(f"{path}: not a .npy array ({str(e) or type(e).__name__}); the "
                                 f"store is damaged; fix: rebuild it") from None
            if got != shape or kind != dtype:
                raise StoreError(f"{path}: shape {got} of {kind}, meta.json implies {shape} of "
                                 f"{dtype}; the store is damaged; fix: rebuild it")
            size = offset + int(np.prod(shape)) * dtype.itemsize
            if path.stat().st_size < size:
                raise StoreError(f"{path}: {path.stat().st_size:,} bytes, its header needs "
                                 f"{size:,}: truncated; the store is damaged; fix: rebuild it")
        self._check_index_length()

    def _check_index_length(self) -> None:
        """``index.jsonl`` present with one line per row (counted, not parsed: cheap)."""
        path = self.root / "index.jsonl"
        check_kind(path)
        try:
            with open(path, "rb") as f:
                lines = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 22), b""))
        except FileNotFoundError:
            raise StoreError(f"{path}: missing from the store; fix: rebuild the store") from None
        if lines != self.n_records:
            raise StoreError(f"{path}: {lines:,} rows, meta.json says {self.n_records:,}; the "
                             f"store is damaged; fix: rebuild it")


def check_kind(path: Path) -> None:
    """Refuse a store file that is a FIFO, socket or device (reading one would hang or read
    something that is not the store).

    Raises:
        StoreError: naming the file and its kind.
    """
    kind = special_kind(path)
    if kind is not None:
        raise StoreError(f"{path}: is a {kind}, not a regular file; the store is damaged; fix: "
                         f"rebuild it (`tive score`/`tive import` with --force)")


def validate_meta(meta: Any, path: Path) -> None:
    """The one schema of ``meta.json``: the keys and types every reader relies on.

    Raises:
        StoreError: naming the first key that is missing or of the wrong type.
    """
    if not isinstance(meta, dict):
        raise StoreError(f"{path}: a JSON {type(meta).__name__}, expected an object; the store "
                         f"is damaged; fix: rebuild it")
    if meta.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"{path}: store format {meta.get('format_version')!r}, this tive reads "
                         f"{FORMAT_VERSION}; fix: rebuild it with this version")
    schema = {("data", "records"): int, ("data", "fingerprint"): str,
              ("projector", "dim"): int, ("feature_dtype",): str}
    for keys, kind in schema.items():
        value: Any = meta
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool) or (
                kind is int and value < 0):
            raise StoreError(f"{path}: {'.'.join(keys)} is {value!r}, expected a "
                             f"{'non-negative integer' if kind is int else 'string'}; the store "
                             f"is damaged; fix: rebuild it")
    if not isinstance(meta["data"].get("path"), (str, type(None))):
        raise StoreError(f"{path}: data.path is {meta['data']['path']!r}, expected a string; the "
                         f"store is damaged; fix: rebuild it")
    if meta["feature_dtype"] not in ("float16", "float32", "float64"):
        raise StoreError(f"{path}: feature_dtype {meta['feature_dtype']!r}, expected float16, "
                         f"float32 or float64; the store is damaged; fix: rebuild it")
    _validate_settings(meta, path)
    if not isinstance(meta.get("index_digest", ""), str):
        raise StoreError(f"{path}: index_digest is {meta['index_digest']!r:.40}, expected a "
                         f"string; the store is damaged; fix: rebuild it")
    if "complete" in meta and not isinstance(meta["complete"], bool):
        raise StoreError(f"{path}: complete is {meta['complete']!r}, expected true or false; "
                         f"the store is damaged; fix: rebuild it")


def _validate_settings(meta: dict[str, Any], path: Path) -> None:
    """``settings`` (an object, when present) and the keys of it that readers use."""
    settings = meta.get("settings", {})
    if not isinstance(settings, dict):
        raise StoreError(f"{path}: settings is {settings!r:.60}, expected an object; the store "
                         f"is damaged; fix: rebuild it")
    for key, kinds in {"task_field": (str,), "image_root": (str,),
                       "batch_used": (int,)}.items():
        value = settings.get(key)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            raise StoreError(f"{path}: settings.{key} is {value!r:.60}, expected "
                             f"{'an integer' if kinds == (int,) else 'a string'} or null; the "
                             f"store is damaged; fix: rebuild it")
