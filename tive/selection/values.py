"""Values: how much each task needs, how representative each record is of its task.

* task value ``V(t) = mean_{i∈t} ‖g_i‖₂`` (exact norms of the unprojected gradients; the
  authors' ``norm``), or one of two variants that do not reward a task whose gradients are large
  but point in unrelated directions (docs/design.md, "Task values"): ``coherence``, the mean
  cosine between distinct records of the task, and ``mean-gradient``, the norm of the task's
  mean gradient (an unbiased estimate of its square from distinct pairs); or ``progress``, the
  norm times the warm-up's relative drop of the task's loss on records it did not train on
  (:mod:`tive.store.probe`);
* instance value ``v_i = mean_{j∈t} cos(φ_i, φ_j)`` (itself included) ``= φ̂_i · m_t`` with
  ``m_t`` the mean unit feature of task ``t``: two streaming passes over the ``(N, k)`` features
  in chunks, O(N·k) time and O(T·k) memory, never the N×N Gram matrix.

Records marked invalid (not scored, skipped, non-finite norm or feature) take part in neither.
"""

from __future__ import annotations

import mmap
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from tive.errors import ConfigError

if TYPE_CHECKING:
    import torch

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
    kept = norms[valid].astype(np.float64)
    sums = np.bincount(codes[valid], weights=kept, minlength=n_tasks)
    counts = np.bincount(codes[valid], minlength=n_tasks)
    scale = 1.0
    if np.isfinite(kept).all() and not np.isfinite(sums).all():  # norms near 1e308: the sums
        scale = float(kept.max())  # overflow; the means, at most the largest norm, do not
        sums = np.bincount(codes[valid], weights=kept / scale, minlength=n_tasks)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1) * scale, np.nan)


TASK_VALUES = {
    "norm": "mean exact gradient norm (the authors')",
    "coherence": "mean cosine between distinct records of the task",
    "mean-gradient": "norm of the task's mean gradient",
    "progress": "mean exact gradient norm × the warm-up's relative drop of the task's loss on "
                "records it did not train on",
}  # --task-value NAME → what V(t) is (docs/design.md, "Task values")


def coherence_values(sums: np.ndarray, ones: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean cosine between distinct valid records of each task, clipped at 0.

    ``C(t) = Σ_{i≠j∈t} cos(φ_i, φ_j) / (n(n−1)) = (‖Σ_i φ̂_i‖² − z) / (n(n−1))`` with ``z``
    the task's valid rows whose feature is not zero (a zero row has cosine 0 with everything,
    itself included).

    Args:
        sums: ``(n_tasks, k)`` ``Σ_{i∈t} φ̂_i`` and ``ones``: ``(n_tasks,)`` ``z``
            (:func:`weighted_unit_sums` with weights 1).
        counts: ``(n_tasks,)`` valid records per task.

    Returns:
        ``(n_tasks,)`` float64 in [0, 1]; 0 for a task of one valid record (no pair), NaN for
        a task of none.
    """
    off = np.einsum("tk,tk->t", sums, sums) - ones
    return _pair_mean(off, np.asarray(counts, dtype=np.float64))


def mean_gradient_values(sums: np.ndarray, squares: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Norm of each task's mean gradient, from distinct pairs of its valid records.

    ``M(t)² = Σ_{i≠j∈t} g_i · g_j / (n(n−1))`` (unbiased for ``‖E g‖²``; the diagonal
    ``‖g_i‖²`` would add noise that grows as the task gets smaller), with
    ``g_i · g_j ≈ ‖g_i‖ ‖g_j‖ cos(φ_i, φ_j)``: exact norms, projected directions. Clipped at 0.

    Args:
        sums: ``(n_tasks, k)`` ``Σ_{i∈t} ‖g_i‖ φ̂_i``, and ``squares``: ``(n_tasks,)``
            ``Σ_{i∈t} ‖g_i‖²`` over the same rows (:func:`weighted_unit_sums`).
        counts: ``(n_tasks,)`` valid records per task.

    Returns:
        ``(n_tasks,)`` float64 ≥ 0; 0 for a task of one valid record, NaN for none.
    """
    off = np.einsum("tk,tk->t", sums, sums) - squares
    return np.sqrt(_pair_mean(off, np.asarray(counts, dtype=np.float64)))


