"""Settings of selection, as frozen dataclasses; the CLI builds its options from these fields."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from tive.errors import ConfigError


class Method(str, Enum):
    """How records are valued. ``tive`` is the paper's method; the others are baselines."""

    TIVE = "tive"  # task quotas from gradient norms, instance values from gradient cosines
    RANDOM = "random"  # uniform over the whole mixture
    RANDOM_PER_TASK = "random-per-task"  # stratified: each task keeps its share, uniform within
    GRADNORM = "gradnorm"  # largest exact gradient norms
    LOSS = "loss"  # largest warm-up losses
    LENGTH = "length"  # most supervised tokens
    BALANCED = "balanced"  # an equal count per task, uniform within
    KMEANS = "kmeans"  # per task, the records nearest k-means centroids of the features

    def __str__(self) -> str:
        return self.value


class Strategy(str, Enum):
    """Within-task choice for ``--method tive``."""

    SOFT = "soft"  # draw without replacement with probability ∝ exp(v / τ) (the authors')
    TOP = "top"  # the n_t records of highest instance value (deterministic)

    def __str__(self) -> str:
        return self.value


class QuotaBy(str, Enum):
    """Per-task quotas for ``--method kmeans``."""

    SIZE = "size"  # each task keeps its share of the mixture (as random-per-task)
    VALUE = "value"  # TIVE's quotas, n_t ∝ V(t)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Budget:
    """A subset size: a fraction of the mixture (``0.075``, ``7.5%``) or a count (``50000``).

    Text with a ``.``, an exponent or ``%`` is a fraction; a plain integer is a count.
    ``text`` keeps the budget as written; it names output files and appears in reports.
    """

    value: float
    is_fraction: bool
    text: str

    @classmethod
    def parse(cls, given: str | float | int | Budget) -> Budget:
        if isinstance(given, Budget):
            return given
        if isinstance(given, bool) or not isinstance(given, (str, int, float)):
            raise ConfigError(f"--budget {given!r}: expected a fraction like 0.075 or a count")
        raw = repr(given) if isinstance(given, float) else str(given).strip()
        try:
            if isinstance(given, int) or re.fullmatch(r"[+-]?\d+", raw):
                budget = cls(float(int(raw)), False, raw)
            elif raw.endswith("%"):
                budget = cls(float(raw[:-1]) / 100.0, True, raw)
            else:
                budget = cls(float(raw), True, raw)
        except ValueError:
            raise ConfigError(f"--budget {raw!r}: not a number; expected a fraction like "
                              f"0.075 (or 7.5%) or a record count like 50000") from None
        budget._check()
        return budget

    def _check(self) -> None:
        if not math.isfinite(self.value):
            raise ConfigError(f"--budget {self.text}: not a finite number; expected a fraction "
                              f"in (0, 1] like 0.075, or a count like 50000")
        if self.value <= 0:
            raise ConfigError(f"--budget {self.text}: must be positive; expected a fraction in "
                              f"(0, 1] like 0.075, or a count like 50000")
        if self.is_fraction and self.value > 1:
            hint = (f"write it as an integer ({int(self.value)})" if self.value.is_integer()
                    else "write a fraction in (0, 1]")
            raise ConfigError(f"--budget {self.text}: a fraction must be at most 1; for a record "
                              f"count {hint}")

    def resolve(self, n_records: int) -> int:
        """Number of records to select, out of ``n_records`` (B = round(p·N) for a fraction)."""
        if self.is_fraction:
            count = int(math.floor(self.value * n_records + 0.5))
            if count < 1:
                raise ConfigError(f"--budget {self.text}: selects no record of {n_records:,}; "
                                  f"fix: a larger fraction or a count")
            return count
        if self.value > n_records:
            raise ConfigError(f"--budget {self.text}: more than the {n_records:,} records "
                              f"of the mixture; fix: at most {n_records}, or a fraction")
        return int(self.value)

    def exact(self, n_records: int) -> float:
        """B before rounding: ``p·N`` for a fraction, the count itself for a count (the TIVE
        authors' quotas are shares of this number, truncated)."""
        self.resolve(n_records)  # the same checks
        return self.value * n_records if self.is_fraction else self.value

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "kind": "fraction" if self.is_fraction else "count",
                "value": self.value if self.is_fraction else int(self.value)}

    def __str__(self) -> str:
        return self.text


def _help(text: str, default: str | None = None, **cli: Any) -> dict[str, Any]:
    if default is not None:
        text = f"{text}  [default: {default}]"
    return {"help": text, "default_text": default, **cli}


