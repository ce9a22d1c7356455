"""How each selection method chooses records (:mod:`tive.selection.methods` names them).

Per-task choosers take ``(report, config, members, n, noise)`` and return ``n`` rows of the
task's ``members`` (repeats when ``n`` exceeds the task's size); whole-mixture choosers take
``(report, noise)`` and return a ``(N,)`` metric whose largest finite values are taken.
``noise`` is ``(N,)`` seeded uniforms, the random draws and the tie-break.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tive.errors import ConfigError
from tive.selection import kmeans as km, quotas as sel, value_cache as vc
from tive.selection.settings import Strategy
from tive.settings import named


def draw(report: Any, config: Any, members: np.ndarray, n: int,
         noise: np.ndarray) -> np.ndarray:
    """The soft draw ∝ exp(v/τ) without replacement (uniform without a temperature), or the
    ``n`` highest instance values (``--strategy top``)."""
    temperature = math.inf if config.temperature is None else config.temperature
    return sel.choose_in_task(members, n, report.instance_values[members], noise[members],
                              temperature, config.strategy is not Strategy.TOP)


def nearest_centroids(report: Any, config: Any, members: np.ndarray, n: int,
                      noise: np.ndarray) -> np.ndarray:
    """The records nearest k-means centroids of the task's features (the whole task
    ⌊n/m⌋ times first, when the quota exceeds its size)."""
    whole, rest = divmod(n, len(members))
    if config.clusters is None:
        picked = km.kmeans_pick(report.features, members, rest, noise[members], config.seed,
                                report.chunk_rows)[0]
    elif rest > 0:
        picked = km.cluster_share(clusters(report, config, members, noise), rest)
    else:
        picked = np.empty(0, dtype=np.int64)
    return np.concatenate([np.tile(members, whole), picked])


def clusters(report: Any, config: Any, members: np.ndarray, noise: np.ndarray) -> km.Clusters:
    """A task's ``--clusters`` assignment (:func:`tive.selection.kmeans.cluster_assign`), kept in the run
    folder's cache for the next selection when the report comes from a store."""
    def compute() -> dict[str, np.ndarray]:
        return vars(km.cluster_assign(report.features, members, config.clusters,
                                      noise[members], config.seed, report.chunk_rows))

    if report.cache is None:
        return km.Clusters(**compute())
    folder, identity = report.cache
    features = report.features
    key = vc.digest(km.VERSION, km.code(), identity, features.shape, features.dtype.str,
                    getattr(features, "filename", None), config.clusters, config.seed,
                    report.chunk_rows, members, noise[members])
    m = len(members)
    return km.Clusters(**vc.cached_arrays(folder, "kmeans", key, compute,
                                          lambda a: _whole_clusters(a, members)))


def _whole_clusters(a: dict[str, np.ndarray], members: np.ndarray) -> bool:
    """A cached :class:`~tive.selection.kmeans.Clusters` of ``members``: exactly its four
    arrays, ``rows`` a permutation of ``members``, ``nearest`` in ``[0, k)``."""
    m = len(members)
    if not vc.exact(a, {"rows": ((m,), "i"), "nearest": ((m,), "i"), "dist": ((m,), "f"),
                        "k": ((), "i")}):
        return False
    k = int(a["k"])
    return (np.array_equal(np.sort(a["rows"]), members) and 0 <= k <= max(m, 1)
            and bool(((a["nearest"] >= 0) & (a["nearest"] < max(k, 1))).all()))


def uniform(report: Any, noise: np.ndarray) -> np.ndarray:
    """Random: the seeded uniforms themselves."""
    return noise


def gradient_norm(report: Any, noise: np.ndarray) -> np.ndarray:
    """The exact gradient norms."""
    return report.norms.astype(np.float64)


def warmup_loss(report: Any, noise: np.ndarray) -> np.ndarray:
    """The warm-up losses (an error when the store has none)."""
    if not np.isfinite(report.loss[report.valid]).any():
        raise ConfigError(f"{named('method', 'loss')}: this store has no per-record losses "
                          f"(imported without them); fix: import with --loss, or another "
                          f"method")
    return report.loss.astype(np.float64)


def supervised_length(report: Any, noise: np.ndarray) -> np.ndarray:
    """Supervised tokens, or without token counts the characters of the answers."""
    if (report.ntokens[report.valid] >= 0).any():
        return np.where(report.ntokens >= 0, report.ntokens, np.nan).astype(np.float64)
    if report.mixture is None:
        raise ConfigError(f"{named('method', 'length')}: the store has no token counts and no "
                          f"data was given; fix: pass the data")
    return np.array([sum(len(t.text) for t in r.turns if t.role == "assistant")
                     for r in report.mixture], dtype=np.float64)


def less_score(report: Any, noise: np.ndarray) -> np.ndarray:
    """LESS: each record's largest mean cosine to a target task's examples
    (:mod:`tive.selection.targeted`)."""
    return report.targeted().less


def target_draw(report: Any, config: Any, members: np.ndarray, n: int,
                noise: np.ndarray) -> np.ndarray:
    """:func:`draw` with the instance values taken against the target task the record's task
    serves (:mod:`tive.selection.targeted`)."""
    temperature = math.inf if config.temperature is None else config.temperature
    return sel.choose_in_task(members, n, report.targeted().instance[members], noise[members],
                              temperature, config.strategy is not Strategy.TOP)
