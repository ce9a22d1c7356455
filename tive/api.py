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
from tive import values_cache as vc
from tive.config import TaskValue, task_value_named
from tive.data import Mixture, load_mixture
from tive.errors import ConfigError, DataError
from tive.mixture_cache import load_labelled
from tive.report import Report
from tive.settings import python_api
from tive.skips import BY_CODE
from tive.store import Store
from tive.tasks import factorize, label_tasks

DataArg = str | os.PathLike | Mixture | None


@python_api
def value_estimate(
    *,
    store: str | os.PathLike | Store | None = None,
    features: np.ndarray | None = None,
    norms: np.ndarray | None = None,
    tasks: Sequence[str] | None = None,
    data: DataArg | bool = None,
    loss: np.ndarray | None = None,
    ntokens: np.ndarray | None = None,
    task_field: str | None = None,
    image_root: str | os.PathLike | None = None,
    check_images: bool | None = None,
    skip_missing_images: bool = False,
    chunk_rows: int | None = None,
    model: str | None = None,
    run: str | os.PathLike | None = None,
    reference: str | os.PathLike | None = None,
    score: Any = None,
    warmup: Any = None,
    dtype: str | None = None,
    device: str | None = None,
    force: bool | None = None,
    progress: bool | None = None,
    paper: bool = False,
    task_value: str | None = None,
) -> Report:
    """Task and instance values of a mixture: computed with a model, or from a feature store,
    or from arrays.

    With ``model=`` this is ``tive score`` from a notebook: the warm-up reference is trained
    (unless ``reference=`` is given or ``run`` holds one trained with the same settings), every
    record of ``data`` is scored into ``run/store`` (resuming an interrupted run), and the
    report is built from that store.

    Args:
        model: alias, hub id in the local cache, folder or ``.gguf`` file (needs ``data``).
        run: run folder for the reference and the store, with ``model`` (default
            ``tive-out``).
        reference: a peft adapter folder to score with instead of warming up.
        score: :class:`~tive.score.ScoreConfig` or a dict of its fields (batch size, projector,
            ...), with ``model``.
        warmup: :class:`~tive.warmup.WarmupConfig` or a dict of its fields, with ``model``.
        dtype, device: how to load the model (default ``auto``: bf16 on a GPU that has it,
            else fp32; the GPU when there is one).
        force: replace a store or reference made with other settings instead of refusing.
        progress: show progress bars (default: yes).
        store: a run folder or ``store`` folder written by ``tive score`` / ``tive import``;
            it brings features, norms, losses, token counts and (without data) tasks.
        features: ``(N, k)`` projected gradients (array or memmap), instead of a store.
        norms: ``(N,)`` exact gradient norms, with ``features``.
        tasks: ``(N,)`` task names, with ``features`` when no ``data`` is given.
        data: the mixture (path or :class:`~tive.data.Mixture`): tasks are labelled from it and
            ``Selection.save`` writes records in its format. With a store it defaults to the
            data the store was built from and must match it; ``data=False`` uses the store's
            own index (tasks, keys) and no data (``save`` then writes row indices).
        loss, ntokens: optional ``(N,)`` per-record loss and supervised token counts.
        task_field: record field naming the task (default: ``task``, ``dataset``, ``source``,
            else the LLaVA-665K rules).
        image_root: folder that relative image paths resolve against (default: the data's).
        check_images: verify that every referenced image exists (needs ``data``). Default: yes
            for arrays, no for a store (its builder checked them and recorded the skips).
        skip_missing_images: leave records with missing images out instead of raising.
        chunk_rows: feature rows read at a time (default: about 64 MiB).
        paper: the TIVE authors' run exactly: with ``model``, their warm-up and TRAK's
            projection (``score``/``warmup`` may not say otherwise); and the report's
            ``select`` then selects as their script did (see ``tive select --paper``).
        task_value: what the report's task values are, and what its ``select`` weighs quotas
            by: ``norm`` (default, the authors'), ``coherence``, ``mean-gradient`` or
            ``progress`` (docs/design.md, "Task values"); ``paper=True`` allows only
            ``norm``.

    Returns:
        a :class:`~tive.report.Report`; call ``.select(budget=0.075)`` on it.

    Raises:
        ConfigError: arguments that contradict each other or would be ignored.
    """
    task_value = _task_value(task_value, paper)
    if model is not None:
        return _as_asked(_with_model(model, data, run or "tive-out", reference, score, warmup,
                             dtype or "auto", device or "auto", bool(force),
                             progress is not False, task_field, image_root,
                             skip_missing_images, chunk_rows, paper,
                           given=[k for k, v in (("store", store), ("features", features),
                                                 ("norms", norms), ("tasks", tasks),
                                                 ("loss", loss), ("ntokens", ntokens),
                                                 ("check_images", check_images))
                                  if v is not None]), paper, task_value)
    given = [k for k, v in (("run", run), ("reference", reference), ("score", score),
                            ("warmup", warmup), ("dtype", dtype), ("device", device),
                            ("force", force), ("progress", progress)) if v is not None]
    if given:
        raise ConfigError(f"value_estimate: {'=, '.join(given)}= apply only with model=")
    _check_arguments(store=store, features=features, norms=norms, tasks=tasks, data=data,
                     loss=loss, ntokens=ntokens, check_images=check_images,
                     image_root=image_root, skip_missing_images=skip_missing_images)
    if store is not None:
        st = store if isinstance(store, Store) else Store.open(store)
        return _as_asked(_from_store(st, data, task_field, image_root, bool(check_images),
                                  skip_missing_images, chunk_rows), paper, task_value)
    arrays = _given_arrays(features, norms, loss, ntokens)
    n = arrays["norms"].shape[0]
    if data is None:
        task_arr = np.asarray([str(t) for t in tasks], dtype=object)
        if len(task_arr) != n:
            raise ConfigError(f"value_estimate: {len(task_arr)} tasks for {n} feature rows")
        return _as_asked(_report(arrays, task_arr, np.arange(n, dtype=np.uint64), {}, None, None,
                              chunk_rows, source={}), paper, task_value)
    mixture = _mixture(data, task_field)
    if len(mixture) != n:
        raise DataError(f"{mixture.path}: {len(mixture):,} records but {n:,} feature rows; "
                        f"expected one row per record, in the data's order")
    left_out = {}
    if check_images is not False:
        left_out["missing-image"] = mixture.check_images(image_root, skip_missing_images)
    labels = label_tasks(mixture)
    return _as_asked(_report(arrays, labels.tasks, mixture.keys, left_out, mixture,
                          labels.inferred, chunk_rows,
                          source={"data": str(mixture.path),
                                  "image_root": _root(mixture, image_root)}), paper, task_value)