# The options that take part in each method; giving another one is refused, not ignored.
APPLIES = {
    Method.TIVE: {"strategy", "temperature", "seed", "oversample"},
    Method.RANDOM: {"seed"},
    Method.RANDOM_PER_TASK: {"seed", "oversample"},
    Method.GRADNORM: set(),
    Method.LOSS: set(),
    Method.LENGTH: set(),
    Method.BALANCED: {"seed", "oversample"},
    Method.KMEANS: {"seed", "oversample", "clusters", "quota"},
}
# The TIVE authors' select_data_TIVE.py: soft draw with q = 0.001 (τ = 1000), oversampling,
# quotas int(B·V(t)/ΣV), textcaps left out of LLaVA-665K.
AUTHORS = {"method": Method.TIVE, "strategy": Strategy.SOFT, "temperature": 1000.0,
           "oversample": True}
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

    budget: Budget = field(metadata=_help(
        "Subset size: a fraction of the mixture (0.075, 7.5%) or a record count (50000).",
        required=True))
    method: Method = field(default=Method.TIVE, metadata=_help(
        "tive (the paper's method) or a baseline: random, random-per-task (stratified), "
        "balanced (equal count per task), gradnorm, loss, length (largest values first), "
        "kmeans (per task, the records nearest k-means centroids of the features).",
        show_default=True))
    strategy: Strategy | None = field(default=None, metadata=_help(
        "Within-task choice for tive: soft (draw ∝ exp(v/τ), the authors') or top "
        "(highest instance values).", "soft", choices=Strategy))
    temperature: float | None = field(default=None, metadata=_help(
        "τ of the soft draw. 1000 is the authors' q=0.001 (almost uniform); smaller favours "
        "representative records; inf is uniform.", "1000", type=float))
    seed: int | None = field(default=None, metadata=_help(
        "Seed of the random draws (soft, random, random-per-task).", "0", type=int))
    exclude: tuple[str, ...] = field(default=(), metadata=_help(
        "Task to leave out of valuation and selection (repeatable), e.g. textcaps as the "
        "authors did.", flag="--exclude-task", multiple=True))
    oversample: bool | None = field(default=None, metadata=_help(
        "A quota above its task's size repeats the task (the authors'); --no-oversample caps it "
        "and gives the surplus to the other tasks in proportion to their value.", "oversample",
        flag="--oversample/--no-oversample"))
    paper: bool = field(default=False, metadata=_help(
        "The TIVE authors' selection exactly: soft draw at τ=1000 with oversampling, quotas "
        "truncated to integers as their int() (the subset may fall a few records short of the "
        "budget), textcaps excluded when present.", is_flag=True))
    clusters: int | None = field(default=None, metadata=_help(
        "k-means clusters per task for kmeans: the task's quota is shared among its clusters "
        "in proportion to their size, nearest records first.", "the task's quota "
        "(one record per centroid)", type=int))
    quota: QuotaBy | None = field(default=None, metadata=_help(
        "Per-task quotas for kmeans: size (each task keeps its share, as random-per-task) or "
        "value (TIVE's, ∝ task value).", "size", choices=QuotaBy))

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("budget", Budget.parse(self.budget))
        set_("method", _enum(Method, self.method, "--method"))
        if self.strategy is not None:
            set_("strategy", _enum(Strategy, self.strategy, "--strategy"))
        if self.paper:
            self._paper()
        if self.quota is not None:
            set_("quota", _enum(QuotaBy, self.quota, "--quota"))
        set_("exclude", tuple(dict.fromkeys(self.exclude)))
        applies = set(APPLIES[self.method])
        if self.method is Method.TIVE and self.strategy is Strategy.TOP:
            applies -= {"temperature", "seed"}
        for name in DEFAULTS:
            given = getattr(self, name)
            if given is not None and name not in applies:
                what = (f"--strategy {self.strategy}" if name in APPLIES[self.method]
                        else f"--method {self.method}")
                raise ConfigError(f"--{name} does not apply to {what}, which does not use it; "
                                  f"fix: leave it out")
            set_(name, DEFAULTS[name] if given is None and name in applies else given)
        if self.temperature is not None:
            t = float(self.temperature)
            if math.isnan(t) or t <= 0:
                raise ConfigError(f"--temperature {self.temperature}: must be positive (inf "
                                  f"allowed)")
            set_("temperature", t)
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ConfigError(f"--seed {self.seed!r}: expected a non-negative integer")
        if self.clusters is not None and (isinstance(self.clusters, bool)
                                          or not isinstance(self.clusters, int)
                                          or self.clusters < 1):
            raise ConfigError(f"--clusters {self.clusters!r}: expected a positive integer")

    def _paper(self) -> None:
        """Refuse settings other than the authors'; set theirs."""
        for name, value in AUTHORS.items():
            given = getattr(self, name)
            if given is not None and given != value:
                raise ConfigError(f"--{name} {_plain(given)}: --paper selects as the authors "
                                  f"did ({name} {_plain(value)}); fix: leave out --{name} or "
                                  f"--paper")
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def _enum(kind: type[Enum], value: Any, option: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(m.value for m in kind)
        raise ConfigError(f"{option} {value!r}: unknown; choose one of {choices}") from None


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
