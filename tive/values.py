"""Stage 6 — values: how much each task needs, how representative each record is of its task.

* task value ``V(t) = mean_{i∈t} ‖g_i‖₂`` (exact norms of the unprojected gradients);
* instance value ``v_i = mean_{j∈t} cos(φ_i, φ_j)`` (itself included) ``= φ̂_i · m_t`` with
  ``m_t`` the mean unit feature of task ``t``: two streaming passes over the ``(N, k)`` features
  in chunks, O(N·k) time and O(T·k) memory, never the N×N Gram matrix.

Records marked invalid (not scored, skipped, non-finite norm or feature) take part in neither.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

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


def instance_values(
    features: np.ndarray,
    codes: np.ndarray,
    n_tasks: int,
    valid: np.ndarray,
    chunk_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean cosine of each record's feature to every valid member of its task (itself included).

    ``v_i = s_i φ_i · m_t`` with ``s_i = 1/‖φ_i‖`` and ``m_t = Σ_{j∈t} s_j φ_j / |t|``: pass 1
    accumulates ``m_t`` (one ``(tasks, chunk) @ (chunk, k)`` product per chunk), pass 2 takes
    each row's dot product with its own task's mean: O(N·k) in all. Arithmetic is float64 for float64 input, else float32 with
    float64 accumulation across chunks.

    Args:
        features: ``(N, k)`` array or memmap of projected gradients (any float dtype). A memmap
            is read with plain file reads, chunk by chunk, so resident memory stays at one chunk.
        codes: ``(N,)`` int task codes in ``[0, n_tasks)``.
        n_tasks: number of tasks.
        valid: ``(N,)`` bool; invalid rows get NaN and do not count as task members.
        chunk_rows: rows read at a time (default: about 64 MiB of float64).

    Returns:
        ``(values, finite)``: ``(N,)`` float64 instance values in [-1, 1] (NaN for invalid rows
        and rows with a non-finite entry, which count as invalid), and ``(N,)`` bool, rows whose
        entries are all finite. A zero feature vector has cosine 0 with everything.
    """
    n, k = features.shape
    dtype = np.float64 if features.dtype == np.float64 else np.float32
    finite = np.ones(n, dtype=bool)
    scale = np.zeros(n, dtype=np.float64)  # (N,) s_i, 0 for invalid, non-finite or zero rows
    sums = np.zeros((n_tasks, k), dtype=np.float64)  # (tasks, k) Σ s_j φ_j
    for start, block in _chunks(features, chunk_rows, dtype):
        rows = slice(start, start + len(block))
        finite[rows], sq = _finite_sq_norms(block)
        ok = valid[rows] & finite[rows] & (sq > 0)
        scale[rows] = np.where(ok, 1.0 / np.sqrt(np.where(ok, sq, 1.0)), 0.0)
        weights = _onehot(codes[rows], n_tasks) * scale[rows]  # (tasks, chunk)
        sums += weights.astype(dtype) @ _zero_bad_rows(block, finite[rows])
    valid = valid & finite
    counts = np.bincount(codes[valid], minlength=n_tasks).astype(np.float64)
    means = (sums / np.maximum(counts, 1.0)[:, None]).astype(dtype)  # (tasks, k) m_t
    out = np.full(n, np.nan)
    for start, block in _chunks(features, chunk_rows, dtype):
        rows = slice(start, start + len(block))
        dots = np.einsum("ij,ij->i", _zero_bad_rows(block, finite[rows]), means[codes[rows]])
        out[rows] = np.where(valid[rows], dots * scale[rows], np.nan)  # (chunk,) φ̂_i · m_t
    return out, finite


def _chunks(features: np.ndarray, chunk_rows: int | None,
            dtype: type = np.float64) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, block)`` over the rows of ``features``, blocks converted to ``dtype``.

    Blocks share one buffer: a block is valid until the next one is requested. A whole-file
    memmap is read through the file, one chunk ahead in a background thread: slicing a memmap
    would keep every page it touched mapped (and counted as resident).
    """
    n, k = features.shape
    step = chunk_rows or default_chunk_rows(k)
    starts = range(0, n, step)
    buffer = np.empty((min(step, n), k), dtype=dtype)
    if not _whole_file_memmap(features):
        for start in starts:
            yield start, _convert(np.asarray(features[start:start + step]), buffer)
        return
    row_bytes = k * features.dtype.itemsize

    def read(f: BinaryIO, start: int) -> np.ndarray:
        rows = min(step, n - start)
        f.seek(features.offset + start * row_bytes)
        return np.fromfile(f, dtype=features.dtype, count=rows * k).reshape(rows, k)

    with open(features.filename, "rb") as f, ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(read, f, 0)
        for i, start in enumerate(starts):
            block = ahead.result()
            if i + 1 < len(starts):
                ahead = pool.submit(read, f, starts[i + 1])
            yield start, _convert(block, buffer)


def _convert(block: np.ndarray, buffer: np.ndarray) -> np.ndarray:
    """``block`` converted into (the first rows of) ``buffer``.

    torch's vectorised copy converts float16 about ten times faster than numpy here
    (benchmarks/README.md); the values are identical (float16 → float32 is exact).
    """
    import torch

    out = buffer[: len(block)]
    if block.dtype == out.dtype:
        return block
    with warnings.catch_warnings():  # torch warns that a read-only source is not writable
        warnings.simplefilter("ignore", UserWarning)
        source = torch.from_numpy(np.ascontiguousarray(block))
    torch.from_numpy(out).copy_(source)
    return out


def _finite_sq_norms(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(chunk,)`` bool rows with only finite entries, and ``(chunk,)`` float64 ‖row‖²."""
    sq = np.einsum("ij,ij->i", block, block).astype(np.float64)
    finite = np.isfinite(sq)
    if not finite.all():  # a non-finite entry, or a float32 square that overflowed
        bad = np.flatnonzero(~finite)
        finite[bad] = np.isfinite(block[bad]).all(axis=1)
        big = bad[finite[bad]]
        sq[big] = np.einsum("ij,ij->i", block[big].astype(np.float64),
                            block[big].astype(np.float64))
    return finite, sq


def _zero_bad_rows(block: np.ndarray, finite: np.ndarray) -> np.ndarray:
    """``block`` with non-finite rows set to 0 (so that 0 · NaN does not poison a product)."""
    return block if finite.all() else np.where(finite[:, None], block, 0)


def _onehot(codes: np.ndarray, n_tasks: int) -> np.ndarray:
    """``(tasks, chunk)`` float64 indicator of each row's task."""
    out = np.zeros((n_tasks, len(codes)), dtype=np.float64)
    out[codes, np.arange(len(codes))] = 1.0
    return out


def _whole_file_memmap(features: np.ndarray) -> bool:
    """True for a C-ordered memmap of a whole file (not a slice of one)."""
    if not isinstance(features, np.memmap) or not features.filename:
        return False
    size = os.path.getsize(features.filename) - features.offset
    return features.flags.c_contiguous and size == features.nbytes
