"""The selection methods ``tive select`` knows, one :class:`MethodSpec` each (docs/design.md,
"Adding things").

A spec names its method, says which selection settings it takes, whether and how it shares
the budget among tasks, and where the function that chooses records lives (in
:mod:`tive.selection.choosers`, imported only when a selection runs: ``tive --help`` reads this table
without numpy). :class:`tive.selection.settings.Method` and the ``--method`` choices are made from it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Union

from tive.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

QUOTAS = ("value", "size", "equal", "setting", "target")  # how a per-task method weighs its
#   tasks (target: by their alignment with the target, tive.selection.targeted)


class TaskChooser(Protocol):
    """The contract of a per-task method: ``n`` rows of the task's ``members`` (repeats when
    ``n`` exceeds them), given the report, the :class:`~tive.selection.settings.SelectConfig`
    and ``noise``, ``(N,)`` seeded uniforms (the random draws and the tie-break)."""

    def __call__(self, report: Any, config: Any, members: np.ndarray, n: int,
                 noise: np.ndarray) -> np.ndarray: ...


class MixtureMetric(Protocol):
    """The contract of a method over the whole mixture: a ``(N,)`` metric whose largest finite
    values are taken (ties broken by ``noise``)."""

    def __call__(self, report: Any, noise: np.ndarray) -> np.ndarray: ...


Chooser = Union[TaskChooser, MixtureMetric]


@dataclass(frozen=True)
class MethodSpec:
    """One selection method.

    Attributes:
        name: its ``--method`` value.
        help: a phrase for ``--help`` (empty: the name says it).
        options: the :class:`~tive.selection.settings.SelectConfig` settings it takes; another is refused.
        quotas: per-task methods: how the budget is shared among tasks, ∝ ``value`` (the task
            values), ``size`` (the task's records), ``equal``, or as the ``setting`` ``quota``
            says; None: the method chooses over the whole mixture.
        target: ``module:function`` choosing the records: a :class:`TaskChooser` for a
            per-task method, a :class:`MixtureMetric` for one over the whole mixture.
        needs_features: it reads the features themselves (a report built without them
            cannot use it).
        needs_target: it values records against target features (``RUN/target``,
            :mod:`tive.selection.targeted`).
    """

    name: str
    help: str
    options: frozenset[str]
    quotas: str | None
    target: str
    needs_features: bool = False
    needs_target: bool = False

    @property
    def by_task(self) -> bool:
        """True when the budget is shared among tasks by quotas."""
        return self.quotas is not None

    def weighs_by_value(self, quota: Any = None) -> bool:
        """True when the task values set the quotas (``quota``: the ``quota`` setting)."""
        return self.quotas == "value" or (self.quotas == "setting" and str(quota) == "value")

    def describe(self) -> str:
        """``name (help)``, for ``--help``."""
        return f"{self.name} ({self.help})" if self.help else self.name

    def chooser(self) -> Chooser:
        """The function choosing the records (:class:`TaskChooser` when :attr:`by_task`, else
        :class:`MixtureMetric`)."""
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)


def _spec(name: str, help: str, options: set[str], quotas: str | None, target: str,
          **more: Any) -> MethodSpec:
    return MethodSpec(name, help, frozenset(options), quotas, f"tive.selection.choosers:{target}", **more)


METHODS: dict[str, MethodSpec] = {m.name: m for m in (
    _spec("tive", "the paper's method", {"strategy", "temperature", "seed", "oversample"},
          "value", "draw"),
    _spec("random", "", {"seed"}, None, "uniform"),
    _spec("random-per-task", "stratified", {"seed", "oversample"}, "size", "draw"),
    _spec("gradnorm", "", set(), None, "gradient_norm"),
    _spec("loss", "", set(), None, "warmup_loss"),
    _spec("length", "largest values first", set(), None, "supervised_length"),
    _spec("balanced", "equal count per task", {"seed", "oversample"}, "equal", "draw"),
    _spec("kmeans", "per task, the records nearest k-means centroids of the features",
          {"seed", "oversample", "clusters", "quota"}, "setting", "nearest_centroids",
          needs_features=True),
    _spec("less", "LESS: each record's largest mean cosine to a target task's examples; "
          "needs a target", set(), None, "less_score", needs_features=True, needs_target=True),
    _spec("tive-target", "TIVE's quotas and draw valued against a target",
          {"strategy", "temperature", "seed", "oversample"}, "target", "target_draw",
          needs_features=True, needs_target=True),
)}


def method_named(name: Any) -> MethodSpec:
    """The spec of method ``name`` (a name or a :class:`~tive.selection.settings.Method`).

    Raises:
        ConfigError: no such method, with the valid names.
    """
    spec = METHODS.get(str(name))
    if spec is None:
        raise ConfigError(f"unknown method {str(name)!r}; choose one of {', '.join(METHODS)}")
    return spec


def method_help() -> str:
    """The ``--method`` help: the paper's method, then the baselines."""
    first, *rest = METHODS.values()
    return f"{first.describe()} or a baseline: {', '.join(m.describe() for m in rest)}."
