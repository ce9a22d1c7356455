"""Settings of selection, as frozen dataclasses; the CLI builds its options from these fields."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from tive.errors import ConfigError
from tive.selection.methods import METHODS, method_help, method_named
from tive.settings import named, setting, settle


class _Named(str, Enum):
    """A choice that prints as its value."""

    def __str__(self) -> str:
        return self.value


# How records are valued: one member per method of :data:`tive.selection.methods.METHODS` (``tive``, the
# paper's method, is TIVE; ``random-per-task`` is RANDOM_PER_TASK; …).
Method = _Named("Method", {name.upper().replace("-", "_"): name for name in METHODS})
Method.__doc__ = "How records are valued; ``tive`` is the paper's method, the others baselines."


class Strategy(_Named):
    """Within-task choice for ``--method tive``."""

    SOFT = "soft"  # draw without replacement with probability ∝ exp(v / τ) (the authors')
    TOP = "top"  # the n_t records of highest instance value (deterministic)


class QuotaBy(_Named):
    """Per-task quotas for ``--method kmeans``."""

    SIZE = "size"  # each task keeps its share of the mixture (as random-per-task)
    VALUE = "value"  # TIVE's quotas, n_t ∝ V(t)


class TaskValue(_Named):
    """What a task's value V(t) is, where the task values set the quotas (docs/design.md,
    "Task values")."""

    NORM = "norm"  # mean exact gradient norm (the authors')
    COHERENCE = "coherence"  # mean cosine between distinct records of the task
    MEAN_GRADIENT = "mean-gradient"  # norm of the task's mean gradient (distinct pairs)
    PROGRESS = "progress"  # norm × how much the warm-up lowered the task's held-out loss


def task_value_named(value: Any) -> TaskValue:
    """``value`` as a :class:`TaskValue`; an unknown name raises with the choices."""
    return _enum(TaskValue, value, "task_value")


BUDGET_FORMS = ("a fraction below 1 (0.075), a percent (7.5%), or a record count, a plain "
                "integer (50000)")


@dataclass(frozen=True)
class Budget:
    """A subset size in one of three forms that cannot be confused: a fraction below 1
    (``0.075``), a percent up to 100 (``7.5%``), or a record count, a plain integer (``50000``).

    A decimal of 1 or more (``1.0``, ``7.5``) is refused with the forms it may have meant: ``1``
    would select one record and ``1.0`` the whole mixture. ``text`` keeps the budget as written;
    it names output files and appears in reports.
    """

    value: float
    is_fraction: bool
    text: str

    @classmethod
    def parse(cls, given: str | float | int | Budget) -> Budget:
        """Read a budget as written on the command line or passed from Python.

        Raises:
            ConfigError: not a number, not positive, or a decimal of 1 or more.
        """
        if isinstance(given, Budget):
            return given
        if isinstance(given, bool) or not isinstance(given, (str, int, float)):
            raise ConfigError(f"{named('budget', repr(given))}: expected {BUDGET_FORMS}")
        raw = repr(given) if isinstance(given, float) else str(given).strip()
        try:
            if isinstance(given, int) or re.fullmatch(r"[+-]?\d+", raw):
                budget = cls(float(int(raw)), False, raw)
            elif raw.endswith("%"):
                budget = cls(float(raw[:-1]) / 100.0, True, raw)
            else:
                budget = cls(float(raw), True, raw)
        except ValueError:
            raise ConfigError(f"{named('budget', repr(raw))}: not a number; expected "
                              f"{BUDGET_FORMS}") from None
        budget._check()
        return budget

    def _check(self) -> None:
        if not math.isfinite(self.value):
            raise ConfigError(f"{named('budget', self.text)}: not a finite number; expected "
                              f"{BUDGET_FORMS}")
        if self.value <= 0:
            raise ConfigError(f"{named('budget', self.text)}: must be positive; expected "
                              f"{BUDGET_FORMS}")
        if self.text.endswith("%"):
            if self.value > 1:
                raise ConfigError(f"{named('budget', self.text)}: a percent is at most 100%; fix: "
                                  f"100% for the whole mixture, or a record count (an integer)")
            return
        if self.is_fraction and self.value >= 1:
            n = int(self.value)
            alternatives = (["100% for the whole mixture", "1 for one record"]
                            if self.value == 1 else
                            [f"{_pct(self.value)}% for {_pct(self.value)} percent"
                             if self.value <= 100 else "",
                             f"{n} for {n:,} records" if self.value.is_integer() else ""])
            hint = ", ".join(a for a in alternatives if a)
            raise ConfigError(f"{named('budget', self.text)}: a fraction is below 1 (0.075 is "
                              f"7.5%); fix: write "
                              f"{hint or 'a fraction below 1, a percent or a count'}")

    def resolve(self, n_records: int) -> int:
        """Number of records to select, out of ``n_records`` (B = round(p·N) for a fraction)."""
        if self.is_fraction:
            count = int(math.floor(self.value * n_records + 0.5))
            if count < 1:
                raise ConfigError(f"{named('budget', self.text)}: selects no record of "
                                  f"{n_records:,}; fix: a larger fraction or a count")
            return count
        if self.value > n_records:
            raise ConfigError(f"{named('budget', self.text)}: more than the {n_records:,} records "
                              f"of the mixture; fix: at most {n_records}, or a fraction")
        return int(self.value)

    def exact(self, n_records: int) -> float:
        """B before rounding: ``p·N`` for a fraction, the count itself for a count (the TIVE
        authors' quotas are shares of this number, truncated)."""
        self.resolve(n_records)  # the same checks
        return self.value * n_records if self.is_fraction else self.value

    @property
    def name(self) -> str:
        """The budget in file names, one per budget: ``15%`` and ``0.15`` are both ``0.15``
        (a fraction, at 12 significant digits, always with its point: ``100%`` is ``1.0``), a
        count its integer (``1``)."""
        if not self.is_fraction:
            return str(int(self.value))
        text = format(self.value, ".12g")
        return text if "." in text or "e" in text else f"{text}.0"

    def percent_hint(self, n_records: int) -> str | None:
        """For a plain integer up to 100 (which may have meant a percent): ``15 records,
        0.002% of 665,298; for 15 percent write 15%``; else None."""
        if self.is_fraction or self.value > 100:
            return None
        n = int(self.value)
        share = f"{100 * n / n_records:.2g}" if n_records else "0"
        return f"{n:,} record{'s' * (n != 1)}, {share}% of {n_records:,}; for {n} percent " \
               f"write {n}%"

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "kind": "fraction" if self.is_fraction else "count",
                "value": self.value if self.is_fraction else int(self.value)}

    def __str__(self) -> str:
        return self.text