def _root(mixture: Mixture, image_root: Any) -> str:
    """The absolute folder the mixture's relative image paths resolve against."""
    return str(mixture.image_root(image_root).resolve())


def _task_value(task_value: Any, paper: bool) -> TaskValue:
    """The kind of task values asked for (checked before any work is done)."""
    kind = task_value_named("norm" if task_value is None else task_value)
    if paper and kind is not TaskValue.NORM:
        raise ConfigError(f"task_value={kind}: paper=True values tasks as the authors did "
                          f"(task_value='norm'); fix: leave out task_value or paper")
    return kind


def _as_asked(report: Report, paper: bool, task_value: TaskValue) -> Report:
    """The report as asked: the authors' selection or not, and the kind of task values."""
    report = report.with_task_value(task_value)
    report.paper = paper
    return report


def _with_model(model: str, data: Any, run: Any, reference: Any, score: Any, warmup: Any,
                dtype: str, device: str, force: bool, progress: bool, task_field: str | None,
                image_root: Any, skip_missing_images: bool, chunk_rows: int | None,
                paper: bool, given: list[str]) -> Report:
    """Score ``data`` with ``model`` into ``run/store``, then report from that store."""
    from tive.score import ScoreConfig, run_score
    from tive.warmup import WarmupConfig

    if given:
        raise ConfigError(f"value_estimate: model= computes the features; leave out "
                          f"{'=, '.join(given)}=")
    if data is None or data is False:
        raise ConfigError("value_estimate: model= needs data= (the mixture to score)")
    config = _config(ScoreConfig, score, "score", {"paper": paper})
    if reference is not None and warmup is not None:
        raise ConfigError("value_estimate: reference= is a trained adapter; leave out warmup=")
    warm = _config(WarmupConfig, warmup, "warmup",
                   {"max_length": config.max_length, "paper": paper})
    mixture = _mixture(data, task_field)
    summary = run_score(model, mixture, run, reference=reference, config=config, warmup=warm,
                        dtype=dtype, device=device, task_field=task_field,
                        image_root=image_root, skip_missing_images=skip_missing_images,
                        force=force, progress=progress, echo=print if progress else None)
    return _from_store(Store.open(summary.store), mixture, task_field, image_root, False,
                       skip_missing_images, chunk_rows)


def _config(cls: type, value: Any, name: str, defaults: dict[str, Any]) -> Any:
    """``value`` as a ``cls`` (it may be one already, a dict of its fields, or None)."""
    from dataclasses import fields

    if isinstance(value, cls):
        return value
    value = dict(value or {})
    known = [f.name for f in fields(cls)]
    unknown = [k for k in value if k not in known]
    if unknown:
        raise ConfigError(f"value_estimate: {name}= has no setting {unknown[0]!r}; expected "
                          f"some of {', '.join(known)}")
    return cls(**{**defaults, **value})


