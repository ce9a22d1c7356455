"""The notebook door: a mixture's values (a :class:`~tive.selection.report.Report`) in three
ways, each its own entry point, and the one call that does any of them.

* :meth:`Run.score` computes the features with a model: the warm-up reference, then every
  record's gradient features into ``RUN/store`` (:mod:`tive.scoring.run`);
* :meth:`Run.values` values the mixture from that store (or one made by ``tive import``),
  and :meth:`Run.select` chooses a subset from them;
* :func:`values_from_arrays` values features computed elsewhere, given as arrays.

:func:`value_estimate` is the one-call form for notebooks (``model=``, ``store=`` or
``features=``). Nothing here computes: valuation is :mod:`tive.selection.valuation`.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tive.errors import ConfigError
from tive.health.findings import Finding
from tive.scoring.settings import ScoreConfig
from tive.selection import valuation
from tive.selection.report import Report
from tive.selection.subset import Selection
from tive.selection.valuation import DataArg
from tive.settings import python_api
from tive.store.format import Store
from tive.warmup.settings import WarmupConfig

DEFAULT_RUN = "tive-out"


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
    target: Any = None,
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
        score: :class:`~tive.scoring.run.ScoreConfig` or a dict of its fields (batch size, projector,
            ...), with ``model``.
        warmup: :class:`~tive.warmup.training.WarmupConfig` or a dict of its fields, with ``model``.
        dtype, device: how to load the model (default ``auto``: bf16 on a GPU that has it,
            else fp32; the GPU when there is one).
        force: replace a store or reference made with other settings instead of refusing.
        progress: show progress bars (default: yes).
        store: a run folder or ``store`` folder written by ``tive score`` / ``tive import``;
            it brings features, norms, losses, token counts and (without data) tasks.
        features: ``(N, k)`` projected gradients (array or memmap), instead of a store.
        norms: ``(N,)`` exact gradient norms, with ``features``.
        tasks: ``(N,)`` task names, with ``features`` when no ``data`` is given.
        data: the mixture (path or :class:`~tive.data.mixture.Mixture`): tasks are labelled from it and
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
        target: what the model should get better at, for ``select(method="less")`` and
            ``"tive-target"`` (docs/design.md, "Targeted selection"): with ``model=`` the
            target records (path or Mixture), scored into ``run/target`` with the same
            reference and projector; with ``store=`` a target folder (default: the run's
            ``target/`` when there is one); with either store or features, ``(features,
            tasks)``: ``(M, k)`` target features and ``(M,)`` task names.

    Returns:
        a :class:`~tive.selection.report.Report`; call ``.select(budget=0.075)`` on it.

    Raises:
        ConfigError: arguments that contradict each other or would be ignored.
    """
    task_value = valuation.task_value_kind(task_value, paper)
    if model is not None:
        given = [k for k, v in (("store", store), ("features", features), ("norms", norms),
                                ("tasks", tasks), ("loss", loss), ("ntokens", ntokens),
                                ("check_images", check_images)) if v is not None]
        if given:
            raise ConfigError(f"value_estimate: model= computes the features; leave out "
                              f"{'=, '.join(given)}=")
        run_ = Run(run or DEFAULT_RUN)
        mixture = run_._mixture_to_score(data, task_field, paper, score, warmup, reference,
                                         "value_estimate")
        st = run_.score(model, mixture, reference=reference, score=score, warmup=warmup,
                        dtype=dtype or "auto", device=device or "auto", force=bool(force),
                        progress=progress is not False, task_field=task_field,
                        image_root=image_root, skip_missing_images=skip_missing_images,
                        paper=paper, who="value_estimate", target=target)
        return valuation.as_asked(valuation.from_store(st, mixture, task_field, image_root,
                                                       False, skip_missing_images, chunk_rows),
                                  paper, task_value)
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
        report = valuation.from_store(st, data, task_field, image_root, bool(check_images),
                                      skip_missing_images, chunk_rows)
    else:
        report = valuation.from_arrays(features, norms, tasks, data, loss, ntokens, task_field,
                                       image_root, check_images, skip_missing_images,
                                       chunk_rows)
    if target is not None:
        report.target = valuation.target_of(target, st if store is not None else None,
                                            report.features.shape[1])
    return valuation.as_asked(report, paper, task_value)