def progress_values(norm: np.ndarray, ratios: np.ndarray) -> np.ndarray:
    """``V(t) = norm(t) · ρ(t)``, with ``ρ(t)`` the warm-up's relative drop of the task's loss
    on records it did not train on (:func:`tive.store.probe.progress_ratios`); a task with no such
    record takes the median ``ρ`` of the others (no evidence either way).

    Args:
        norm: ``(T,)`` the authors' task values.
        ratios: ``(T,)`` ``ρ(t)`` in [0, 1], NaN where unknown.

    Raises:
        ConfigError: no task has a known ``ρ`` (nothing to measure progress by).
    """
    known = ratios[np.isfinite(ratios)]
    if not len(known):
        raise ConfigError("--task-value progress: no task has a probe record (a record outside "
                          "the warm-up sample that could be encoded), so the warm-up's "
                          "progress is unknown everywhere; fix: another --task-value")
    return norm * np.where(np.isfinite(ratios), ratios, float(np.median(known)))


def _pair_mean(off_diagonal: np.ndarray, n: np.ndarray) -> np.ndarray:
    """``off_diagonal / (n(n−1))`` clipped at 0; 0 where ``n == 1``, NaN where ``n == 0``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 1, off_diagonal / np.maximum(n * (n - 1), 1.0), 0.0)
    return np.where(n > 0, np.maximum(mean, 0.0), np.nan)


def weighted_unit_sums(features: np.ndarray, weights: np.ndarray, codes: np.ndarray,
                       n_tasks: int, valid: np.ndarray,
                       chunk_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``Σ_{i∈t} w_i φ_i / ‖φ_i‖`` and ``Σ_{i∈t} w_i²`` per task over the valid rows whose
    feature is not zero, in one streaming pass over the features.

    Args:
        features: ``(N, k)`` array or memmap (read in chunks, as :func:`instance_values`).
        weights: ``(N,)`` weight of each row (the exact gradient norms).
        codes: ``(N,)`` int task codes in ``[0, n_tasks)``.
        n_tasks: number of tasks.
        valid: ``(N,)`` bool (rows whose features are all finite).
        chunk_rows: rows read at a time (default: about 64 MiB of float64).

    Returns:
        ``(n_tasks, k)`` float64 sums and ``(n_tasks,)`` float64 sums of squared weights.
    """
    import torch

    k = features.shape[1]
    dtype = torch.float64 if features.dtype == np.float64 else torch.float32
    task = torch.from_numpy(np.asarray(codes, dtype=np.int64))
    sums = torch.zeros((n_tasks, k), dtype=torch.float64)
    w = np.zeros(len(codes), dtype=np.float64)  # (N,) w_i of the rows that count, else 0
    for start, block in _chunks(features, chunk_rows, dtype):
        rows = slice(start, start + len(block))
        _, norms = _finite_norms(block)
        ok = valid[rows] & (norms > 0)
        _to_unit_rows(block, np.where(ok, 1.0 / np.where(ok, norms, 1.0), 0.0))
        w[rows] = np.where(ok, weights[rows], 0.0)
        sums.index_add_(0, task[rows], block.double() * torch.from_numpy(w[rows])[:, None])
    return sums.numpy(), np.bincount(codes, weights=w * w, minlength=n_tasks)


