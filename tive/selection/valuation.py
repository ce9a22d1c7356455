"""Valuation: a :class:`~tive.selection.report.Report` of task and instance values, from a
feature store (:func:`from_store`) or from arrays computed elsewhere (:func:`from_arrays`).

The records come from :mod:`tive.data` (labels and content keys kept in the run's cache by
:mod:`tive.data.cache`), the features from :mod:`tive.store.format`, the values from
:mod:`tive.selection.values`, kept for the next selection by :mod:`tive.selection.value_cache`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tive.data.cache import load_labelled
from tive.data.mixture import Mixture, load_mixture
from tive.data.tasks import factorize, label_tasks
from tive.errors import ConfigError, DataError
from tive.models.skips import BY_CODE
from tive.selection import value_cache as vc, values as val
from tive.selection.report import Report
from tive.selection.settings import TaskValue, task_value_named
from tive.store.format import Store

DataArg = str | os.PathLike | Mixture | None


def task_value_kind(task_value: Any, paper: bool) -> TaskValue:
    """The kind of task values asked for (checked before any work is done)."""
    kind = task_value_named("norm" if task_value is None else task_value)
    if paper and kind is not TaskValue.NORM:
        raise ConfigError(f"task_value={kind}: paper=True values tasks as the authors did "
                          f"(task_value='norm'); fix: leave out task_value or paper")
    return kind


def as_asked(report: Report, paper: bool, task_value: TaskValue) -> Report:
    """The report as asked: the authors' selection or not, and the kind of task values."""
    report = report.with_task_value(task_value)
    report.paper = paper
    return report


def from_store(st: Store, data: DataArg | bool, task_field: str | None,
               image_root: Any, check_images: bool, skip_missing_images: bool,
               chunk_rows: int | None) -> Report:
    """The values of a complete store, with the records of ``data`` (default: the data the
    store was built from; ``False``: the store's own index, no records)."""
    st.require_complete()
    cache = (st.root.parent / vc.CACHE_DIR, vc.store_identity(st.root))
    arrays = _store_arrays(st)
    left_out: dict[str, np.ndarray] = arrays.pop("left_out")
    source = {"store": str(st.root)}
    if data is False:
        index = st.index()
        tasks = np.array([e.task for e in index], dtype=object)
        keys = np.array([e.key for e in index], dtype=np.uint64)
        return build_report(arrays, tasks, keys, left_out, None, None, chunk_rows, source, cache)
    if data is None:
        data = st.meta["data"]["path"]
        if not Path(data).exists():
            raise DataError(f"{data}: the data this store was built from is gone; fix: pass "
                            f"its current location with --data / data=")
    field = task_field or st.meta.get("settings", {}).get("task_field")
    if isinstance(data, Mixture):
        mixture, labels = data, label_tasks(data)
    else:  # labels and keys kept in RUN/cache for the next selection (tive.data.cache)
        mixture, labels = load_labelled(data, field, cache[0])
    st.check_data(mixture.fingerprint, len(mixture), mixture.path)
    if check_images:
        fresh = mixture.check_images(image_root, skip_missing_images)
        left_out["missing-image"] = left_out["missing-image"] | fresh
    root = image_root if image_root is not None else st.meta.get("settings", {}).get("image_root")
    return build_report(arrays, labels.tasks, mixture.keys, left_out, mixture, labels.inferred,
                        chunk_rows, {**source, "data": str(mixture.path), "task_field": field,
                                     "image_root": image_root_of(mixture, root)}, cache)


