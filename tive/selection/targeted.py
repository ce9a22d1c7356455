"""Targeted values: records valued by what a user wants the model to get better at, the
target records' features in the same projected space (docs/design.md, "Targeted selection").

With ``φ̂_i`` a training record's unit feature and ``ψ̂_j`` a target record's, and for each
target task ``s`` the mean unit target feature ``μ_s = mean_{j∈s} ψ̂_j``:

* alignment ``A[i, s] = mean_{j∈s} cos(φ_i, ψ_j) = φ̂_i · μ_s`` — one streaming pass over the
  ``(N, k)`` features, ``(N, S)`` kept: O(N·(k + S)) time, O(N·S + S·k) memory;
* ``less``: ``ℓ_i = max_s A[i, s]`` (LESS's score), the global top-k;
* ``tive-target``: task ``t`` serves the target task ``s*(t) = argmax_s mean_{i∈t} A[i, s]``;
  its value ``V_T(t) = max(0, mean_{i∈t} A[i, s*(t)])`` sets its quota and a record's value
  ``v_i = A[i, s*(t)]`` its weight in the within-task draw.

Invalid training records (as for the other values) get NaN; target rows that are not scored,
skipped, non-finite or zero take no part in ``μ_s``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tive.data.tasks import factorize
from tive.errors import ConfigError
from tive.selection import value_cache as vc, values as val
from tive.store.format import Store

VERSION = 1  # bump when alignments are computed differently


@dataclass(frozen=True)
class Target:
    """The target records' features.

    Attributes:
        features: ``(M, k)`` projected gradients of the target records (array or memmap).
        tasks: ``(M,)`` target task of each row.
        valid: ``(M,)`` bool, rows that were scored (a store's ``done`` and not skipped).
        ids: ``(M,)`` record ids (for the report's nearest target example).
        identity: digest of the target's files (None for arrays: nothing is cached).
    """

    features: Any
    tasks: np.ndarray
    valid: np.ndarray
    ids: list[str] = field(default_factory=list)
    identity: str | None = None

    @classmethod
    def of_store(cls, target: Store) -> Target:
        """The target of a complete ``RUN/target`` store."""
        index = target.index()
        valid = target.array("done") & (target.array("skipped") == 0)
        return cls(target.features, np.array([e.task for e in index], dtype=object), valid,
                   [e.id for e in index], vc.store_identity(target.root))

    @classmethod
    def of_arrays(cls, features: Any, tasks: Any, k: int) -> Target:
        """A target given as ``(M, k)`` features and ``(M,)`` task names.

        Raises:
            ConfigError: shapes that do not match each other or the store's ``k``.
        """
        features = features if isinstance(features, np.ndarray) else np.asarray(features)
        tasks = np.asarray([str(t) for t in tasks], dtype=object)
        if features.ndim != 2 or features.shape[1] != k or tasks.shape != (len(features),):
            raise ConfigError(f"target: features {features.shape} and tasks {tasks.shape}; "
                              f"expected (M, {k}) and (M,), the training features' k")
        return cls(features, tasks, np.ones(len(tasks), dtype=bool),
                   [str(i) for i in range(len(tasks))])


@dataclass(frozen=True)
class TargetValues:
    """What the targeted methods read, computed once per report.

    Attributes:
        names: the target tasks ``(S,)`` in their first-appearance order.
        alignment: ``(N, S)`` float64 ``A[i, s]``; NaN rows for invalid records.
        less: ``(N,)`` ``ℓ_i = max_s A[i, s]``.
        serves: training task → the target task it serves, ``s*(t)``.
        task_values: training task → ``V_T(t)`` (NaN for a task with no valid record).
        instance: ``(N,)`` ``v_i = A[i, s*(t_i)]``.
    """

    names: list[str]
    alignment: np.ndarray
    less: np.ndarray
    serves: dict[str, str]
    task_values: dict[str, float]
    instance: np.ndarray


def target_means(target: Target, chunk_rows: int | None = None) -> tuple[list[str], np.ndarray]:
    """The target tasks and ``(S, k)`` float64 ``μ_s``, the mean unit feature of each.

    Raises:
        ConfigError: no target row with a usable (finite, non-zero) feature.
    """
    names, codes = factorize(target.tasks)
    sums, counts = val.weighted_unit_sums(target.features, np.ones(len(codes)), codes,
                                          len(names), target.valid, chunk_rows)
    if not (counts > 0).any():
        raise ConfigError("target: no target record has a usable feature (all skipped, zero or "
                          "non-finite); fix: score the target again, or another target")
    keep = counts > 0  # a target task with no usable record takes no part
    return ([str(n) for n, k in zip(names, keep) if k],
            sums[keep] / counts[keep][:, None])


def alignment(features: Any, valid: np.ndarray, means: np.ndarray,
              chunk_rows: int | None = None) -> np.ndarray:
    """``(N, S)`` float64 ``A[i, s] = φ̂_i · μ_s`` in one streaming pass over ``features``
    ``(N, k)`` (a zero feature has cosine 0 with everything; invalid or non-finite rows NaN)."""
    import torch

    n = features.shape[0]
    dtype = torch.float64 if features.dtype == np.float64 else torch.float32
    mu = torch.from_numpy(np.ascontiguousarray(means)).to(dtype)  # (S, k)
    out = np.full((n, len(means)), np.nan)
    for start, block in val._chunks(features, chunk_rows, dtype):
        rows = slice(start, start + len(block))
        finite, norms = val._finite_norms(block)
        ok = valid[rows] & finite
        val._to_unit_rows(block, np.where(ok & (norms > 0), 1.0 / np.where(norms > 0, norms, 1),
                                          0.0))
        dots = (block @ mu.T).double().numpy()  # (chunk, S)
        out[rows] = np.where(ok[:, None], dots, np.nan)
    return out


def target_values(a: np.ndarray, names: list[str], tasks: np.ndarray,
                  valid: np.ndarray) -> TargetValues:
    """LESS's scores and ``tive-target``'s values from the alignment ``a`` ``(N, S)``.

    Args:
        names: the target tasks (the columns of ``a``).
        tasks: ``(N,)`` training task of each record; ``valid`` ``(N,)`` bool.
    """
    own, codes = factorize(tasks)
    counts = np.bincount(codes[valid], minlength=len(own)).astype(np.float64)
    sums = np.zeros((len(own), a.shape[1]))
    np.add.at(sums, codes[valid], a[valid])
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None]  # (T, S) mean alignment of each training task
    best = np.argmax(np.where(np.isnan(means), -np.inf, means), axis=1)  # (T,) s*(t)
    value = np.where(counts > 0, np.maximum(means[np.arange(len(own)), best], 0.0), np.nan)
    with np.errstate(invalid="ignore"):
        less = np.where(valid, np.max(np.where(valid[:, None], a, -np.inf), axis=1), np.nan)
    instance = np.where(valid, a[np.arange(len(a)), best[codes]], np.nan)
    return TargetValues(list(names), a, less, {str(t): names[b] for t, b in zip(own, best)},
                        {str(t): float(v) for t, v in zip(own, value)}, instance)


def compute(features: Any, tasks: np.ndarray, valid: np.ndarray, target: Target,
            chunk_rows: int | None = None, cache: tuple[Any, str] | None = None) -> TargetValues:
    """:class:`TargetValues` of the training ``features`` ``(N, k)`` against ``target``; the
    alignment kept in ``RUN/cache/target-<key>.npz`` when ``cache`` (``(RUN/cache, store
    identity)``) is given and the target comes from a store."""
    names, means = target_means(target, chunk_rows)

    def run() -> dict[str, np.ndarray]:
        return {"alignment": alignment(features, valid, means, chunk_rows)}

    if cache is None or target.identity is None:
        a = run()["alignment"]
    else:
        folder, identity = cache
        key = vc.digest("target", VERSION, identity, target.identity, valid, chunk_rows)
        a = vc.cached_arrays(folder, "target", key, run, lambda c: c.get(
            "alignment", np.empty(0)).shape == (len(valid), len(names)))["alignment"]
    return target_values(a, names, tasks, valid)


def nearest_target(features: Any, rows: np.ndarray, target: Target) -> list[tuple[int, float]]:
    """For each of ``rows`` (few: the report's top records), the target row of largest cosine
    and that cosine; ``(-1, nan)`` for a record without a usable feature."""
    phi = np.asarray(features[np.sort(rows)], dtype=np.float64)[np.argsort(np.argsort(rows))]
    psi = np.asarray(target.features, dtype=np.float64)  # (M, k): a target is small
    pn, qn = np.linalg.norm(phi, axis=1), np.linalg.norm(psi, axis=1)
    usable = target.valid & np.isfinite(qn) & (qn > 0)
    if not usable.any():
        return [(-1, float("nan"))] * len(rows)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (phi @ psi[usable].T) / pn[:, None] / qn[usable][None, :]
    where = np.flatnonzero(usable)
    out = []
    for i, row in enumerate(cos):
        if not np.isfinite(row).any():
            out.append((-1, float("nan")))
            continue
        j = int(np.nanargmax(row))
        out.append((int(where[j]), float(row[j])))
    return out