class Run:
    """A run folder (``tive-out`` by default): ``reference/`` (the warm-up adapter), ``store/``
    (the features) and ``cache/``, the same folder ``tive score``, ``tive select`` and
    ``tive report`` work in.

    Example::

        run = tive.api.Run("tive-out")
        run.score("examples/llava-smollm2", "examples/llava_mini/mix.json",
                  score={"max_length": 512}, warmup={"global_batch": 4, "lr": 2e-4})
        report = run.values()                  # the data the store was built from
        run.select(0.15, exclude=["textcaps"]).save("subset.json")
    """

    def __init__(self, folder: str | os.PathLike = DEFAULT_RUN) -> None:
        self.folder = Path(folder)

    def __repr__(self) -> str:
        return f"Run({str(self.folder)!r})"

    @python_api
    def score(self, model: str, data: DataArg, *, reference: str | os.PathLike | None = None,
              score: Any = None, warmup: Any = None, dtype: str = "auto",
              device: str = "auto", force: bool = False, progress: bool = True,
              task_field: str | None = None, image_root: str | os.PathLike | None = None,
              skip_missing_images: bool = False, paper: bool = False,
              who: str = "Run.score", target: DataArg = None) -> Store:
        """``tive score`` from a notebook: train (or reuse) the warm-up reference, then score
        every record of ``data`` with ``model`` into ``RUN/store``, resuming an interrupted run.

        Args:
            model: alias, hub id in the local cache, folder or ``.gguf`` file.
            data: the mixture (path or :class:`~tive.data.mixture.Mixture`).
            reference: a peft adapter folder to score with instead of warming up.
            score: :class:`~tive.scoring.settings.ScoreConfig` or a dict of its fields.
            warmup: :class:`~tive.warmup.settings.WarmupConfig` or a dict of its fields.
            dtype, device: how to load the model (``auto``: bf16 on a GPU that has it, else
                fp32; the GPU when there is one).
            force: replace a store or reference made with other settings instead of refusing.
            progress: show progress bars.
            paper: the TIVE authors' warm-up and TRAK's projection.
            who: the caller named in errors.
            target: records to score into ``RUN/target`` too (docs/design.md, "Targeted
                selection"), with the same reference, projector and settings.

        Returns:
            the complete :class:`~tive.store.format.Store`.
        """
        from tive.scoring.run import run_score  # torch and transformers, when a run scores

        mixture = self._mixture_to_score(data, task_field, paper, score, warmup, reference, who)
        config = _config(ScoreConfig, score, "score", {"paper": paper}, who)
        warm = _config(WarmupConfig, warmup, "warmup",
                       {"max_length": config.max_length, "paper": paper}, who)
        summary = run_score(model, mixture, self.folder, reference=reference, config=config,
                            warmup=warm, dtype=dtype, device=device, task_field=task_field,
                            image_root=image_root, skip_missing_images=skip_missing_images,
                            force=force, progress=progress, echo=print if progress else None,
                            target=target)
        return Store.open(summary.store)

    @python_api
    def values(self, data: DataArg | bool = None, *, task_field: str | None = None,
               image_root: str | os.PathLike | None = None, check_images: bool = False,
               skip_missing_images: bool = False, chunk_rows: int | None = None,
               paper: bool = False, task_value: str | None = None) -> Report:
        """Task and instance values from the run's store (``value_estimate(store=RUN)``).

        Args:
            data: the mixture; default: the data the store was built from, which it must
                match; ``False``: the store's own index (tasks, keys) and no records.
            check_images, image_root, skip_missing_images: verify the records' images again.
            chunk_rows: feature rows read at a time (default: about 64 MiB).
            paper: the report's ``select`` selects as the TIVE authors did.
            task_value: ``norm`` (default), ``coherence``, ``mean-gradient`` or ``progress``.
        """
        kind = valuation.task_value_kind(task_value, paper)
        if check_images and data is False:
            raise ConfigError("Run.values: check_images=True needs data (the records name the "
                              "images)")
        if (image_root is not None or skip_missing_images) and not check_images:
            raise ConfigError("Run.values: image_root= and skip_missing_images= apply only "
                              "when images are checked (check_images=True)")
        report = valuation.from_store(Store.open(self.folder), data, task_field, image_root,
                                      check_images, skip_missing_images, chunk_rows)
        return valuation.as_asked(report, paper, kind)

    def select(self, budget: str | float | int, *, data: DataArg | bool = None,
               **options: Any) -> Selection:
        """``tive select`` from a notebook: :meth:`values` then
        :meth:`Report.select <tive.selection.report.Report.select>` with ``options``
        (``method``, ``strategy``, ``exclude``, ...)."""
        return self.values(data).select(budget, **options)

    def _mixture_to_score(self, data: DataArg, task_field: str | None, paper: bool,
                          score: Any, warmup: Any, reference: Any, who: str) -> Any:
        """The mixture ``data`` names, once the settings are known to make sense."""
        if data is None or data is False:
            raise ConfigError(f"{who}: model= needs data= (the mixture to score)")
        config = _config(ScoreConfig, score, "score", {"paper": paper}, who)
        if reference is not None and warmup is not None:
            raise ConfigError(f"{who}: reference= is a trained adapter; leave out warmup=")
        _config(WarmupConfig, warmup, "warmup",
                {"max_length": config.max_length, "paper": paper}, who)
        return valuation.mixture_of(data, task_field)