def _check_arguments(**a: Any) -> None:
    """Refuse argument combinations where something would be silently ignored."""
    if (a["store"] is None) == (a["features"] is None):
        raise ConfigError("value_estimate: pass either store=... or features=... (with norms= "
                          "and tasks= or data=)")
    if a["store"] is not None:
        given = [k for k in ("features", "norms", "tasks", "loss", "ntokens") if a[k] is not None]
        if given:
            raise ConfigError(f"value_estimate: store= brings its own features, norms, losses "
                              f"and tasks; leave out {'=, '.join(given)}=")
    else:
        if a["norms"] is None:
            raise ConfigError("value_estimate: features= needs norms= (exact gradient norms, "
                              "one per row)")
        if a["data"] is False:
            raise ConfigError("value_estimate: data=False only applies with store=")
        if (a["tasks"] is None) == (a["data"] is None):
            raise ConfigError("value_estimate: give tasks= (one name per row) or data= (tasks "
                              "are read or inferred from the records), not both or neither")
    no_data = a["data"] is False or (a["data"] is None and a["store"] is None)
    checking = a["check_images"] if a["check_images"] is not None else a["store"] is None
    if no_data and a["check_images"]:
        raise ConfigError("value_estimate: check_images=True needs data= (the records name "
                          "the images)")
    if (a["image_root"] is not None or a["skip_missing_images"]) and (no_data or not checking):
        raise ConfigError("value_estimate: image_root= and skip_missing_images= apply only "
                          "when images are checked (check_images=True, with data)")


def _from_store(st: Store, data: DataArg | bool, task_field: str | None,
                image_root: Any, check_images: bool, skip_missing_images: bool,
                chunk_rows: int | None) -> Report:
    st.require_complete()
    cache = (st.root.parent / vc.CACHE_DIR, vc.store_identity(st.root))
    arrays = _store_arrays(st)
    left_out: dict[str, np.ndarray] = arrays.pop("left_out")
    source = {"store": str(st.root)}
    if data is False:
        index = st.index()
        tasks = np.array([e.task for e in index], dtype=object)
        keys = np.array([e.key for e in index], dtype=np.uint64)
        return _report(arrays, tasks, keys, left_out, None, None, chunk_rows, source, cache)
    if data is None:
        data = st.meta["data"]["path"]
        if not Path(data).exists():
            raise DataError(f"{data}: the data this store was built from is gone; fix: pass "
                            f"its current location with --data / data=")
    field = task_field or st.meta.get("settings", {}).get("task_field")
    if isinstance(data, Mixture):
        mixture, labels = data, label_tasks(data)
    else:  # labels and keys kept in RUN/cache for the next selection (tive.mixture_cache)
        mixture, labels = load_labelled(data, field, cache[0])
    st.check_data(mixture.fingerprint, len(mixture), mixture.path)
    if check_images:
        fresh = mixture.check_images(image_root, skip_missing_images)
        left_out["missing-image"] = left_out["missing-image"] | fresh
    root = image_root if image_root is not None else st.meta.get("settings", {}).get("image_root")
    return _report(arrays, labels.tasks, mixture.keys, left_out, mixture, labels.inferred,
                   chunk_rows, {**source, "data": str(mixture.path),
                                "image_root": _root(mixture, root)}, cache)


def _report(arrays: dict[str, Any], tasks: np.ndarray, keys: np.ndarray,
            left_out: dict[str, np.ndarray], mixture: Mixture | None,
            inferred: np.ndarray | None, chunk_rows: int | None,
            source: dict[str, Any], cache: tuple[Path, str] | None = None) -> Report:
    """Values of the rows, and the :class:`Report` holding them.

    ``cache`` is ``(RUN/cache, store identity)`` for a store: its instance values are kept
    there for the next call (:mod:`tive.values_cache`).
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


def _given_arrays(features: Any, norms: Any, loss: Any, ntokens: Any) -> dict[str, Any]:
    features = features if isinstance(features, np.ndarray) else np.asarray(features)
    norms = np.asarray(norms, dtype=np.float64)
    if features.ndim != 2 or norms.shape != (features.shape[0],):
        raise ConfigError(f"value_estimate: features {features.shape} and norms {norms.shape}; "
                          f"expected (N, k) and (N,)")
    negative = np.flatnonzero(norms < 0)
    if len(negative):
        raise ConfigError(f"value_estimate: norms[{negative[0]}] = {norms[negative[0]]} is "
                          f"negative; expected exact gradient norms (≥ 0)")
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


