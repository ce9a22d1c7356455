"""Stage 6 — values: how much each task needs, how representative each record is of its task.

* task value ``V(t) = mean_{i∈t} ‖g_i‖₂`` (exact norms of the unprojected gradients);
* instance value ``v_i = mean_{j∈t} cos(φ_i, φ_j)`` (itself included) ``= φ̂_i · m_t`` with
  ``m_t`` the mean unit feature of task ``t``: two streaming passes over the ``(N, k)`` features
  in chunks, O(N·k) time and O(T·k) memory, never the N×N Gram matrix.

Records marked invalid (not scored, skipped, non-finite norm or feature) take part in neither.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

CHUNK_BYTES = 1 << 26  # float64 working set per chunk (64 MiB)


def default_chunk_rows(dim: int) -> int:
    """Rows per chunk so that a float64 chunk of ``dim`` columns is about 64 MiB."""
    return max(1, CHUNK_BYTES // (8 * max(dim, 1)))


def task_values(norms: np.ndarray, codes: np.ndarray, n_tasks: int, valid: np.ndarray) -> np.ndarray:
    """Mean exact gradient norm per task over valid records.

    Args:
        norms: ``(N,)`` exact ‖g_i‖₂.
        codes: ``(N,)`` int task code of each record, in ``[0, n_tasks)``.
        n_tasks: number of tasks.
        valid: ``(N,)`` bool.

    Returns:
        ``(n_tasks,)`` float64; NaN for a task with no valid record.
    """
    sums = np.bincount(codes[valid], weights=norms[valid].astype(np.float64), minlength=n_tasks)
    counts = np.bincount(codes[valid], minlength=n_tasks)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def finite_rows(features: np.ndarray, chunk_rows: int | None = None) -> np.ndarray:
    """``(N,)`` bool: rows of ``features`` whose every entry is finite (streamed in chunks)."""
    out = np.empty(features.shape[0], dtype=bool)
    for start, block in _chunks(features, chunk_rows):
        out[start:start + len(block)] = np.isfinite(block).all(axis=1)
    return out


def instance_values(
    features: np.ndarray,
    codes: np.ndarray,
    n_tasks: int,
    valid: np.ndarray,
    chunk_rows: int | None = None,
) -> np.ndarray:
    """Mean cosine of each record's feature to every valid member of its task (itself included).

    Args:
        features: ``(N, k)`` array or memmap of projected gradients (any float dtype).
        codes: ``(N,)`` int task codes in ``[0, n_tasks)``.
        n_tasks: number of tasks.
        valid: ``(N,)`` bool; invalid rows get NaN and do not count as task members.
        chunk_rows: rows read at a time (default: about 64 MiB of float64).

    Returns:
        ``(N,)`` float64 instance values in [-1, 1]. A zero feature vector has cosine 0 with
        everything.
    """
    k = features.shape[1]
    sums = np.zeros((n_tasks, k), dtype=np.float64)  # (tasks, k) sum of unit features
    for start, block in _chunks(features, chunk_rows):
        rows = slice(start, start + len(block))
        onehot = _onehot(codes[rows], valid[rows], n_tasks)  # (tasks, chunk)
        sums += onehot @ _unit(block, valid[rows])
    counts = np.bincount(codes[valid], minlength=n_tasks).astype(np.float64)
    means = sums / np.maximum(counts, 1.0)[:, None]  # (tasks, k) m_t
    out = np.full(features.shape[0], np.nan)
    for start, block in _chunks(features, chunk_rows):
        rows = slice(start, start + len(block))
        scores = _unit(block, valid[rows]) @ means.T  # (chunk, tasks)
        picked = scores[np.arange(len(block)), codes[rows]]
        out[rows] = np.where(valid[rows], picked, np.nan)
    return out


def _chunks(features: np.ndarray, chunk_rows: int | None) -> Iterator[tuple[int, np.ndarray]]:
    step = chunk_rows or default_chunk_rows(features.shape[1])
    for start in range(0, features.shape[0], step):
        yield start, np.asarray(features[start:start + step], dtype=np.float64)


def _unit(block: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; invalid and zero rows become zero. ``(chunk, k)`` float64."""
    block = np.where(valid[:, None], block, 0.0)
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return np.divide(block, norms, out=np.zeros_like(block), where=norms > 0)


def _onehot(codes: np.ndarray, valid: np.ndarray, n_tasks: int) -> np.ndarray:
    out = np.zeros((n_tasks, len(codes)), dtype=np.float64)
    out[codes[valid], np.flatnonzero(valid)] = 1.0
    return out
