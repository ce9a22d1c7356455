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

    def __str__(self) -> str:
        return self.value


class Strategy(str, Enum):
    """Within-task choice for ``--method tive``."""

    SOFT = "soft"  # draw without replacement with probability ∝ exp(v / τ) (the authors')
    TOP = "top"  # the n_t records of highest instance value (deterministic)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Budget:
    """A subset size: a fraction of the mixture (``0.075``, ``7.5%``) or a count (``50000``).

    Text with a ``.``, an exponent or ``%`` is a fraction; a plain integer is a count.
    """

    value: float
    is_fraction: bool

    @classmethod
    def parse(cls, text: str | float | int | Budget) -> Budget:
        if isinstance(text, Budget):
            return text
        if isinstance(text, bool):
            raise ConfigError(f"budget {text!r}: expected a fraction like 0.075 or a count")
        if isinstance(text, int):
            budget = cls(float(text), False)
        elif isinstance(text, float):
            budget = cls(text, True)
        else:
            raw = str(text).strip()
            try:
                if raw.endswith("%"):
                    budget = cls(float(raw[:-1]) / 100.0, True)
                elif re.fullmatch(r"[+-]?\d+", raw):
                    budget = cls(float(int(raw)), False)
                else:
                    budget = cls(float(raw), True)
            except ValueError:
                raise ConfigError(f"--budget {raw!r}: not a number; expected a fraction like "
                                  f"0.075 (or 7.5%) or a record count like 50000") from None
        budget._check()
        return budget

    def _check(self) -> None:
        if not math.isfinite(self.value) or self.value <= 0:
            raise ConfigError(f"--budget {self}: must be positive; expected a fraction in (0, 1] "
                              f"like 0.075, or a count like 50000")
        if self.is_fraction and self.value > 1:
            raise ConfigError(f"--budget {self}: a fraction must be at most 1; for a record "
                              f"count write an integer (e.g. {int(self.value)})")

    def resolve(self, n_records: int) -> int:
        """Number of records to select, out of ``n_records`` (B = round(p·N) for a fraction)."""
        if self.is_fraction:
            count = int(math.floor(self.value * n_records + 0.5))
            if count < 1:
                raise ConfigError(f"--budget {self}: selects no record of {n_records:,}; "
                                  f"fix: a larger fraction or a count")
            return count
        if self.value > n_records:
            raise ConfigError(f"--budget {int(self.value)}: more than the {n_records:,} records "
                              f"of the mixture; fix: at most {n_records}, or a fraction")
        return int(self.value)

    def __str__(self) -> str:
        return f"{self.value:g}" if self.is_fraction else str(int(self.value))


def _help(text: str, **cli: Any) -> dict[str, Any]:
    return {"help": text, **cli}


@dataclass(frozen=True)
class SelectConfig:
    """How to turn values into a subset. Fields carry the CLI help (see ``tive select --help``)."""

    budget: Budget = field(metadata=_help(
        "Subset size: a fraction of the mixture (0.075, 7.5%) or a record count (50000).",
        required=True))
    method: Method = field(default=Method.TIVE, metadata=_help(
        "tive (the paper's method) or a baseline: random, random-per-task (stratified), "
        "gradnorm, loss, length (largest values first)."))
    strategy: Strategy = field(default=Strategy.SOFT, metadata=_help(
        "Within-task choice for tive: soft (draw ∝ exp(v/τ), the authors') or top "
        "(highest instance values)."))
    temperature: float = field(default=1000.0, metadata=_help(
        "τ of the soft draw. 1000 is the authors' q=0.001 (almost uniform); smaller favours "
        "representative records; inf is uniform."))
    seed: int = field(default=0, metadata=_help("Seed of the random draws."))
    exclude: tuple[str, ...] = field(default=(), metadata=_help(
        "Task to leave out of valuation and selection (repeatable), e.g. textcaps as the "
        "authors did.", flag="--exclude-task", multiple=True))
    oversample: bool = field(default=True, metadata=_help(
        "A quota above its task's size repeats the task (the authors'); --no-oversample caps it "
        "and gives the surplus to the other tasks in proportion to their value.",
        flag="--oversample/--no-oversample"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", Budget.parse(self.budget))
        object.__setattr__(self, "method", _enum(Method, self.method, "--method"))
        object.__setattr__(self, "strategy", _enum(Strategy, self.strategy, "--strategy"))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        t = float(self.temperature)
        if math.isnan(t) or t <= 0:
            raise ConfigError(f"--temperature {self.temperature}: must be positive (inf allowed)")
        object.__setattr__(self, "temperature", t)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--seed {self.seed!r}: expected a non-negative integer")

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
