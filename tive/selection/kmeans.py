"""A diversity baseline, ``--method kmeans``: the records nearest k-means centroids.

Per task: its valid rows' features, scaled to unit length in float32, are clustered by
scikit-learn's ``MiniBatchKMeans`` (``partial_fit`` over mini-batches of the task's rows read
from the memory-mapped store, :data:`PASSES` passes), then each centroid takes the distinct
record nearest it. Nothing of size N × dim is ever held: memory is one chunk of rows, one
mini-batch, the k-means++ sample and the task's centroids (k × dim float32).

* initial centroids: k-means++ on a sample of the task chosen by the seeded per-record uniforms
  (the same ones the random methods draw with), so the result does not depend on the order of
  the mixture;
* distinct records: (centroid, record) pairs are matched greedily in increasing squared
  distance (ties: lower centroid, then lower row) — each centroid takes its nearest record not
  already taken by a nearer pair. Streaming keeps each unmatched centroid's :data:`CANDIDATES`
  nearest free records per pass; a pass stops matching where a centroid whose candidates ran
  out could have claimed a record outside its list, and the next pass starts from there, so
  the result is exactly the all-pairs greedy matching (:func:`greedy_match` is its twin).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from tive.selection.quotas import largest_remainder
from tive.selection.values import _pager, default_chunk_rows

BATCH = 1024  # task rows per MiniBatchKMeans.partial_fit call (fixed: results do not depend on
#               how the store is read)
PASSES = 3  # passes of partial_fit over a task's rows
INIT_FACTOR = 3  # k-means++ on 3·max(k, BATCH) rows (sklearn's default init_size) ...
INIT_BYTES = 1 << 28  # ... unless the sample's float64 rows would pass 256 MiB (then ≥ k rows)
DIST_DECIMALS = 9  # distances between unit rows are in [0, 4]; float64 error ~1e-15
CANDIDATES = 16  # nearest free records kept per unmatched centroid in a matching pass
VERSION = 2  # of the cached --clusters assignments: bump when they are computed otherwise


def code() -> str:
    """What the cached assignments also depend on: the libraries that compute them and the
    settings above (scikit-learn's version read from its metadata: no import)."""
    from importlib.metadata import version

    return (f"scikit-learn {version('scikit-learn')}, numpy {np.__version__}, batch {BATCH}, "
            f"passes {PASSES}, init {INIT_FACTOR}/{INIT_BYTES}")


def kmeans_pick(features: np.ndarray, members: np.ndarray, k: int, noise: np.ndarray,
                seed: int, chunk_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cluster one task's rows into ``k`` clusters and take the distinct record nearest each
    centroid.

    Args:
        features: ``(N, dim)`` array or memmap of the whole store (any float dtype).
        members: ``(m,)`` increasing rows of the task's valid records.
        k: number of clusters, ``0 <= k <= m``.
        noise: ``(m,)`` seeded uniforms of those rows: every pass reads the rows in decreasing
            order of them (:func:`in_draw_order`), and the first are the k-means++ sample.
        seed: ``random_state`` of ``MiniBatchKMeans`` (its reassignment of small clusters).
        chunk_rows: rows read at a time in the matching passes (default: about 64 MiB).

    Returns:
        ``(picked, sizes)``: ``(k,)`` rows, the record matched to each centroid in centroid
        order, and ``(k,)`` int64 number of the task's records nearest each centroid.
    """
    if k <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    if k >= len(members):  # every record its own cluster
        return members.copy(), np.ones(len(members), dtype=np.int64)
    members = in_draw_order(members, noise)
    centers = fit_centers(features, members, k, seed)
    chunk = chunk_rows or default_chunk_rows(features.shape[1])
    picked, sizes = match_streaming(features, members, centers, chunk)
    return members[picked], sizes


def in_draw_order(members: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """``members`` by decreasing seeded uniform (ties: lower row): the order every pass reads
    them in, so that neither the mixture's order nor its chunking changes a result."""
    return members[np.lexsort((members, -noise))]


@dataclass(frozen=True)
class Clusters:
    """A task's rows clustered into a fixed number of clusters (``--clusters``); nothing here
    depends on the budget, so a sweep keeps it (:func:`tive.selection.value_cache.cached_arrays`).

    Attributes:
        rows: ``(m,)`` the task's rows in draw order (:func:`in_draw_order`).
        nearest: ``(m,)`` int64 nearest centroid of each (ties: the lower centroid).
        dist: ``(m,)`` float64 squared distance to it.
        k: ``()`` int64 number of clusters.
    """

    rows: np.ndarray
    nearest: np.ndarray
    dist: np.ndarray
    k: np.ndarray


def cluster_assign(features: np.ndarray, members: np.ndarray, clusters: int, noise: np.ndarray,
                   seed: int, chunk_rows: int | None = None) -> Clusters:
    """Fit ``clusters`` centroids to a task's unit rows (each row its own cluster when the task
    has no more rows) and assign every row to its nearest.

    Args:
        features, members, noise, seed, chunk_rows: as for :func:`kmeans_pick`.
        clusters: clusters to fit (at most ``m``).
    """
    m = len(members)
    k = min(clusters, m)
    members = in_draw_order(members, noise)
    centers = fit_centers(features, members, k, seed) if k < m else unit_rows(features, members)
    chunk = chunk_rows or default_chunk_rows(features.shape[1])
    nearest, dist = assign(features, members, centers, chunk)
    return Clusters(members, nearest, dist, np.int64(k))


def cluster_share(clusters: Clusters, n: int) -> np.ndarray:
    """``(n,)`` distinct rows, increasing: the quota ``n`` shared among the clusters in
    proportion to their size (largest remainder), each cluster giving its records nearest its
    centroid first."""
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    m, k, nearest = len(clusters.rows), int(clusters.k), clusters.nearest
    sizes = np.bincount(nearest, minlength=k)
    share = largest_remainder(n * sizes / m, n)
    order = np.lexsort((np.arange(m), clusters.dist, nearest))  # by cluster, then nearest first
    rank = np.empty(m, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank[order] = np.arange(m) - np.repeat(starts, sizes)
    return np.sort(clusters.rows[rank < share[nearest]])


def assign(features: np.ndarray, members: np.ndarray, centers: np.ndarray,
           chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``(m,)`` nearest centroid of each of the task's rows (ties: the lower centroid) and
    ``(m,)`` float64 squared distance to it, streaming the rows."""
    c64 = centers.astype(np.float64)
    c2 = np.einsum("ij,ij->i", c64, c64)
    nearest = np.empty(len(members), dtype=np.int64)
    dist = np.empty(len(members))
    start = 0
    for block in _unit_blocks(features, members, chunk_rows):
        x = block.astype(np.float64)
        d = sq_dist(x, c64, c2)  # (rows, k)
        rows = slice(start, start + len(x))
        nearest[rows] = np.argmin(d, axis=1)
        dist[rows] = d[np.arange(len(x)), nearest[rows]]
        start += len(x)
    return nearest, dist


def fit_centers(features: np.ndarray, members: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``(k, dim)`` float32 centroids of the task's unit rows: k-means++ (one trial per centroid,
    O(k · sample · dim)) on a seeded sample of
    ``min(m, 3·max(k, BATCH))`` rows (the first of ``members``, which come in draw order;
    fewer if as float64 they would pass :data:`INIT_BYTES`, never fewer than k), then :data:`PASSES` passes of
    ``MiniBatchKMeans.partial_fit`` over consecutive mini-batches of :data:`BATCH` members."""
    from sklearn.cluster import MiniBatchKMeans, kmeans_plusplus

    cap = max(k, INIT_BYTES // (8 * max(features.shape[1], 1)))
    size = min(len(members), max(k, min(INIT_FACTOR * max(k, BATCH), cap)))
    sample = unit_rows(features, members[:size])  # (size, dim)
    # float64: for float32 input sklearn converts the whole sample again for every centroid
    init, _ = kmeans_plusplus(sample.astype(np.float64), k, random_state=seed,
                              n_local_trials=1)
    km = MiniBatchKMeans(n_clusters=k, init=init, n_init=1, batch_size=BATCH,
                         random_state=seed)
    km.partial_fit(sample)  # from the k-means++ centroids, one step on the sample
    del sample
    for _ in range(PASSES):
        for block in _unit_blocks(features, members, BATCH):
            km.partial_fit(block)
    return np.asarray(km.cluster_centers_, dtype=np.float32)


def match_streaming(features: np.ndarray, members: np.ndarray, centers: np.ndarray,
                    chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy distinct matching of centroids to the task's rows, streaming the rows (ties:
    the earlier of ``members``).

    Returns:
        ``(picked, sizes)``: ``(k,)`` positions in ``members`` matched to each centroid, and
        ``(k,)`` int64 records whose nearest centroid each is.
    """
    k = len(centers)
    picked = np.full(k, -1, dtype=np.int64)
    taken = np.zeros(len(members), dtype=bool)
    c2 = np.einsum("ij,ij->i", centers.astype(np.float64), centers.astype(np.float64))
    sizes = None
    while (picked < 0).any():
        open_ = np.flatnonzero(picked < 0)
        cand_d, cand_i, nearest = _candidates(features, members, centers[open_], c2[open_],
                                              taken, chunk_rows)
        if sizes is None:  # first pass: every centroid is open, no record taken
            sizes = np.bincount(nearest, minlength=k).astype(np.int64)
        _match_pass(open_, cand_d, cand_i, picked, taken)
    return picked, sizes


def _candidates(features: np.ndarray, members: np.ndarray, centers: np.ndarray,
                c2: np.ndarray, taken: np.ndarray,
                chunk_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each centroid's :data:`CANDIDATES` nearest free records in one streaming pass.

    Returns:
        ``(d, i, nearest)``: ``(c, M)`` float64 squared distances ascending (``inf`` where
        fewer free records), ``(c, M)`` positions in ``members`` (-1 where none), ``(m,)``
        each record's nearest centroid among ``centers``.
    """
    c, m = len(centers), len(members)
    width = min(CANDIDATES, m)
    best_d = np.full((c, width), np.inf)
    best_i = np.full((c, width), -1, dtype=np.int64)
    nearest = np.empty(m, dtype=np.int64)
    cent = centers.astype(np.float64)  # (c, dim)
    start = 0
    for block in _unit_blocks(features, members, chunk_rows):
        x = block.astype(np.float64)  # (rows, dim)
        pos = np.arange(start, start + len(x))
        d = sq_dist(x, cent, c2)  # (rows, c)
        nearest[pos] = np.argmin(d, axis=1)
        d[taken[pos]] = np.inf
        top = _block_top(d.T, width)  # (c, ≤ width) positions in the block
        best_d, best_i = _merge(best_d, best_i, np.take_along_axis(d.T, top, 1), pos[top])
        start += len(x)
    return best_d, best_i, nearest


def _block_top(d: np.ndarray, width: int) -> np.ndarray:
    """``(c, min(width, rows))`` columns of the smallest entries of each row of ``d``
    ``(c, rows)``; among equal distances the lower columns (argpartition, then a stable sort
    of the rows where a tie straddles the cut)."""
    c, rows = d.shape
    if rows <= width:
        return np.broadcast_to(np.arange(rows), (c, rows)).copy()
    part = np.argpartition(d, width - 1, axis=1)[:, :width]
    cut = np.take_along_axis(d, part, 1).max(axis=1, keepdims=True)  # (c, 1)
    tied = np.flatnonzero((d == cut).sum(axis=1) > (np.take_along_axis(d, part, 1) == cut)
                          .sum(axis=1))
    if len(tied):
        part[tied] = np.argsort(d[tied], axis=1, kind="stable")[:, :width]
    return part


def _merge(best_d: np.ndarray, best_i: np.ndarray, new_d: np.ndarray,
           new_i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep per row the ``width`` smallest of ``(best, new)`` ``(c, ·)``, ordered by distance
    then position."""
    d = np.concatenate([best_d, new_d], axis=1)
    i = np.concatenate([best_i, new_i], axis=1)
    big = np.iinfo(np.int64).max
    order = np.lexsort((np.where(i < 0, big, i), d), axis=1)[:, : best_d.shape[1]]
    return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)


def _match_pass(open_: np.ndarray, cand_d: np.ndarray, cand_i: np.ndarray,
                picked: np.ndarray, taken: np.ndarray) -> None:
    """Match candidate pairs in increasing (distance, centroid, row) order, in place, while
    the result is certain to equal the all-pairs greedy matching."""
    c, width = cand_d.shape
    left = np.full(c, width)  # candidates of each open centroid not yet taken by another
    full = np.isfinite(cand_d[:, -1])  # a list that holds all free records when not full
    bound = np.where(full, cand_d[:, -1], np.inf)  # records outside a list are at least this far
    flat = np.flatnonzero(np.isfinite(cand_d).ravel())
    order = flat[np.lexsort((cand_i.ravel()[flat], flat // width, cand_d.ravel()[flat]))]
    holders: dict[int, list[int]] = {}
    for f in flat:
        holders.setdefault(int(cand_i.ravel()[f]), []).append(int(f // width))
    exhausted = np.inf  # smallest bound of an unmatched centroid whose candidates are all taken
    for f in order:
        j, dist, row = f // width, cand_d.ravel()[f], cand_i.ravel()[f]
        if dist >= exhausted:
            return
        if picked[open_[j]] >= 0:
            continue
        if taken[row]:
            continue
        picked[open_[j]] = row
        taken[row] = True
        for other in holders[row]:  # lists that held ``row`` lose a candidate
            if other != j and picked[open_[other]] < 0:
                left[other] -= 1
                if left[other] == 0:
                    exhausted = min(exhausted, bound[other])


def sq_dist(x: np.ndarray, centers: np.ndarray, c2: np.ndarray) -> np.ndarray:
    """``(rows, c)`` squared distances ``‖x‖² + ‖c‖² − 2 x·c`` in float64 from ``x``
    ``(rows, dim)`` and ``centers`` ``(c, dim)`` float64 with ``c2`` their squared norms,
    rounded to :data:`DIST_DECIMALS` decimals: a matrix product's rounding depends on its
    shape, and would otherwise let the chunking decide between equal distances (copies of a
    record)."""
    d = np.einsum("ij,ij->i", x, x)[:, None] + c2[None, :] - 2.0 * (x @ centers.T)
    return np.round(d, DIST_DECIMALS)


def greedy_match(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """All-pairs twin of the matching, for tests: ``(k,)`` rows of ``x`` ``(m, dim)`` unit
    float32 taken by the centroids ``(k, dim)``, nearest pairs first."""
    x64, c64 = x.astype(np.float64), centers.astype(np.float64)
    d = sq_dist(x64, c64, np.einsum("ij,ij->i", c64, c64)).T  # (k, m)
    k, m = d.shape
    cj, ri = np.meshgrid(np.arange(k), np.arange(m), indexing="ij")
    order = np.lexsort((ri.ravel(), cj.ravel(), d.ravel()))
    picked = np.full(k, -1, dtype=np.int64)
    taken = np.zeros(m, dtype=bool)
    for f in order:
        j, r = cj.ravel()[f], ri.ravel()[f]
        if picked[j] < 0 and not taken[r]:
            picked[j], taken[r] = r, True
    return picked


def unit_rows(features: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``(len(rows), dim)`` float32 copies of ``features[rows]`` scaled to unit length (zero
    rows stay zero), in the order of ``rows`` (read in increasing order)."""
    order = np.argsort(rows, kind="stable")
    block = np.empty((len(rows), features.shape[1]), dtype=np.float32)
    block[order] = np.asarray(features[rows[order]], dtype=np.float32)
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return block / np.where(norms > 0, norms, 1.0)


def _unit_blocks(features: np.ndarray, members: np.ndarray, rows: int) -> Iterator[np.ndarray]:
    """Unit float32 blocks of up to ``rows`` of ``members``, in their order; each block's pages
    are released from this process once read (see :func:`tive.selection.values._pager`)."""
    advise = _pager(features)
    for start in range(0, len(members), rows):
        part = members[start:start + rows]
        block = unit_rows(features, part)
        advise(int(part.min()), int(part.max()) + 1, "done")
        yield block
