"""``RUN/target/``: the features of the records a user wants the model to get better at
(docs/design.md, "Targeted selection").

The folder is a store of the same format as ``RUN/store`` (:mod:`tive.store.format`), written by
``tive score --target VAL`` (the same reference model, projector and settings as the store, in
the same session) or by ``tive import --target-features F.npy --target-data VAL``. Its features
are comparable with the store's only when both come from the same reference and projection:
:func:`reference_identity` says what that is for a store, and :func:`open_target` refuses a
target whose reference identity is not the store's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from tive import __version__
from tive.data.mixture import Mixture
from tive.errors import DataError, StoreError
from tive.store.format import STORE_DIR, IndexEntry, Store
from tive.store.writers import write_store

TARGET_DIR = "target"
# identity keys of a scored store that shape its features (its data does not)
REFERENCE_KEYS = ("model", "dtype", "adapter", "adapter_dtype", "gradient_dim", "projector",
                  "max_length", "checkpoints")


def reference_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """What a store's features depend on besides its records: for a scored store its model,
    weights' type, adapter digest, gradient length, projector and maximum length; for an
    imported store where the features came from and the projector entry; for an imported
    target the reference identity of the store it was imported for (``meta["reference"]``)."""
    if isinstance(meta.get("reference"), dict):
        return meta["reference"]
    identity = meta.get("identity")
    if isinstance(identity, dict):
        return {k: identity.get(k) for k in REFERENCE_KEYS}
    return {"source": meta.get("source"), "projector": meta.get("projector")}


def target_root(run: str | os.PathLike) -> Path:
    """``RUN/target`` for a run folder (or a store folder inside one, or the target itself)."""
    root = Path(run)
    if root.name == STORE_DIR and (root / "meta.json").exists():
        root = root.parent
    return root if root.name == TARGET_DIR and (root / "meta.json").exists() \
        else root / TARGET_DIR


def open_target(where: str | os.PathLike, store: Store) -> Store:
    """The complete target at ``where`` (a run folder or a target folder), checked against
    ``store``: the same feature dimension and reference identity.

    Raises:
        StoreError: no target there, an unfinished one, or one from another reference or
            projector (each difference named, with the remedy).
    """
    root = target_root(where)
    if not (root / "meta.json").exists():
        raise StoreError(f"{root}: no target features here; fix: tive score ... --target VAL "
                         f"(the records to get better at), or tive import --target-features "
                         f"F.npy --target-data VAL")
    target = Store.open(root)
    if not target.complete:
        raise StoreError(f"{root}: the target is only partly scored; fix: run the same tive "
                         f"score ... --target command again (it resumes)")
    have, want = reference_identity(target.meta), reference_identity(store.meta)
    diffs = [k for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
    if diffs or target.dim != store.dim:
        what = ", ".join(diffs) or f"dimension {target.dim} → {store.dim}"
        raise StoreError(f"{root}: made with another reference or projector than the store "
                         f"{store.root} ({what} differ); its features cannot be compared; fix: "
                         f"score the target again with the store's settings (tive score ... "
                         f"--target VAL --force)")
    return target


def import_target(run: str | os.PathLike, store: Store, mixture: Mixture, tasks: np.ndarray,
                  features: Any, *, source: str, settings: dict[str, Any],
                  feature_dtype: str = "float16", skipped: np.ndarray | None = None,
                  overwrite: bool = False) -> Store:
    """Write ``RUN/target`` from ``features`` ``(M, k)`` of the records of ``mixture`` (M of
    them, task names ``tasks`` ``(M,)``), computed elsewhere with ``store``'s reference and
    projection (the user's word: recorded as the store's reference identity).

    Raises:
        DataError: a shape other than ``(M, store.dim)`` or values that are not real numbers.
    """
    shape, m = tuple(features.shape), len(mixture)
    if len(shape) != 2 or shape[0] != m or shape[1] != store.dim:
        raise DataError(f"--target-features: shape {shape}, but {mixture.path} has {m:,} records "
                        f"and the store {store.dim} features; expected ({m}, {store.dim}), one "
                        f"row per target record in its order")
    if features.dtype.kind not in "fiu":
        raise DataError(f"--target-features: holds {features.dtype}; expected real numbers "
                        f"(float32 or float64)")
    index = [IndexEntry(r.id, str(t), int(k)) for r, t, k in zip(mixture, tasks, mixture.keys)]
    meta = {"tive_version": __version__, "source": source, "model": None, "adapter": None,
            "key_parameters": None, "projector": {"type": "imported", "seed": None},
            "data": {"path": str(mixture.path.resolve()), "format": mixture.container,
                     "schema": mixture.schema, "fingerprint": mixture.fingerprint},
            "settings": settings, "reference": reference_identity(store.meta)}
    return write_store(target_root(run), features=features, norms=np.full(m, np.nan),
                       index=index, meta=meta, feature_dtype=feature_dtype, skipped=skipped,
                       overwrite=overwrite)