def _pct(value: float) -> str:
    """``value`` written without a trailing ``.0`` (7.5 → "7.5", 1.0 → "1")."""
    return f"{value:g}"


# The TIVE authors' select_data_TIVE.py: soft draw with q = 0.001 (τ = 1000), oversampling,
# quotas int(B·V(t)/ΣV), textcaps left out of LLaVA-665K.
AUTHORS = {"method": Method.TIVE, "strategy": Strategy.SOFT, "temperature": 1000.0,
           "oversample": True, "task_value": TaskValue.NORM}
AUTHORS_EXCLUDE = "textcaps"
DEFAULTS = {"strategy": Strategy.SOFT, "temperature": 1000.0, "seed": 0, "oversample": True,
            "clusters": None, "quota": QuotaBy.SIZE}


@dataclass(frozen=True)
class SelectConfig:
    """How to turn values into a subset. Fields carry the CLI help (see ``tive select --help``).

    ``strategy``, ``temperature``, ``seed`` and ``oversample`` are None when not given; they
    take their defaults where the method uses them and stay None where it does not. Giving one
    that the method does not use (``--temperature`` with ``--strategy top``, ``--seed`` with
    ``--method gradnorm``, …) raises :class:`ConfigError`.
    """

    budget: Budget = field(metadata=setting(
        "Subset size: a fraction below 1 (0.075), a percent (7.5%), or a record count, a "
        "plain integer (50000).", required=True, metavar="P|N|P%"))
    method: Method = field(default=Method.TIVE, metadata=setting(method_help(),
                                                                  show_default=True))
    strategy: Strategy | None = field(default=None, metadata=setting(
        "Within-task choice for tive: soft (draw ∝ exp(v/τ), the authors') or top "
        "(highest instance values).", "soft", choices=Strategy))
    temperature: float | None = field(default=None, metadata=setting(
        "τ of the soft draw. 1000 is the authors' q=0.001 (almost uniform); smaller favours "
        "representative records; inf is uniform.", "1000", type=float))
    seed: int | None = field(default=None, metadata=setting(
        "Seed of the methods that draw: tive and tive-target (their soft draw), random, "
        "random-per-task, balanced, kmeans (its initial centroids).", "0", type=int))
    exclude: tuple[str, ...] = field(default=(), metadata=setting(
        "Task to leave out of valuation and selection (repeatable), e.g. textcaps as the "
        "authors did.", flag="--exclude-task", multiple=True))
    oversample: bool | None = field(default=None, metadata=setting(
        "A quota above its task's size repeats the task (the authors'); --no-oversample caps it "
        "and gives the surplus to the other tasks in proportion to their value.", "oversample",
        flag="--oversample", negatable=True))
    paper: bool = field(default=False, metadata=setting(
        "The TIVE authors' selection exactly: soft draw at τ=1000 with oversampling, quotas "
        "truncated to integers as their int() (the subset may fall a few records short of the "
        "budget), textcaps excluded when present.", is_flag=True))
    clusters: int | None = field(default=None, metadata=setting(
        "k-means clusters per task for kmeans: the task's quota is shared among its clusters "
        "in proportion to their size, nearest records first.", "the task's quota "
        "(one record per centroid)", type=int))
    quota: QuotaBy | None = field(default=None, metadata=setting(
        "Per-task quotas for kmeans: size (each task keeps its share, as random-per-task) or "
        "value (TIVE's, ∝ task value).", "size", choices=QuotaBy))
    task_value: TaskValue | None = field(default=None, metadata=setting(
        "What a task's value is, where values set the quotas (tive, kmeans --quota value): "
        "norm (mean gradient norm, the authors'), coherence (mean cosine between the task's "
        "records), mean-gradient (norm of the task's mean gradient) or progress (norm × the "
        "relative drop of the task's loss on records the warm-up did not train on: a task the "
        "warm-up did not move gets nothing).", "norm", choices=TaskValue))

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        for name in ("budget", "temperature", "seed", "clusters"):  # numpy scalars as numbers
            set_(name, plain_number(getattr(self, name)))
        set_("budget", Budget.parse(self.budget))
        set_("method", _enum(Method, self.method, "method"))
        if self.strategy is not None:
            set_("strategy", _enum(Strategy, self.strategy, "strategy"))
        if self.paper:
            self._paper()
        if self.quota is not None:
            set_("quota", _enum(QuotaBy, self.quota, "quota"))
        if self.task_value is not None:
            set_("task_value", task_value_named(self.task_value))
        set_("exclude", _task_names(self.exclude))
        applies = set(METHODS[self.method.value].options)
        if self.method is Method.TIVE and self.strategy is Strategy.TOP:
            applies -= {"temperature", "seed"}
        settle(self, DEFAULTS, applies, self._refused)
        if weighs_by_value(self.method, self.quota):
            set_("task_value", self.task_value or TaskValue.NORM)
        elif self.task_value is not None:
            raise ConfigError(f"{named('task_value', self.task_value)} does not apply to "
                              f"{named('method', self.method)}"
                              + (f" {named('quota', self.quota)}" if self.quota else "")
                              + ", whose quotas do not follow the task values; fix: leave it "
                                "out" + (f" or {named('quota', 'value')}" if self.quota else ""))
        if self.temperature is not None:
            try:
                t = float(self.temperature)
            except (TypeError, ValueError):
                t = math.nan
            if math.isnan(t) or t <= 0 or isinstance(self.temperature, bool):
                raise ConfigError(f"{named('temperature', self.temperature)}: must be positive "
                                  f"(inf allowed)")
            set_("temperature", t)
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ConfigError(f"{named('seed', repr(self.seed))}: expected a non-negative integer")
        if self.clusters is not None and (isinstance(self.clusters, bool)
                                          or not isinstance(self.clusters, int)
                                          or self.clusters < 1):
            raise ConfigError(f"{named('clusters', repr(self.clusters))}: expected a positive "
                              f"integer")

    def _refused(self, name: str) -> str:
        """Why setting ``name`` may not be given with this method (or strategy)."""
        what = (named("strategy", self.strategy) if name in METHODS[self.method.value].options
                else named("method", self.method))
        return f"{named(name)} does not apply to {what}, which does not use it; fix: leave it out"

    def _paper(self) -> None:
        """Refuse settings other than the authors'; set theirs."""
        for name, value in AUTHORS.items():
            given = getattr(self, name)
            if given is not None and given != value:
                raise ConfigError(f"{named(name, _plain(given))}: {named('paper')} selects as "
                                  f"the authors did ({name} {_plain(value)}); fix: leave out "
                                  f"{named(name)} or {named('paper')}")
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def plain_number(value: Any) -> Any:
    """A numpy integer or float scalar as the Python ``int`` or ``float`` it holds (an
    ``np.linspace`` sweep of budgets); anything else as it is."""
    if type(value) in (bool, int, float) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _task_names(exclude: Any) -> tuple[str, ...]:
    """``exclude`` as a tuple of distinct task names; one string is one task (not letters)."""
    names = (exclude,) if isinstance(exclude, str) else exclude
    try:
        names = tuple(names)
    except TypeError:
        names = (names,)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise ConfigError(f"{named('exclude', repr(bad[0]))}: expected task names (strings)")
    return tuple(dict.fromkeys(names))


def weighs_by_value(method: Any, quota: Any = None) -> bool:
    """Whether the task values set ``method``'s quotas (``quota``: the ``quota`` setting, None
    for its default): where ``task_value`` applies."""
    return method_named(method).weighs_by_value(DEFAULTS["quota"] if quota is None else quota)


def _enum(kind: type[Enum], value: Any, option: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(m.value for m in kind)
        raise ConfigError(f"{named(option, repr(value))}: unknown; choose one of "
                          f"{choices}") from None


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Budget):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return value
