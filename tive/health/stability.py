"""Stability of a selection (``tive check --stability N``): the same selection made with N
seeds, and on a second store (another projection size), compared by the Jaccard overlap of
the chosen records, per task and overall (docs/design.md, "Health checks")."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np

from tive.errors import ConfigError
from tive.output.tables import format_table
from tive.selection.report import Report
from tive.selection.settings import SelectConfig


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """``|A ∩ B| / |A ∪ B|`` of the distinct rows of ``a`` and ``b`` (1 when both are empty)."""
    a, b = np.unique(a), np.unique(b)
    union = len(np.union1d(a, b))
    return len(np.intersect1d(a, b, assume_unique=True)) / union if union else 1.0


@dataclass
class Stability:
    """Mean Jaccard overlaps of selections.

    Attributes:
        tasks: task → ``(across seeds, across stores)``, each NaN when not measured.
        overall: ``(across seeds, across stores)`` of the whole subsets.
        seeds: the seeds used.
    """

    tasks: dict[str, tuple[float, float]]
    overall: tuple[float, float]
    seeds: list[int]

    def table(self) -> str:
        """Plain-text table: per task and overall, the overlaps measured."""
        columns = [c for c, i in (("across seeds", 0), ("across stores", 1))
                   if np.isfinite(self.overall[i])]
        keep = [i for c, i in (("across seeds", 0), ("across stores", 1)) if c in columns]
        rows = [[t, *(f"{pair[i]:.3f}" for i in keep)] for t, pair in self.tasks.items()]
        rows.append(["overall", *(f"{self.overall[i]:.3f}" for i in keep)])
        return format_table(["task", *columns], rows)


def _by_task(indices: np.ndarray, codes: np.ndarray, n_tasks: int) -> list[np.ndarray]:
    """The distinct rows of ``indices`` of each task."""
    rows = np.unique(indices)
    return [rows[codes[rows] == t] for t in range(n_tasks)]


def _mean_overlap(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    return float(np.mean([jaccard(a, b) for a, b in pairs])) if pairs else float("nan")


def stability(reports: list[Report], config: SelectConfig, n: int) -> Stability:
    """Select ``n`` times with seeds ``seed, seed+1, …`` (``config.seed``: 0 unless given) from
    each report, and compare: the mean Jaccard overlap over pairs of seeds (first report), and
    over the reports made with the same seed (first against second).

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
    chosen = [[r.select_with(dataclasses.replace(config, seed=s)).indices for s in seeds]
              for r in reports]
    names, codes = reports[0].task_codes
    split = [[_by_task(ix, codes, len(names)) for ix in per_report] for per_report in chosen]
    seed_pairs = list(itertools.combinations(range(len(seeds)), 2))
    tasks = {}
    for t, name in enumerate(names):
        if name in config.exclude:
            continue  # left out of every selection: nothing to compare
        across_seeds = _mean_overlap([(split[0][a][t], split[0][b][t]) for a, b in seed_pairs])
        across_stores = _mean_overlap([(split[0][s][t], split[1][s][t])
                                       for s in range(len(seeds))] if len(reports) > 1 else [])
        tasks[name] = (across_seeds, across_stores)
    overall = (_mean_overlap([(chosen[0][a], chosen[0][b]) for a, b in seed_pairs]),
               _mean_overlap([(chosen[0][s], chosen[1][s]) for s in range(len(seeds))]
                             if len(reports) > 1 else []))
    return Stability(tasks, overall, [s for s in seeds if s is not None])
