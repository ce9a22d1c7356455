"""``tive merge``: one store of a mixture from stores computed separately (other machines,
other jobs, parts of the mixture) with the same identity (docs/design.md, "Merging stores").

Rows are matched by record key (:mod:`tive.data.keys`): each record of the mixture takes the
row of the first store that has its key done. A key done in several stores is kept once when
the rows are equal (:func:`differs` finds nothing) and refused when they are not. The merged store is
built in ``OUT/.store.merging`` and renamed to ``OUT/store`` when written; records of the
mixture found in no store are left pending, for ``tive score`` to compute.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tive.data.keys import record_keys
from tive.data.mixture import Mixture, load_mixture
from tive.data.tasks import label_tasks
from tive.errors import ConfigError, DataError, OutputError, StoreError
from tive.scoring.grow import DATA_KEYS  # what stores of one identity may differ in
from tive.scoring.identity import adapter_sha256
from tive.store.format import ARRAYS, STORE_DIR, IndexEntry, Store
from tive.store.keys import read_keys, write_keys
from tive.store.writers import RowWriter, create_store, mark_complete
from tive.util.files import atomic_path
from tive.warmup.reference import REFERENCE_DIR

MERGING_DIR = ".store.merging"
FEATURE_ATOL = 1e-2  # unit rows: float16 rounding and batch composition stay far below
VALUE_RTOL = 1e-3  # norms and losses


@dataclass(frozen=True)
class Merged:
    """What a merge did: the store, rows taken, duplicates kept once, records in no store,
    and where the reference came from (None: none found)."""

    store: Path
    taken: int
    duplicates: int
    missing: int
    reference: Path | None


def merge_stores(runs: list[Path], out: Path, data: Path | None = None,
                 force: bool = False) -> Merged:
    """Merge the stores of ``runs`` into ``out/store`` for the mixture ``data`` (default: the
    data of the stores, when they all have the same).

    Raises:
        StoreError: identities differ (naming each difference), a store has no record keys,
            a key has different rows in two stores, or ``out`` has a store (without ``force``).
        DataError: no ``data`` and the stores were built from different data.
    """
    target = Path(out) / STORE_DIR
    if (target / "meta.json").exists() and not force:
        raise StoreError(f"{target}: a store is already there; fix: another --run, or --force "
                         f"to replace it")
    stores = [Store.open(r) for r in runs]
    identity = common_identity(stores)
    keys_of = [read_keys(s, "to merge it") for s in stores]
    mixture = _mixture(stores, data, identity.get("task_field"))
    tasks = label_tasks(mixture).tasks
    roots = {s.meta["identity"].get("image_root") for s in stores}
    image_root = roots.pop() if len(roots) == 1 else None  # else: the mixture's folder
    keys = record_keys(mixture, tasks, image_root)
    where, duplicates = locate(stores, keys_of)
    meta = _merged_meta(stores, mixture, image_root)
    reference = _copy_reference(stores, out)
    if reference is not None and isinstance(meta.get("adapter"), dict):
        meta["adapter"]["path"] = str(reference.resolve())  # OUT's own copy, not an input's
    index = [IndexEntry(r.id, str(t), int(k)) for r, t, k in zip(mixture, tasks, mixture.keys)]
    taken = _write(Path(out), stores, meta, index, keys, where)
    return Merged(target, taken, duplicates, len(mixture) - taken, reference)


def common_identity(stores: list[Store]) -> dict[str, Any]:
    """The identity the stores share (their data aside).

    Raises:
        StoreError: a store not written by ``tive score``, or identities that differ.
    """
    first = stores[0]
    for s in stores:
        if not isinstance(s.meta.get("identity"), dict):
            raise StoreError(f"{s.root}: not written by `tive score` ({s.meta.get('source')}); "
                             f"only scored stores carry the identity a merge checks")
    base = {k: v for k, v in first.meta["identity"].items() if k not in DATA_KEYS}
    for s in stores[1:]:
        other = {k: v for k, v in s.meta["identity"].items() if k not in DATA_KEYS}
        diffs = [f"{k}: {_short(base.get(k))} → {_short(other.get(k))}"
                 for k in sorted(set(base) | set(other)) if base.get(k) != other.get(k)]
        if diffs:
            raise StoreError(f"{s.root}: scored with another identity than {first.root} "
                             f"({'; '.join(diffs)}); stores merge only when model, adapter, "
                             f"projector and settings are the same; fix: score the parts with "
                             f"the same settings and the same --reference")
    return base


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _mixture(stores: list[Store], data: Path | None, task_field: str | None) -> Mixture:
    if data is None:
        paths = {s.meta["data"]["fingerprint"]: s.meta["data"].get("path") for s in stores}
        if len(paths) > 1:
            names = ", ".join(f"{s.root}: {s.meta['data'].get('path')}" for s in stores)
            raise DataError(f"the stores were built from different data ({names}); fix: "
                            f"--data MIX, the mixture the merged store is for")
        data = Path(next(iter(paths.values())) or "")
    return load_mixture(data, task_field)


def locate(stores: list[Store], keys_of: list[np.ndarray]) -> tuple[dict[bytes, tuple], int]:
    """Key → ``(store, row)`` of its first done row; and how many other done rows repeat a
    key of another store with an equal row.

    Raises:
        StoreError: a key whose rows differ between two stores (naming the record and both).
    """
    rows = [Rows(s) for s in stores]
    where: dict[bytes, tuple[int, int]] = {}
    duplicates = 0
    for s, keys in enumerate(keys_of):
        for j in np.flatnonzero(rows[s].done).tolist():
            key = keys[j]
            if key not in where:
                where[key] = (s, j)
            elif where[key][0] != s:
                t, i = where[key]
                why = differs(rows[t], i, rows[s], j)
                if why:
                    raise StoreError(
                        f"record key {key.decode()} (id {_id(stores[t], i)} in {stores[t].root}, "
                        f"id {_id(stores[s], j)} in {stores[s].root}) has different rows "
                        f"({why}); the stores disagree on one record; fix: leave one of them "
                        f"out, or score it again")
                duplicates += 1
    return where, duplicates


class Rows:
    """A store's per-row arrays, read once (features stay a memmap)."""

    def __init__(self, store: Store) -> None:
        self.done = store.array("done")
        self.arrays = {name: store.array(name) for name in ("skipped", "ntokens", "norms", "loss")}
        self.features = store.features