def instance_values(
    features: np.ndarray,
    codes: np.ndarray,
    n_tasks: int,
    valid: np.ndarray,
    chunk_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean cosine of each record's feature to every valid member of its task (itself included).

    ``v_i = s_i φ_i · m_t`` with ``s_i = 1/‖φ_i‖`` and ``m_t = Σ_{j∈t} s_j φ_j / |t|``: pass 1
    accumulates ``m_t`` (the unit rows added into their task's row), pass 2 takes each row's
    dot product with its own task's mean: O(N·k) in all. Arithmetic is float64 for float64
    input, else float32 with float64 accumulation across chunks. It runs in torch, whose
    vectorised float16 conversion is about ten times faster than numpy's, and on one pool of
    threads (numpy's BLAS threads and torch's would compete for the same cores).

    Args:
        features: ``(N, k)`` array or memmap of projected gradients (any float dtype). A memmap
            is read chunk by chunk, and each chunk's pages released once it is used, so
            resident memory stays at about one chunk.
        codes: ``(N,)`` int task codes in ``[0, n_tasks)``.
        n_tasks: number of tasks.
        valid: ``(N,)`` bool; invalid rows get NaN and do not count as task members.
        chunk_rows: rows read at a time (default: about 64 MiB of float64).

    Returns:
        ``(values, finite)``: ``(N,)`` float64 instance values in [-1, 1] (NaN for invalid rows
        and rows with a non-finite entry, which count as invalid), and ``(N,)`` bool, rows whose
        entries are all finite. A zero feature vector has cosine 0 with everything.
    """
    import torch  # here, not at the top: `import tive` should not load torch

    n, k = features.shape
    dtype = torch.float64 if features.dtype == np.float64 else torch.float32
    task = torch.from_numpy(np.asarray(codes, dtype=np.int64))  # (N,)
    finite = np.ones(n, dtype=bool)
    scale = np.zeros(n, dtype=np.float64)  # (N,) s_i, 0 for invalid, non-finite or zero rows
    sums = torch.zeros((n_tasks, k), dtype=torch.float64)  # (tasks, k) Σ s_j φ_j
    for start, block in _chunks(features, chunk_rows, dtype):
        rows = slice(start, start + len(block))
        finite[rows], norms = _finite_norms(block)
        ok = valid[rows] & finite[rows] & (norms > 0)
        scale[rows] = np.where(ok, 1.0 / np.where(ok, norms, 1.0), 0.0)
        _to_unit_rows(block, scale[rows])
        sums += torch.zeros((n_tasks, k), dtype=dtype).index_add_(0, task[rows], block)
    valid = valid & finite
    counts = np.bincount(codes[valid], minlength=n_tasks).astype(np.float64)
    means = (sums / torch.from_numpy(np.maximum(counts, 1.0))[:, None]).to(dtype)  # m_t
    out = np.full(n, np.nan)
    for start, block in _chunks(features, chunk_rows, dtype):
        rows = slice(start, start + len(block))
        _to_unit_rows(block, scale[rows])
        dots = _own_task_dots(block, means, task[rows]).double().numpy()  # (chunk,) φ̂_i · m_t
        out[rows] = np.where(valid[rows], dots, np.nan)
    return out, finite


SAFE_NORMS = (1e-15, 1e15)  # float32 rows with norms inside: 1/‖φ‖ and φ/‖φ‖ stay normal floats


def _finite_norms(block: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(chunk,)`` bool, rows with only finite entries, and ``(chunk,)`` float64 ‖row‖₂.

    Norms outside :data:`SAFE_NORMS` (a float32 sum of squares may overflow or underflow) are
    computed again in float64, scaled by the row's largest entry.
    """
    import torch

    norms = torch.linalg.vector_norm(block, dim=1).double().numpy()
    finite = np.isfinite(norms)
    redo = np.flatnonzero(~finite | (norms < SAFE_NORMS[0]) | (norms > SAFE_NORMS[1]))
    if len(redo):
        rows = block[redo].double()  # (r, k)
        finite[redo] = torch.isfinite(rows).all(dim=1).numpy()
        rows[~torch.from_numpy(finite[redo])] = 0
        top = rows.abs().amax(dim=1, keepdim=True) if rows.shape[1] else rows[:, :1]
        top = torch.where(top > 0, top, torch.ones_like(top))
        norms[redo] = (top[:, 0] * torch.linalg.vector_norm(rows / top, dim=1)).numpy()
    return finite, norms


def _to_unit_rows(block: torch.Tensor, scale: np.ndarray) -> None:
    """Multiply each row of ``block`` ``(chunk, k)`` by its ``scale`` ``(chunk,)``, in place.

    Rows with scale 0 (invalid, non-finite, zero) become 0 whatever they held (0 · NaN would
    poison the products). Rows whose scale is not a safe float32 factor are scaled in float64.
    """
    import torch

    zero = np.flatnonzero(scale == 0)
    if len(zero):
        block[zero] = 0
    lo, hi = 1 / SAFE_NORMS[1], 1 / SAFE_NORMS[0]
    extreme = np.flatnonzero((scale != 0) & ((scale < lo) | (scale > hi)))
    if len(extreme):
        factors = torch.from_numpy(scale[extreme])[:, None]
        block[extreme] = (block[extreme].double() * factors).to(block.dtype)
        scale = np.where((scale < lo) | (scale > hi), 1.0, scale)
    block.mul_(torch.from_numpy(scale).to(block.dtype)[:, None])


GEMM_TASKS = 32  # up to this many tasks, one matrix product beats gathering each row's mean


def _own_task_dots(block: torch.Tensor, means: torch.Tensor,
                   task: torch.Tensor) -> torch.Tensor:
    """``(chunk,)`` dot product of each row of ``block`` ``(chunk, k)`` with its own task's
    row of ``means`` ``(tasks, k)``; ``task`` ``(chunk,)`` int64.

    With few tasks, ``block @ means.T`` (one matrix product, ``(chunk, tasks)``) and a pick per
    row is several times faster than gathering a ``(chunk, k)`` copy of the means; with many
    tasks the product would cost too much and the gather is used.
    """
    import torch

    if len(means) <= GEMM_TASKS:
        return (block @ means.T).gather(1, task[:, None])[:, 0]
    return torch.einsum("ij,ij->i", block, means[task])


def _chunks(features: np.ndarray, chunk_rows: int | None,
            dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, block)`` over the rows of ``features``: each block a copy in ``dtype``.

    Blocks share one buffer (so they may be changed in place): a block is valid until the next
    one is requested. For a memmap of a whole file, the kernel is asked to read the next chunk
    ahead, and the pages of each chunk are released from this process once it is copied:
    slicing a memmap would otherwise keep every page it touched mapped (and counted as
    resident). The file's pages stay in the page cache.
    """
    import torch

    n, k = features.shape
    step = chunk_rows or default_chunk_rows(k)
    buffer = torch.empty((min(step, n), k), dtype=dtype)
    advise = _pager(features)
    for start in range(0, n, step):
        stop = min(start + step, n)
        advise(stop, min(stop + step, n), "ahead")
        block = buffer[: stop - start]
        _copy(np.asarray(features[start:stop]), block)
        advise(start, stop, "done")
        yield start, block


def _pager(features: np.ndarray) -> Callable[[int, int, str], None]:
    """``advise(start, stop, "ahead" | "done")`` for rows ``[start, stop)`` of ``features``.

    For a read-only whole-file memmap where the platform has ``madvise``: ``ahead`` starts
    reading those rows in the background (``MADV_WILLNEED``), ``done`` unmaps their pages from
    this process (``MADV_DONTNEED``: nothing is lost, a later access reads the file again).
    Otherwise it does nothing: on a copy-on-write memmap (mode ``c``) it would throw away the
    caller's changes.
    """
    mm = getattr(features, "_mmap", None)
    if (not _whole_file_memmap(features) or getattr(features, "mode", None) != "r"
            or not hasattr(mmap, "MADV_DONTNEED")):
        return lambda start, stop, what: None
    row_bytes = features.shape[1] * features.dtype.itemsize
    base = features.offset % mmap.ALLOCATIONGRANULARITY  # where row 0 is in the mapping
    advice = {"ahead": mmap.MADV_WILLNEED, "done": mmap.MADV_DONTNEED}

    def advise(start: int, stop: int, what: str) -> None:
        lo, hi = base + start * row_bytes, base + stop * row_bytes
        lo -= lo % mmap.PAGESIZE
        if hi > lo:
            mm.madvise(advice[what], lo, hi - lo)

    return advise


def _copy(rows: np.ndarray, out: torch.Tensor) -> None:
    """Copy ``rows`` (any float dtype) into ``out``, converting (float16 → float32 is exact)."""
    import torch

    with warnings.catch_warnings():  # torch warns that a read-only source is not writable
        warnings.simplefilter("ignore", UserWarning)
        out.copy_(torch.from_numpy(np.ascontiguousarray(rows)))


def _whole_file_memmap(features: np.ndarray) -> bool:
    """True for a C-ordered memmap of all of its mapping (not a slice of one)."""
    mm = getattr(features, "_mmap", None)
    if not isinstance(features, np.memmap) or mm is None:
        return False
    return (features.flags.c_contiguous
            and len(mm) == features.offset % mmap.ALLOCATIONGRANULARITY + features.nbytes)
