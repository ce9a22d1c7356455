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
from tive.store.external import check_arrays
from tive.selection.targeted import Target
from tive.store.format import Store
from tive.store.target import open_target, target_root

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
    check_options("value_estimate", task_field, image_root, chunk_rows, data)
    st.require_complete()
    report = _from_store(st, data, task_field, image_root, check_images, skip_missing_images,
                         chunk_rows)
    if (target_root(st.root.parent) / "meta.json").exists():  # opened when a method needs it
        report.target = lambda: Target.of_store(open_target(st.root.parent, st))
    return report


def target_of(target: Any, st: Store | None, k: int) -> Target | None:
    """The target ``value_estimate(target=...)`` names: a target store (``RUN/target``, or
    the run folder holding one) checked against ``st``, or ``(features, tasks)`` arrays."""
    if target is None:
        return None
    if isinstance(target, dict):
        target = (target.get("features"), target.get("tasks"))
    if isinstance(target, tuple) and len(target) == 2:
        return Target.of_arrays(target[0], target[1], k)
    if st is None:
        raise ConfigError("value_estimate: with features=, target= is (features, tasks): the "
                          "target records' (M, k) features and (M,) task names")
    return Target.of_store(open_target(target.root if isinstance(target, Store) else target, st))


def _from_store(st: Store, data: DataArg | bool, task_field: str | None, image_root: Any,
                check_images: bool, skip_missing_images: bool,
                chunk_rows: int | None) -> Report:
    """:func:`from_store` without its target."""
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
        if data is None:
            raise DataError(f"{st.root / 'meta.json'}: records no data path (data.path is "
                            f"null); fix: pass the mixture with --data / data=")
        if not os.path.exists(data):
            raise DataError(f"{data}: the data this store was built from (data.path in "
                            f"{st.root / 'meta.json'}) is gone; fix: pass its current location "
                            f"with --data / data=")
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
    check_options(who, task_field, image_root, chunk_rows, data)
    if tasks is not None and (isinstance(tasks, (str, bytes)) or not hasattr(tasks, "__len__")):
        raise ConfigError(f"{who}: tasks= is a {type(tasks).__name__}; expected one task name "
                          f"per row (a list or array)")
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


def check_options(who: str, task_field: Any, image_root: Any, chunk_rows: Any,
                  data: Any) -> None:
    """The types of the Python API's plain arguments (the command line's options are typed by
    click): a wrong one is a :class:`ConfigError`, never a ``TypeError`` later."""
    def wrong(name: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{who}: {name}={value!r:.60} is a {type(value).__name__}; expected "
                           f"{expected}")

    if task_field is not None and not isinstance(task_field, str):
        raise wrong("task_field", task_field, "a field name (str)")
    if image_root is not None and not isinstance(image_root, (str, os.PathLike)):
        raise wrong("image_root", image_root, "a folder (str or path)")
    if chunk_rows is not None and (isinstance(chunk_rows, (bool, np.bool_)) or not isinstance(
            chunk_rows, (int, np.integer)) or chunk_rows < 1):
        raise wrong("chunk_rows", chunk_rows, "a positive integer")
    if data not in (None, False) and not isinstance(data, (str, os.PathLike, Mixture)):
        raise wrong("data", data, "a mixture path or Mixture")


def _given_arrays(features: Any, norms: Any, loss: Any, ntokens: Any,
                  who: str) -> dict[str, Any]:
    """The arrays given to the Python API, checked as ``tive import`` checks its files
    (:func:`tive.store.external.check_arrays`), with losses and token counts filled in."""
    given = {"features": features, "norms": norms, "loss": loss, "ntokens": ntokens}
    for name, value in given.items():
        if value is not None and not isinstance(value, np.ndarray):
            try:
                given[name] = np.asarray(value)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"{who}: {name}= is not an array ({str(e)[:80]}); expected "
                                  f"numbers") from None
    n = len(given["norms"]) if given["norms"].ndim == 1 else -1
    label = lambda name: f"{who}: {name}"  # noqa: E731
    if n < 0:
        raise ConfigError(f"{label('norms')} has shape {given['norms'].shape}; expected (N,)")
    arrays = check_arrays({k: v for k, v in given.items() if v is not None}, n, "norms", label)
    arrays["norms"] = np.asarray(arrays["norms"], dtype=np.float64)
    arrays["loss"] = (np.full(n, np.nan) if loss is None
                      else np.asarray(arrays["loss"], dtype=np.float64))
    arrays.setdefault("ntokens", np.full(n, -1, dtype=np.int64))
    return arrays


def image_root_of(mixture: Mixture, image_root: Any) -> str:
    """The absolute folder the mixture's relative image paths resolve against."""
    return str(mixture.image_root(image_root).resolve())


def mixture_of(data: DataArg, task_field: str | None) -> Mixture | None:
    if data is None or isinstance(data, Mixture):
        return data
    return load_mixture(data, task_field=task_field)
