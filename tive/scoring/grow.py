"""Incremental scoring: ``tive score --data MIX2`` on a store of MIX1 with the same identity
but the data (docs/design.md, "Incremental scoring").

The new store is built beside the old one, in ``RUN/.store.next``: rows of records whose
record key (:mod:`tive.data.keys`) is a done row of the old store are copied, the others are
scored as any pending row (resumable after a kill), and only when the new store is complete is
it swapped in (``store`` → ``.store.previous``, ``.store.next`` → ``store``, the previous one
deleted); :func:`recover` finishes a swap a crash interrupted. The reference adapter the old
store was scored with is kept (it is part of the identity).
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
from tive.data.mixture import Mixture
from tive.errors import ConfigError, StoreError
from tive.scoring.identity import check_identity, open_or_create
from tive.store.format import STORE_DIR, IndexEntry, Store
from tive.store.keys import has_keys, read_keys, write_keys
from tive.store.writers import RowWriter, create_store, fold_parts
from tive.warmup.reference import REFERENCE_DIR, comparable_settings, identity_settings

NEXT_DIR = ".store.next"
# what a grown store's identity may differ in: the data, and the image root (record keys hold
# the images' bytes, so a record whose image changed is not reused, wherever it lies)
DATA_KEYS = ("data", "records", "image_root")
PREVIOUS_DIR = ".store.previous"


@dataclass(frozen=True)
class Growth:
    """What growing a store reuses: rows copied from the old store, old rows dropped."""

    reused: int
    dropped: int


def recover(run: Path) -> None:
    """Finish a swap that a crash interrupted: a complete ``.store.next`` with no ``store``
    becomes the store; a ``.store.previous`` beside a store is deleted."""
    store, nxt, prev = run / STORE_DIR, run / NEXT_DIR, run / PREVIOUS_DIR
    if not (store / "meta.json").exists() and (nxt / "meta.json").exists():
        try:
            complete = Store.open(nxt).complete
        except StoreError:  # damaged: it is only derived work
            complete = False
        if complete:
            shutil.rmtree(store, ignore_errors=True)
            os.replace(nxt, store)
        else:
            shutil.rmtree(nxt, ignore_errors=True)
    if (store / "meta.json").exists() and prev.exists():
        shutil.rmtree(prev)


def grows(store: Store, identity: dict[str, Any]) -> bool:
    """Whether scoring with ``identity`` (:func:`~tive.scoring.identity.run_identity`) grows
    ``store``: it was built for other data with everything else the same (but
    :data:`DATA_KEYS`).

    Raises:
        StoreError: other data *and* other settings (naming both), or a store without record
            keys (written before they existed).
    """
    have, want = store.meta.get("identity") or {}, identity["identity"]
    if (have.get("data"), have.get("records")) == (want["data"], want["records"]):
        return False
    same_data = {**identity, "identity": {**want, **{k: have.get(k) for k in DATA_KEYS
                                                     if k in have or k in want}}}
    try:
        check_identity(store, same_data)
    except StoreError as e:
        data = store.meta["data"]
        raise StoreError(
            f"{store.root}: built from {data.get('path')} ({data['records']:,} records, "
            f"fingerprint {data['fingerprint'][:12]}), but {identity['data']['path']} has "
            f"{want['records']:,} records, fingerprint {want['data'][:12]}; a store is grown "
            f"for other data only with its own settings, and "
            f"{str(e).split(': ', 1)[1]}") from None
    read_keys(store, "to reuse its rows for other data")
    return True


def kept_reference(run: Path, fingerprint: str, warmup: Any) -> bool:
    """Whether ``RUN/reference`` was trained on other data than ``fingerprint`` (so that the
    store grown or merged from it keeps it rather than training a new one).

    Raises:
        ConfigError: the warm-up options given are not those it was trained with.
    """
    info = run / REFERENCE_DIR / "reference.json"
    if not info.is_file():
        return False
    ref = json.loads(info.read_text(encoding="utf-8"))
    if ref.get("data", {}).get("fingerprint") == fingerprint:
        return False
    saved = (ref.get("identity") or {}).get("settings")
    saved = comparable_settings(saved) if isinstance(saved, dict) else saved
    given = identity_settings(warmup)
    if saved is not None and saved != given:
        diffs = "; ".join(f"{k}: {saved.get(k)} → {given.get(k)}"
                          for k in sorted(set(saved) | set(given)) if saved.get(k) != given.get(k))
        raise ConfigError(f"{info.parent}: the store in {run} was scored with this reference, "
                          f"trained with other warm-up settings ({diffs}); a store for other "
                          f"data keeps its reference; fix: give the warm-up options it was "
                          f"trained with, or --force to retrain and score everything again")
    return True


def open_store(run: Path, root: Path, meta: dict[str, Any], mixture: Mixture,
               tasks: np.ndarray, image_root: Any, dim: int, feature_dtype: str, force: bool,
               growing: bool) -> Growth | None:
    """Create or continue the store at ``root`` (with its record keys), or, ``growing``, the
    grown one beside the old (then its :class:`Growth`)."""
    def keys() -> np.ndarray:
        return record_keys(mixture, tasks, image_root)

    if growing:
        index = [IndexEntry(r.id, str(t), int(k)) for r, t, k in zip(mixture, tasks,
                                                                      mixture.keys)]
        return open_next(run, meta, index, keys(), dim, feature_dtype)
    store = open_or_create(root, meta, mixture, tasks, dim, feature_dtype, force)
    if not has_keys(store):  # a new store, or one written before record keys existed
        write_keys(root, keys())
    return None


def open_next(run: Path, meta: dict[str, Any], index: list[IndexEntry], keys: np.ndarray,
              dim: int, feature_dtype: str) -> Growth:
    """Create (or continue, after a kill) ``RUN/.store.next`` for the new data and copy into it
    the rows of the old store whose records it still has.

    Args:
        meta: the new store's meta.json (:func:`~tive.scoring.identity.store_meta`).
        index: ``(N,)`` the new data's index entries; ``keys`` ``(N,)`` their record keys.
    """
    old, root = Store.open(run / STORE_DIR), run / NEXT_DIR
    have = old.meta.get("identity") or {}
    # the whole identity (adapter, checkpoints, moments included) but the data must be the old
    # store's: its rows are copied as this adapter's
    check_identity(old, {**meta, "identity": {**meta["identity"], **{
        k: have.get(k) for k in DATA_KEYS if k in have or k in meta["identity"]}}})
    if (root / "meta.json").exists():
        try:
            check_identity(Store.open(root), meta)
        except StoreError:  # begun for yet other data: it is only derived work
            shutil.rmtree(root)
    if not (root / "meta.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        create_store(root, n=len(index), k=dim, index=index, meta=meta,
                     feature_dtype=feature_dtype)
    if not has_keys(Store.open(root)):
        write_keys(root, keys)
    fold_parts(Store.open(root))
    old_keys = read_keys(old, "to grow it")
    new_rows, old_rows = matches(keys, old_keys, old.array("done"))
    _copy_rows(old, root, new_rows, old_rows)
    kept = np.isin(old_keys, keys)  # an old row is dropped when no new record has its key
    return Growth(reused=len(new_rows), dropped=int((old.array("done") & ~kept).sum()))


def matches(new: np.ndarray, old: np.ndarray, done: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``new`` keys ``(N,)`` found among the done rows of ``old`` keys ``(M,)``, and
    the old row each takes (the first done one of that key): two ``(R,)`` int64 arrays."""
    first: dict[bytes, int] = {}
    for j in np.flatnonzero(done).tolist():
        first.setdefault(old[j], j)
    pairs = [(i, first[k]) for i, k in enumerate(new.tolist()) if k in first]
    if not pairs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows = np.asarray(pairs, dtype=np.int64)
    return rows[:, 0], rows[:, 1]