def differs(a: Rows, i: int, b: Rows, j: int) -> str:
    """What differs between row ``i`` of ``a`` and row ``j`` of ``b`` ('' when they are equal:
    same skip code and token count, norms and losses within :data:`VALUE_RTOL`, features
    within :data:`FEATURE_ATOL` (unit rows))."""
    out = []
    for name in ("skipped", "ntokens"):
        x, y = a.arrays[name][i], b.arrays[name][j]
        if x != y:
            out.append(f"{name} {x} vs {y}")
    for name in ("norms", "loss"):
        x, y = float(a.arrays[name][i]), float(b.arrays[name][j])
        if not np.isclose(x, y, rtol=VALUE_RTOL, atol=0, equal_nan=True):
            out.append(f"{name.rstrip('s')} {x:.6g} vs {y:.6g}")
    gap = np.abs(np.asarray(a.features[i], np.float64) - np.asarray(b.features[j], np.float64))
    if gap.size and not gap.max() <= FEATURE_ATOL:
        out.append(f"features differ by up to {gap.max():.3g}")
    return ", ".join(out)


def _id(store: Store, row: int) -> str:
    with open(store.root / "index.jsonl", encoding="utf-8") as f:
        for n, line in enumerate(f):
            if n == row:
                return str(json.loads(line).get("id"))
    return "?"


def _merged_meta(stores: list[Store], mixture: Mixture, image_root: str | None) -> dict:
    """The first store's meta.json for ``mixture``: its data, and where the rows came from."""
    meta = {k: v for k, v in stores[0].meta.items()
            if k not in ("format_version", "created", "feature_dtype", "complete")}
    data = {"path": str(mixture.path.resolve()), "format": mixture.container,
            "schema": mixture.schema, "fingerprint": mixture.fingerprint}
    meta["data"] = data
    meta["identity"] = {**stores[0].meta["identity"], "data": mixture.fingerprint,
                        "records": len(mixture), "image_root": image_root}
    meta["merged_from"] = [str(s.root.resolve()) for s in stores]
    return meta


def _write(out: Path, stores: list[Store], meta: dict, index: list[IndexEntry],
           keys: np.ndarray, where: dict[bytes, tuple]) -> int:
    """Build the merged store in ``out/.store.merging``, rename it to ``out/store``; the
    number of rows taken from the stores."""
    staging, target = out / MERGING_DIR, out / STORE_DIR
    shutil.rmtree(staging, ignore_errors=True)
    first = stores[0]
    create_store(staging, n=len(index), k=first.dim, index=index, meta=meta,
                 feature_dtype=first.meta["feature_dtype"])
    write_keys(staging, keys)
    writer, taken = RowWriter(staging), 0
    for s, store in enumerate(stores):
        pairs = [(i, where[k][1]) for i, k in enumerate(keys.tolist())
                 if k in where and where[k][0] == s]
        if not pairs:
            continue
        rows = np.asarray(pairs, dtype=np.int64)
        src = {name: store.array(name) for name in ARRAYS if name != "done"}
        step = max(1, (1 << 24) // max(store.dim, 1))
        for c in range(0, len(rows), step):
            to, frm = rows[c:c + step, 0], rows[c:c + step, 1]
            writer.write(to, np.asarray(store.features[frm]), src["norms"][frm],
                         src["loss"][frm], src["ntokens"][frm], src["skipped"][frm])
        taken += len(rows)
    writer.close()
    if taken == len(index):
        mark_complete(Store.open(staging))
    if target.exists():
        old = out / ".store.replaced-by-merge"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old)
    else:
        os.replace(staging, target)
    return taken


def _copy_reference(stores: list[Store], out: Path) -> Path | None:
    """The adapter the stores were scored with, copied to ``out/reference`` (from a run
    folder holding it) so that ``tive score --run OUT`` can finish the store; None when no
    store's run has it."""
    target = Path(out) / REFERENCE_DIR
    digest = stores[0].meta["identity"].get("adapter")
    for s in stores:
        folder = s.root.parent / REFERENCE_DIR
        try:
            if digest and adapter_sha256(folder)[:16] == digest:
                if not _holds(target, digest):  # absent, or another adapter: replaced whole
                    with atomic_path(target, directory=True) as tmp:
                        shutil.copytree(folder, tmp, symlinks=True, dirs_exist_ok=True)
                return target
        except ConfigError:
            continue
        except (OSError, shutil.Error) as e:
            raise OutputError(f"{target}: copying the adapter from {folder} failed "
                              f"({str(e)[:120]}); nothing was kept; fix: check {folder} and "
                              f"merge again") from None
    return None


def _holds(folder: Path, digest: str) -> bool:
    """Whether ``folder`` holds the adapter of ``digest``."""
    try:
        return folder.is_dir() and adapter_sha256(folder)[:16] == digest
    except ConfigError:
        return False