def from_arrays(features: Any, norms: Any, tasks: Sequence[str] | None, data: DataArg,
                loss: Any, ntokens: Any, task_field: str | None, image_root: Any,
                check_images: bool | None, skip_missing_images: bool,
                chunk_rows: int | None, who: str = "value_estimate") -> Report:
    """The values of features computed elsewhere: ``(N, k)`` features and ``(N,)`` norms, with
    ``tasks`` (one name per row) or ``data`` (the mixture, in the rows' order). ``who`` names
    the caller in errors."""
    arrays = _given_arrays(features, norms, loss, ntokens, who)
    n = arrays["norms"].shape[0]
    if data is None:
        task_arr = np.asarray([str(t) for t in tasks], dtype=object)
        if len(task_arr) != n:
            raise ConfigError(f"{who}: {len(task_arr)} tasks for {n} feature rows")
        return build_report(arrays, task_arr, np.arange(n, dtype=np.uint64), {}, None, None,
                            chunk_rows, source={})
    mixture = mixture_of(data, task_field)
    if len(mixture) != n:
        raise DataError(f"{mixture.path}: {len(mixture):,} records but {n:,} feature rows; "
                        f"expected one row per record, in the data's order")
    left_out = {}
    if check_images is not False:
        left_out["missing-image"] = mixture.check_images(image_root, skip_missing_images)
    labels = label_tasks(mixture)
    return build_report(arrays, labels.tasks, mixture.keys, left_out, mixture,
                        labels.inferred, chunk_rows,
                        source={"data": str(mixture.path), "task_field": task_field,
                                "image_root": image_root_of(mixture, image_root)})


def build_report(arrays: dict[str, Any], tasks: np.ndarray, keys: np.ndarray,
                 left_out: dict[str, np.ndarray], mixture: Mixture | None,
                 inferred: np.ndarray | None, chunk_rows: int | None,
                 source: dict[str, Any], cache: tuple[Path, str] | None = None) -> Report:
    """Values of the rows, and the :class:`Report` holding them.

    ``cache`` is ``(RUN/cache, store identity)`` for a store: its instance values are kept
    there for the next call (:mod:`tive.selection.value_cache`).
    """
    features, norms = arrays["features"], arrays["norms"]
    left_out["non-finite-norm"] = ~np.isfinite(norms)
    names, codes = factorize(tasks)
    valid = ~np.any(list(left_out.values()), axis=0)
    folder, identity = cache if cache is not None else (None, None)
    iv, finite = vc.cached_instance_values(folder, identity, val.instance_values, features,
                                           codes, [str(t) for t in names], valid, chunk_rows)
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
                  source=source, features=features, chunk_rows=chunk_rows,
                  cache=(folder, identity) if folder is not None else None)


def _store_arrays(st: Store) -> dict[str, Any]:
    done, skipped = st.array("done"), st.array("skipped")
    left_out = {"not-scored": ~done}
    for code, reason in BY_CODE.items():
        left_out[str(reason)] = skipped == code
    return {"features": st.features, "norms": st.array("norms"), "loss": st.array("loss"),
            "ntokens": st.array("ntokens"), "left_out": left_out}


def _given_arrays(features: Any, norms: Any, loss: Any, ntokens: Any,
                  who: str) -> dict[str, Any]:
    features = features if isinstance(features, np.ndarray) else np.asarray(features)
    norms = np.asarray(norms, dtype=np.float64)
    if features.ndim != 2 or norms.shape != (features.shape[0],):
        raise ConfigError(f"{who}: features {features.shape} and norms {norms.shape}; "
                          f"expected (N, k) and (N,)")
    negative = np.flatnonzero(norms < 0)
    if len(negative):
        raise ConfigError(f"{who}: norms[{negative[0]}] = {norms[negative[0]]} is "
                          f"negative; expected exact gradient norms (≥ 0)")
    n = features.shape[0]
    loss = np.full(n, np.nan) if loss is None else np.asarray(loss, dtype=np.float64)
    ntokens = np.full(n, -1) if ntokens is None else np.asarray(ntokens, dtype=np.int64)
    for name, arr in (("loss", loss), ("ntokens", ntokens)):
        if arr.shape != (n,):
            raise ConfigError(f"{who}: {name} has shape {arr.shape}; expected ({n},)")
    return {"features": features, "norms": norms, "loss": loss, "ntokens": ntokens}


def image_root_of(mixture: Mixture, image_root: Any) -> str:
    """The absolute folder the mixture's relative image paths resolve against."""
    return str(mixture.image_root(image_root).resolve())


def mixture_of(data: DataArg, task_field: str | None) -> Mixture | None:
    if data is None or isinstance(data, Mixture):
        return data
    return load_mixture(data, task_field=task_field)