@python_api
def values_from_arrays(features: np.ndarray, norms: np.ndarray, *,
                       tasks: Sequence[str] | None = None, data: DataArg = None,
                       loss: np.ndarray | None = None, ntokens: np.ndarray | None = None,
                       task_field: str | None = None,
                       image_root: str | os.PathLike | None = None,
                       check_images: bool | None = None, skip_missing_images: bool = False,
                       chunk_rows: int | None = None, paper: bool = False,
                       task_value: str | None = None) -> Report:
    """Task and instance values of features computed elsewhere
    (``value_estimate(features=...)``): ``(N, k)`` features and ``(N,)`` exact norms, with
    ``tasks`` (one name per row) or ``data`` (the mixture, in the rows' order, whose images
    are checked unless ``check_images=False``)."""
    kind = valuation.task_value_kind(task_value, paper)
    who = "values_from_arrays"
    if (tasks is None) == (data is None):
        raise ConfigError(f"{who}: give tasks= (one name per row) or data= (tasks are read or "
                          f"inferred from the records), not both or neither")
    checking = data is not None and check_images is not False
    if data is None and check_images:
        raise ConfigError(f"{who}: check_images=True needs data= (the records name the images)")
    if (image_root is not None or skip_missing_images) and not checking:
        raise ConfigError(f"{who}: image_root= and skip_missing_images= apply only when images "
                          f"are checked (with data)")
    report = valuation.from_arrays(features, norms, tasks, data, loss, ntokens, task_field,
                                   image_root, check_images, skip_missing_images, chunk_rows,
                                   who)
    return valuation.as_asked(report, paper, kind)


def check(run: str | os.PathLike = DEFAULT_RUN, *, data: DataArg = None,
          task_field: str | None = None, strict: bool = False) -> list[Finding]:
    """``tive check`` from a notebook: the health checks of a run folder (or a ``store``
    folder), the data it was built from (or ``data``) and the selections saved in it.

    Returns:
        the :class:`~tive.health.findings.Finding` s, each ``.line()`` one line with its fix
        (empty: nothing found).

    Raises:
        HealthError: ``strict`` and a finding is a warning (not a note).
    """
    from tive.health.findings import HealthError, warnings_in
    from tive.health.run import check as run_checks

    found = run_checks(run, data, task_field)
    problems = warnings_in(found)
    if strict and problems:
        raise HealthError(f"{len(problems)} health check(s) failed: "
                          + " | ".join(f.line(strict=True) for f in problems))
    return found


def _config(cls: type, value: Any, name: str, defaults: dict[str, Any], who: str) -> Any:
    """``value`` as a ``cls`` (it may be one already, a dict of its fields, or None)."""
    if isinstance(value, cls):
        return value
    value = dict(value or {})
    known = [f.name for f in fields(cls)]
    unknown = [k for k in value if k not in known]
    if unknown:
        raise ConfigError(f"{who}: {name}= has no setting {unknown[0]!r}; expected "
                          f"some of {', '.join(known)}")
    return cls(**{**defaults, **value})


def _check_arguments(**a: Any) -> None:
    """Refuse argument combinations where something would be silently ignored."""
    if (a["store"] is None) == (a["features"] is None):
        raise ConfigError("value_estimate: pass either store=... or features=... (with norms= "
                          "and tasks= or data=)")
    if a["store"] is not None and not isinstance(a["store"], (str, os.PathLike, Store)):
        raise ConfigError(f"value_estimate: store={a['store']!r:.60} is a "
                          f"{type(a['store']).__name__}; expected a run or store folder")
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