def _copy_rows(old: Store, root: Path, new_rows: np.ndarray, old_rows: np.ndarray) -> None:
    """Copy old rows into the new store's rows not yet done (whole rows: features, norm,
    loss, tokens, skip code), committed as scored rows are."""
    todo = ~np.load(root / "done.npy")[new_rows]
    new_rows, old_rows = new_rows[todo], old_rows[todo]
    writer = RowWriter(root)
    src = {name: old.array(name) for name in ("norms", "loss", "ntokens", "skipped")}
    feats = old.features
    step = max(1, (1 << 24) // max(old.dim, 1))
    for s in range(0, len(new_rows), step):
        to, frm = new_rows[s:s + step], old_rows[s:s + step]
        writer.write(to, np.asarray(feats[frm]), src["norms"][frm], src["loss"][frm],
                     src["ntokens"][frm], src["skipped"][frm])
    writer.close()


def swap(run: Path) -> Path:
    """Put the complete ``RUN/.store.next`` in the place of ``RUN/store`` (which is deleted
    only after); returns the store folder."""
    store, nxt, prev = run / STORE_DIR, run / NEXT_DIR, run / PREVIOUS_DIR
    if not Store.open(nxt).complete:
        raise StoreError(f"{nxt}: not complete; fix: run the same `tive score` again")
    shutil.rmtree(prev, ignore_errors=True)
    os.replace(store, prev)
    os.replace(nxt, store)
    shutil.rmtree(prev)
    return store

