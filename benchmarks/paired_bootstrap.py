"""Paired bootstrap of a method's difference from a reference (``random``) in the
selection-quality benchmark.

Both methods are fine-tuned with the same training seeds (training seed i paired with selection
seed i) and evaluated on the same held-out items. A replicate resamples the seeds with
replacement (the same seed indices for both methods) and, independently per task, the items
with replacement (the same items for both methods); its statistic is the macro (the mean over
tasks of the per-task mean over the resampled items and seeds) of the method minus that of the
reference. The 95% interval is the 2.5 and 97.5 percentiles of ``B`` replicates.

Counting draws instead of indexing them makes a replicate two matrix products per task: with
``W_s`` (replicates × seeds) how often each seed is drawn and ``W_i`` (replicates × items) how
often each item is, a task's resampled mean difference is ``sum((W_s @ D) * W_i, 1) / (S n)``
for the seeds × items differences ``D``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Arrays = Mapping[str, np.ndarray]  # task → (seeds, items) per-item scores, seeds paired


def paired_bootstrap(method: Arrays, reference: Arrays, replicates: int = 2000,
                     level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """The macro difference ``method − reference`` and its percentile interval.

    Args:
        method, reference: per task a ``(seeds, items)`` array (exact match 0/1, or a loss);
            row ``s`` of both is training seed ``s``; the same tasks and shapes in both.
        replicates: bootstrap replicates ``B``.
        level: the interval's coverage.
        seed: of the resampling.

    Returns:
        ``{"diff", "low", "high", "method", "reference"}``: the observed difference, the
        interval, and the two observed macros.
    """
    tasks = sorted(method)
    if sorted(reference) != tasks:
        raise ValueError(f"tasks differ: {tasks} and {sorted(reference)}")
    diffs = {}
    for t in tasks:
        m, r = np.asarray(method[t], float), np.asarray(reference[t], float)
        if m.shape != r.shape or m.ndim != 2 or not m.size:
            raise ValueError(f"task {t}: shapes {m.shape} and {r.shape}; expected the same "
                             f"(seeds, items), non-empty")
        diffs[t] = m - r
    seeds = {d.shape[0] for d in diffs.values()}
    if len(seeds) != 1:
        raise ValueError(f"tasks have different numbers of seeds: {sorted(seeds)}")
    (n_seeds,) = seeds
    rng = np.random.default_rng(seed)
    w_seed = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=replicates)
    stat = np.zeros(replicates)
    for t in tasks:
        d = diffs[t]
        n = d.shape[1]
        w_item = rng.multinomial(n, np.full(n, 1 / n), size=replicates)
        stat += np.einsum("bi,bi->b", w_seed @ d, w_item) / (n_seeds * n)
    stat /= len(tasks)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stat, [tail, 100 - tail])
    return {"diff": float(np.mean([d.mean() for d in diffs.values()])),
            "low": float(low), "high": float(high),
            "method": float(np.mean([np.mean(method[t]) for t in tasks])),
            "reference": float(np.mean([np.mean(reference[t]) for t in tasks]))}


def verdict(low: float, high: float, higher_is_better: bool) -> str:
    """"better" or "worse" where the interval excludes 0 on that side, else "no difference"."""
    if low > 0 or high < 0:
        return "better" if (low > 0) == higher_is_better else "worse"
    return "no difference"
