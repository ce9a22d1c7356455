"""Stability of a selection (``tive check --stability N``): the same selection made with N
seeds, and on a second store (another projection size), compared by the Jaccard overlap of
the chosen records, per task and overall, beside the overlap that draws at random within the
same quotas would have (docs/design.md, "Health checks")."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np

from tive.errors import ConfigError
from tive.output.tables import format_table
from tive.selection.report import Report
from tive.selection.settings import SelectConfig

COLUMNS = ("across seeds", "across stores", "random (≈)")


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """``|A ∩ B| / |A ∪ B|`` of the distinct rows of ``a`` and ``b`` (1 when both are empty)."""
    a, b = np.unique(a), np.unique(b)
    union = len(np.union1d(a, b))
    return len(np.intersect1d(a, b, assume_unique=True)) / union if union else 1.0


def chance_overlap(chosen: np.ndarray, sizes: np.ndarray) -> float:
    """About the Jaccard overlap of two draws, uniform and independent, of ``chosen`` distinct
    records from each of groups of ``sizes`` records: ``E|A∩B| = Σ q²/n`` and
    ``|A∪B| = 2Σq − |A∩B|``, so ``Σq²/n / (2Σq − Σq²/n)`` (``p/(2−p)`` for a fraction ``p``
    of every group); 1 when nothing is drawn."""
    q, n = np.asarray(chosen, dtype=np.float64), np.asarray(sizes, dtype=np.float64)
    both = float(np.sum(np.where(n > 0, q * q / np.maximum(n, 1), 0.0)))
    union = 2 * float(q.sum()) - both
    return both / union if union > 0 else 1.0


@dataclass
class Stability:
    """Mean Jaccard overlaps of selections.

    Attributes:
        tasks: task → ``(across seeds, across stores, random)``, NaN where not measured.
        overall: the same three of the whole subsets.
        seeds: the seeds used.
    """

    tasks: dict[str, tuple[float, float, float]]
    overall: tuple[float, float, float]
    seeds: list[int]

    def table(self) -> str:
        """Plain-text table: per task and overall, the overlaps measured."""
        keep = [i for i in range(len(COLUMNS)) if np.isfinite(self.overall[i])]
        rows = [[t, *(f"{v[i]:.3f}" for i in keep)] for t, v in self.tasks.items()]
        rows.append(["overall", *(f"{self.overall[i]:.3f}" for i in keep)])
        return format_table(["task", *(COLUMNS[i] for i in keep)], rows)


def _mean_overlap(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    return float(np.mean([jaccard(a, b) for a, b in pairs])) if pairs else float("nan")


def stability(reports: list[Report], config: SelectConfig, n: int) -> Stability:
    """Select ``n`` times with seeds ``seed, seed+1, …`` (``config.seed``: 0 unless given) from
    each report, and compare: the mean Jaccard overlap over pairs of seeds (first report), over
    the reports' selections with the same seed (first against second), and what uniform draws
    of the first selection's distinct records per task would give (:func:`chance_overlap`).

    Raises:
        ConfigError: ``n`` < 1; nothing to compare (one seed and one report, or a selection
            that draws nothing at random and one report); reports of other records.
    """
    if n < 1:
        raise ConfigError(f"--stability {n}: expected a number of seeds ≥ 1")
    seeded = config.seed is not None  # None: the method draws nothing at random
    if len(reports) == 1 and (n < 2 or not seeded):
        raise ConfigError(f"--stability {n}: nothing to compare: "
                          + ("one seed" if seeded else f"{config.method} draws nothing at "
                             f"random (every seed gives the same subset)")
                          + "; fix: --stability 2 or more with a seeded method, or --compare "
                            "another run's store")
    if len(reports) > 1 and [str(t) for t in reports[0].tasks] != [str(t) for t in
                                                                    reports[1].tasks]:
        raise ConfigError("--compare: the two stores hold other records or tasks; fix: compare "
                          "stores of the same data")
    seeds = [(config.seed or 0) + i for i in range(n)] if seeded else [None]
    chosen = [[np.unique(r.select_with(dataclasses.replace(config, seed=s)).indices)
               for s in seeds] for r in reports]
    names, codes = reports[0].task_codes
    valid = np.bincount(codes[reports[0].valid], minlength=len(names))
    seed_pairs = list(itertools.combinations(range(len(seeds)), 2))
    store_pairs = range(len(seeds)) if len(reports) > 1 else []

    def overlaps(rows: list[list[np.ndarray]]) -> tuple[float, float]:
        return (_mean_overlap([(rows[0][a], rows[0][b]) for a, b in seed_pairs]),
                _mean_overlap([(rows[0][s], rows[1][s]) for s in store_pairs]))

    drawn = np.bincount(codes[chosen[0][0]], minlength=len(names))  # distinct, per task
    tasks = {}
    for t, name in enumerate(names):
        if name in config.exclude:
            continue  # left out of every selection: nothing to compare
        rows = [[ix[codes[ix] == t] for ix in per_report] for per_report in chosen]
        tasks[name] = (*overlaps(rows), chance_overlap(drawn[t:t + 1], valid[t:t + 1]))
    overall = (*overlaps(chosen), chance_overlap(drawn, valid) if seeded else float("nan"))
    return Stability(tasks, overall, [s for s in seeds if s is not None])
