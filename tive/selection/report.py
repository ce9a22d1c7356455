"""The notebook-facing result of valuation: a :class:`Report` of values, which makes a
:class:`~tive.selection.subset.Selection`.

``Report.select`` is where values become a subset: it resolves the budget, sets per-task quotas
(:mod:`tive.selection.quotas`) and picks records; ``Selection.save``
(:mod:`tive.selection.subset`) hands the subset to :mod:`tive.output.saving`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tive.data.mixture import Mixture
from tive.data.tasks import factorize
from tive.errors import ConfigError
from tive.output.tables import fmt_value, format_table
from tive.selection import quotas as sel, targeted as tg, value_cache as vc, values as val
from tive.selection.methods import MethodSpec, method_named
from tive.selection.settings import (
    AUTHORS_EXCLUDE,
    Budget,
    SelectConfig,
    TaskValue,
    task_value_named,
    weighs_by_value,
)
from tive.selection.subset import Selection
from tive.selection.target_report import target_summary
from tive.store.probe import progress_ratios, read_probe
from tive.settings import named, python_api


@dataclass
class Report:
    """Task and instance values of a mixture.

    Attributes:
        tasks: ``(N,)`` task name of each record (mixture order).
        task_values: task → V(t) of the kind ``task_value`` names (NaN if the task has no
            valid record): by default ``norm``, the mean exact gradient norm of its valid
            records (:data:`tive.selection.values.TASK_VALUES`).
        instance_values: ``(N,)`` mean cosine to the task's members; NaN for invalid records.
        valid: ``(N,)`` bool, records that take part in valuation and selection.
        invalid: reason → number of records left out (``not-scored``, ``missing-image``,
            ``non-finite-norm``, ``non-finite-feature``, store skip reasons).
        norms, loss, ntokens: ``(N,)`` per-record exact gradient norm, warm-up loss (NaN when
            unknown), supervised tokens (-1 when unknown).
        keys: ``(N,)`` uint64 content keys seeding the random draws.
        mixture: the records, when the data was given (needed to write a subset file).
        inferred: ``(N,)`` bool, labels inferred by rules rather than read from a field.
        paper: :meth:`select` follows the TIVE authors exactly unless told otherwise.
        features: ``(N, k)`` projected gradients (a store's memmap or the array given), read
            in chunks by ``--method kmeans``; None when the report was built without them.
        chunk_rows: feature rows read at a time (None: about 64 MiB).
        cache: ``(RUN/cache, store identity)`` when the report comes from a store: what a
            selection computes that the next one can reuse is kept there.
        task_value: what ``task_values`` holds, and what :meth:`select` weighs quotas by
            unless told otherwise (``norm``, ``coherence``, ``mean-gradient`` or ``progress``).
        target: the target records' features (:class:`tive.selection.targeted.Target`, or a
            function opening the run's ``RUN/target`` when first needed), for the methods
            ``less`` and ``tive-target``; None without one.

    """

    tasks: np.ndarray
    task_values: dict[str, float]
    instance_values: np.ndarray
    valid: np.ndarray
    invalid: dict[str, int]
    norms: np.ndarray
    loss: np.ndarray
    ntokens: np.ndarray
    keys: np.ndarray
    mixture: Mixture | None = None
    inferred: np.ndarray | None = None
    source: dict[str, Any] = field(default_factory=dict)
    paper: bool = False
    features: np.ndarray | None = None
    chunk_rows: int | None = None
    cache: tuple[Path, str] | None = None
    task_value: str = "norm"
    target: Any = None

    def __post_init__(self) -> None:
        self._names, codes = factorize(self.tasks)
        self._codes = codes  # (N,) index into self._names
        self._sizes = np.bincount(codes, minlength=len(self._names))
        self._valid_sizes = np.bincount(codes[self.valid], minlength=len(self._names))
        self._targeted: Any = None

    def targeted(self) -> Any:
        """The values against the target (:class:`tive.selection.targeted.TargetValues`),
        computed on first use (the alignment kept in the run's cache for a store).

        Raises:
            ConfigError: the report has no target.
        """
        if self.target is None:
            raise ConfigError("this report has no target (the records to get better at); fix: "
                              "tive score ... --target VAL or tive import --target-features "
                              "F.npy --target-data VAL, or value_estimate(..., target=...)")
        if callable(self.target):  # a run's target, opened (and checked) when first needed
            self.target = self.target()
        if self._targeted is None:
            self._targeted = tg.compute(self.features, self.tasks, self.valid, self.target,
                                        self.chunk_rows, self.cache)
        return self._targeted

    @property
    def task_names(self) -> list[str]:
        """Tasks by decreasing size (ties by name)."""
        sizes = self.sizes
        return sorted(sizes, key=lambda t: (-sizes[t], t))

    @property
    def task_codes(self) -> tuple[list[str], np.ndarray]:
        """The distinct task names, sorted, and ``(N,)`` int64 each record's index into them."""
        return self._names, self._codes

    @property
    def sizes(self) -> dict[str, int]:
        """Records per task (all of them, valid or not)."""
        return {t: int(c) for t, c in zip(self._names, self._sizes)}

    def valid_sizes(self) -> dict[str, int]:
        """Valid records per task."""
        found = {t: int(c) for t, c in zip(self._names, self._valid_sizes)}
        return {t: found[t] for t in self.task_names}

    def target_summary(self) -> dict[str, Any] | None:
        """Per task its alignment with the target and its records nearest to it
        (:func:`tive.selection.target_report.target_summary`); None without a target."""
        return None if self.target is None else target_summary(self)

    def values_of(self, kind: str | TaskValue) -> dict[str, float]:
        """Task → V(t) of kind ``kind`` (``norm``, ``coherence``, ``mean-gradient``,
        ``progress``; see :data:`tive.selection.values.TASK_VALUES`), computed over the valid records.

        ``coherence`` and ``mean-gradient`` read the features once (kept in the run's cache for
        a store); ``progress`` reads the store's ``probe.json``.
        """
        kind = str(task_value_named(kind))
        if kind == self.task_value:
            return dict(self.task_values)
        n = len(self._names)
        if kind == "norm":
            v = val.task_values(self.norms, self._codes, n, self.valid)
        elif kind == "progress":
            v = val.progress_values(val.task_values(self.norms, self._codes, n, self.valid),
                                    self._progress_ratios())
        else:
            v = self._pair_values(kind)
        return {str(t): float(x) for t, x in zip(self._names, v)}

    def with_task_value(self, kind: str | TaskValue) -> Report:
        """This report with ``task_values`` of kind ``kind`` (itself when it has them)."""
        kind = str(task_value_named(kind))
        if kind == self.task_value:
            return self
        return dataclasses.replace(self, task_values=self.values_of(kind), task_value=kind)

    def _progress_ratios(self) -> np.ndarray:
        """``(T,)`` the warm-up's relative drop of each task's held-out loss (the store's
        ``probe.json``, :mod:`tive.store.probe`, read only when asked for)."""
        store = self.source.get("store")
        probe = read_probe(Path(store)) if store else None
        if probe is None:
            raise ConfigError(f"{named('task_value', 'progress')}: needs the losses of records "
                              f"outside the warm-up sample before and after the warm-up, which "
                              f"tive score writes into the store (probe.json); this report has "
                              f"none (imported features, arrays, or a store scored before it "
                              f"existed); fix: tive score --run RUN again (only the probe is "
                              f"computed), or another task value")
        return progress_ratios(self._codes, len(self._names), self.valid, probe)

    def _pair_values(self, kind: str) -> np.ndarray:
        """``(T,)`` ``coherence`` or ``mean-gradient`` (:mod:`tive.selection.values`): one pass over the
        features, kept in the run's cache for a store."""
        if self.features is None:
            raise ConfigError(f"{named('task_value', kind)}: this report has no features (built "
                              f"without a store or features=); fix: value_estimate(store=...) "
                              f"or features=..., or another task value")
        n = len(self._names)
        weights = np.ones(len(self.norms)) if kind == "coherence" else self.norms

        def compute() -> dict[str, np.ndarray]:
            sums, squares = val.weighted_unit_sums(self.features, weights, self._codes, n,
                                                   self.valid, self.chunk_rows)
            counts = np.bincount(self._codes[self.valid], minlength=n)
            pair = val.coherence_values if kind == "coherence" else val.mean_gradient_values
            return {"values": pair(sums, squares, counts)}

        if self.cache is None:
            return compute()["values"]
        folder, identity = self.cache
        key = vc.digest(kind, vc.VERSION, identity, self._codes, self._names, self.valid,
                        self.norms, self.chunk_rows)
        return vc.cached_arrays(folder, "taskvalues", key, compute,
                                lambda a: vc.exact(a, {"values": ((n,), "f")}))["values"]

    def members(self, task: str) -> np.ndarray:
        """Rows of the valid records of ``task``, increasing."""
        return np.flatnonzero(self.valid & (self._codes == self._names.index(task)))

    def count_by_task(self, rows: np.ndarray) -> dict[str, int]:
        """How many of ``rows`` (indices, repeats counted, or a ``(N,)`` mask) each task has,
        in :attr:`task_names` order."""
        counts = np.bincount(self._codes[rows], minlength=len(self._names))
        return {t: int(counts[self._names.index(t)]) for t in self.task_names}

    @python_api
    def select(
        self,
        budget: str | float | int | Budget,
        strategy: str | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        exclude: Sequence[str] = (),
        oversample: bool | None = None,
        method: str = "tive",
        paper: bool | None = None,
        clusters: int | None = None,
        quota: str | None = None,
        task_value: str | None = None,
    ) -> Selection:
        """Choose a subset; see :class:`tive.selection.settings.SelectConfig` for the arguments.

        Defaults where the method uses them: ``strategy="soft"``, ``temperature=1000``,
        ``seed=0``, ``oversample=True``, and for ``method="kmeans"`` ``clusters=None`` (one
        cluster per record of the quota) and ``quota="size"``; passing one the method does not
        use raises. ``task_value`` (where the task values set the quotas; default: the
        report's own, ``norm`` unless :func:`tive.value_estimate` was asked for another) is
        what V(t) is. ``paper`` (default: as :func:`tive.value_estimate` was asked) selects
        exactly as the TIVE authors did.

        Returns:
            a :class:`Selection` whose ``indices`` are mixture rows (repeats where oversampled).
        """
        if task_value is None and not (self.paper if paper is None else paper) \
                and self.task_value != "norm" and weighs_by_value(method, quota):
            task_value = self.task_value  # the report's own kind, where values set quotas
        config = SelectConfig(budget=budget, method=method, strategy=strategy,
                              temperature=temperature, seed=seed, exclude=exclude,
                              oversample=oversample, clusters=clusters, quota=quota,
                              paper=self.paper if paper is None else paper,
                              task_value=task_value)
        return self.select_with(config)

    def select_with(self, config: SelectConfig) -> Selection:
        """:meth:`select` with a ready :class:`SelectConfig`."""
        if config.task_value is not None and str(config.task_value) != self.task_value:
            return self.with_task_value(config.task_value).select_with(config)
        unknown = sorted(set(config.exclude) - set(self.sizes))
        if unknown:
            raise ConfigError(f"{named('exclude', repr(unknown[0]), option='--exclude-task')}: "
                              f"no such task; tasks are "
                              f"{', '.join(self.task_names)}")
        notes = []
        if AUTHORS_EXCLUDE in self.sizes and AUTHORS_EXCLUDE not in config.exclude:
            if config.paper:
                config = dataclasses.replace(config, exclude=(*config.exclude, AUTHORS_EXCLUDE))
            else:
                notes.append(f"note: the TIVE authors left {AUTHORS_EXCLUDE} out of LLaVA-665K "
                             f"(seen in pre-training); to do the same: --exclude-task "
                             f"{AUTHORS_EXCLUDE} (or --paper)")
        budget = config.budget.resolve(len(self.tasks))
        names = [t for t in self.task_names if t not in config.exclude]
        # seeded draws for the random parts; a fixed tie-break for the deterministic ones
        noise = sel.uniforms(self.keys, 0 if config.seed is None else config.seed)
        method = method_named(config.method)
        if method.needs_features and self.features is None:
            raise ConfigError(f"{named('method', method.name)}: this report has no features to "
                              f"{'compare' if method.needs_target else 'cluster'} (built "
                              f"without a store or features=); fix: value_estimate(store=...) "
                              f"or features=..., or another method")
        if method.needs_target:
            self.targeted()  # no target: one clear error before anything else
        if method.by_task:
            indices, quotas = self._by_task(config, method, names, budget, noise)
        else:
            indices = self._global(config, method, budget, noise)
            counts = np.bincount(self._codes[indices], minlength=len(self._names))
            quotas = {t: int(counts[self._names.index(t)]) for t in names}
        repeats = len(indices) - len(np.unique(indices))
        if repeats:
            notes.append(f"note: {repeats:,} of the {len(indices):,} records are repeats "
                         f"(oversampling: a task whose quota exceeds its valid records is taken "
                         f"again); --no-oversample caps each task at its size instead")
        if config.paper and len(indices) < budget:
            notes.append(f"note: {len(indices):,} records, {budget - len(indices):,} short of "
                         f"the budget: --paper truncates each quota as the authors' int() did")
        return Selection(np.sort(indices), quotas, config, budget, self, notes)

    def _by_task(self, config: SelectConfig, method: MethodSpec, names: list[str], budget: int,
                 noise: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        """Quotas per task (∝ the method's weights), then the method's choice in each."""
        sizes = self.valid_sizes()
        names = [t for t in names if sizes[t] > 0]
        if not names:
            raise ConfigError(f"no valid record is left to select from (all tasks excluded or "
                              f"invalid); fix: check "
                              f"{named('exclude', option='--exclude-task')} and the store")
        counts = np.array([sizes[t] for t in names])
        if method.weighs_by_value(config.quota):
            weights = np.array([self.task_values[t] for t in names])
        elif method.quotas == "target":
            weights = np.array([self.targeted().task_values[t] for t in names])
            if not weights.sum() > 0:
                raise ConfigError(f"{named('method', method.name)}: no task's records point "
                                  f"towards the target (every alignment is ≤ 0); fix: "
                                  f"--method less, or check the target")
        elif method.quotas == "equal":
            weights = np.ones(len(names))
        else:
            weights = counts.astype(float)
        if config.paper:
            quota = sel.truncated_quotas(weights, config.budget.exact(len(self.tasks)))
        else:
            quota = sel.quotas(weights, counts, budget, config.oversample)
        choose = method.chooser()
        chosen = [choose(self, config, self.members(t), int(n), noise)
                  for t, n in zip(names, quota)]
        return np.concatenate(chosen), {t: int(n) for t, n in zip(names, quota)}

    def _global(self, config: SelectConfig, method: MethodSpec, budget: int,
                noise: np.ndarray) -> np.ndarray:
        """The ``budget`` rows of largest finite metric over the mixture (ties: ``noise``)."""
        excluded = [self._names.index(t) for t in config.exclude]
        metric = method.chooser()(self, noise)
        pool = self.valid & ~np.isin(self._codes, excluded) & np.isfinite(metric)
        rows = np.flatnonzero(pool)
        if budget > len(rows):
            raise ConfigError(f"{named('budget', f'{budget:,}')} is more than the "
                              f"{len(rows):,} records {named('method', config.method)} can "
                              f"choose from; fix: a smaller budget")
        return rows[sel.top_n(metric[rows], budget, noise[rows])]

    def table(self) -> str:
        """Plain-text table of tasks: records, valid, share, value."""
        sizes, valid, n = self.sizes, self.valid_sizes(), len(self.tasks)
        rows = [(t, f"{sizes[t]:,}", f"{valid[t]:,}", f"{sizes[t] / n:.1%}",
                 fmt_value(self.task_values.get(t, math.nan))) for t in self.task_names]
        return format_table(("task", "records", "valid", "share", self.value_header()), rows)

    def value_header(self) -> str:
        """``value``, or ``value (KIND)`` for a task value other than the authors' ``norm``."""
        return "value" if self.task_value == "norm" else f"value ({self.task_value})"

    def __repr__(self) -> str:
        left = sum(self.invalid.values())
        return (f"<tive.Report: {len(self.tasks):,} records, {len(self.sizes)} tasks"
                f"{f', {left:,} left out' if left else ''}>\n{self.table()}")
