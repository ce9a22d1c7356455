"""The notebook door: ``tive.value_estimate`` builds a :class:`~tive.report.Report`.

It only orchestrates: data (:mod:`tive.data`, :mod:`tive.tasks`) and features
(:mod:`tive.store` or arrays) in, values (:mod:`tive.values`) out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tive import values as val
from tive.data import Mixture, load_mixture
from tive.errors import ConfigError, DataError
from tive.report import Report
from tive.store import SKIP_REASONS, Store
from tive.tasks import label_tasks

DataArg = str | os.PathLike | Mixture | None


def value_estimate(
    *,
    store: str | os.PathLike | Store | None = None,
    features: np.ndarray | None = None,
    norms: np.ndarray | None = None,
    tasks: Sequence[str] | None = None,
    data: DataArg = None,
    loss: np.ndarray | None = None,
    ntokens: np.ndarray | None = None,
    task_field: str | None = None,
    image_root: str | os.PathLike | None = None,
    check_images: bool | None = None,
    skip_missing_images: bool = False,
    chunk_rows: int | None = None,
) -> Report:
    """Task and instance values of a mixture, from a feature store or from arrays.

    Args:
        store: a run folder or ``store`` folder written by ``tive score`` / ``tive import``.
        features: ``(N, k)`` projected gradients (array or memmap), instead of a store.
        norms: ``(N,)`` exact gradient norms, with ``features``.
        tasks: ``(N,)`` task names, with ``features`` when no ``data`` is given.
        data: the mixture (path or :class:`~tive.data.Mixture`): tasks are labelled from it and
            ``Selection.save`` writes records in its format. With a store, it defaults to the
            data the store was built from, and must match it.
        loss, ntokens: optional ``(N,)`` per-record loss and supervised token counts.
        task_field: record field naming the task (default: ``task``, ``dataset``, ``source``,
            else the LLaVA-665K rules).
        image_root: folder that relative image paths resolve against (default: the data's).
        check_images: verify that every referenced image exists (needs ``data``). Default: yes
            for arrays, no for a store (its builder checked them and recorded the skips).
        skip_missing_images: leave records with missing images out instead of raising.
        chunk_rows: feature rows read at a time (default: about 64 MiB).

    Returns:
        a :class:`~tive.report.Report`; call ``.select(budget=0.075)`` on it.
    """
    if (store is None) == (features is None):
        raise ConfigError("value_estimate: pass either store=... or features=... (with norms= "
                          "and tasks= or data=)")
    st: Store | None = None
    if store is not None:
        st = store if isinstance(store, Store) else Store.open(store)
        arrays = _store_arrays(st)
        if data is None:
            data = st.meta["data"]["path"]
            if not Path(data).exists():
                raise DataError(f"{data}: the data this store was built from is gone; fix: "
                                f"pass its current location with --data / data=")
        task_field = task_field or st.meta.get("settings", {}).get("task_field")
    else:
        arrays = _given_arrays(features, norms, loss, ntokens)
    mixture = _mixture(data, task_field)
    n = arrays["norms"].shape[0]
    left_out: dict[str, np.ndarray] = dict(arrays.pop("left_out", {}))
    if mixture is not None:
        _check_rows(mixture, n, st)
        labels = label_tasks(mixture)
        task_arr, inferred, keys = labels.tasks, labels.inferred, mixture.keys
        if check_images if check_images is not None else st is None:
            left_out["missing-image"] = mixture.check_images(image_root, skip_missing_images)
    else:
        if tasks is None:
            raise ConfigError("value_estimate: features without tasks; pass tasks= (one name "
                              "per row) or data= (tasks are inferred from the records)")
        task_arr = np.asarray([str(t) for t in tasks], dtype=object)
        if len(task_arr) != n:
            raise ConfigError(f"value_estimate: {len(task_arr)} tasks for {n} feature rows")
        inferred, keys = None, np.arange(n, dtype=np.uint64)
    return _report(arrays, task_arr, keys, left_out, mixture, inferred, chunk_rows,
                   source=_source(st, mixture))


def _report(arrays: dict[str, Any], tasks: np.ndarray, keys: np.ndarray,
            left_out: dict[str, np.ndarray], mixture: Mixture | None,
            inferred: np.ndarray | None, chunk_rows: int | None,
            source: dict[str, Any]) -> Report:
    features, norms = arrays["features"], arrays["norms"]
    left_out["non-finite-norm"] = ~np.isfinite(norms)
    names, codes = np.unique(tasks.astype(str), return_inverse=True)
    valid = ~np.any(list(left_out.values()), axis=0)
    iv, finite = val.instance_values(features, codes, len(names), valid, chunk_rows)
    left_out["non-finite-feature"] = ~finite
    valid = np.ones(len(norms), dtype=bool)
    invalid: dict[str, int] = {}
    for reason, mask in left_out.items():  # each record counted under its first reason
        count = int((mask & valid).sum())
        if count:
            invalid[reason] = count
        valid &= ~mask
    tv = val.task_values(norms, codes, len(names), valid)
    return Report(tasks=tasks, task_values={str(t): float(v) for t, v in zip(names, tv)},
                  instance_values=iv, valid=valid, invalid=invalid,
                  norms=np.asarray(norms, dtype=np.float64), loss=arrays["loss"],
                  ntokens=arrays["ntokens"], keys=keys, mixture=mixture, inferred=inferred,
                  source=source)


def _store_arrays(st: Store) -> dict[str, Any]:
    done, skipped = st.array("done"), st.array("skipped")
    left_out = {"not-scored": ~done}
    for code, reason in SKIP_REASONS.items():
        left_out[reason] = skipped == code
    return {"features": st.features, "norms": st.array("norms"), "loss": st.array("loss"),
            "ntokens": st.array("ntokens"), "left_out": left_out}


def _given_arrays(features: Any, norms: Any, loss: Any, ntokens: Any) -> dict[str, Any]:
    if norms is None:
        raise ConfigError("value_estimate: features= needs norms= (exact gradient norms, one "
                          "per row)")
    features = features if isinstance(features, np.ndarray) else np.asarray(features)
    norms = np.asarray(norms, dtype=np.float64)
    if features.ndim != 2 or norms.shape != (features.shape[0],):
        raise ConfigError(f"value_estimate: features {features.shape} and norms {norms.shape}; "
                          f"expected (N, k) and (N,)")
    n = features.shape[0]
    loss = np.full(n, np.nan) if loss is None else np.asarray(loss, dtype=np.float64)
    ntokens = np.full(n, -1) if ntokens is None else np.asarray(ntokens, dtype=np.int64)
    for name, arr in (("loss", loss), ("ntokens", ntokens)):
        if arr.shape != (n,):
            raise ConfigError(f"value_estimate: {name} has shape {arr.shape}; expected ({n},)")
    return {"features": features, "norms": norms, "loss": loss, "ntokens": ntokens}


def _mixture(data: DataArg, task_field: str | None) -> Mixture | None:
    if data is None or isinstance(data, Mixture):
        return data
    return load_mixture(data, task_field=task_field)


def _check_rows(mixture: Mixture, n: int, st: Store | None) -> None:
    if st is not None:
        st.check_data(mixture.fingerprint, len(mixture), mixture.path)
    elif len(mixture) != n:
        raise DataError(f"{mixture.path}: {len(mixture):,} records but {n:,} feature rows; "
                        f"expected one row per record, in the data's order")


def _source(st: Store | None, mixture: Mixture | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if st is not None:
        out["store"] = str(st.root)
    if mixture is not None:
        out["data"] = str(mixture.path)
    return out
