"""Which rows each scoring batch holds, and in which order the batches run.

Batches are fixed slices of the data's rows (batch ``j`` is rows ``[jB, (j+1)B)``, or with
length grouping the same rows within windows ordered longest first), so what a batch computes
never depends on when or where it runs: a resumed run scores exactly the batches an
uninterrupted one would (docs/design.md, "Scoring").
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tive.data.mixture import Mixture
from tive.models.family import IMAGE_TOKENS

GROUP_WINDOW = 64  # batches per window of length grouping
TURN_TOKENS = 4  # template tokens around a turn, for the length estimate of grouping


def plan_batches(n: int, batch_size: int,
                 lengths: np.ndarray | None = None) -> list[np.ndarray]:
    """The store rows of every batch, in the order they are scored.

    Without ``lengths``: consecutive slices of ``batch_size`` rows. With ``lengths`` ``(N,)``:
    each window of ``GROUP_WINDOW × batch_size`` consecutive rows is ordered longest first
    (stable, so ties keep row order) and cut into batches, so that a batch pads little. The
    plan depends only on the mixture and ``batch_size``, never on what is done already: a
    resumed run scores exactly the batches an uninterrupted one would.

    Returns:
        int64 arrays of rows; together every row of ``range(n)`` once.
    """
    if lengths is not None and len(lengths) != n:
        raise ValueError(f"lengths has {len(lengths)} rows, expected {n}")
    out = []
    window = GROUP_WINDOW * batch_size if lengths is not None else batch_size
    for start in range(0, n, window):
        rows = np.arange(start, min(start + window, n), dtype=np.int64)
        if lengths is not None:
            rows = rows[np.argsort(-np.asarray(lengths[rows], dtype=np.int64), kind="stable")]
        out.extend(rows[i:i + batch_size] for i in range(0, len(rows), batch_size))
    return out


def pending_batches(plan: list[np.ndarray], done: np.ndarray) -> list[np.ndarray]:
    """The rows not done of each batch of ``plan`` that has any.

    A batch is committed whole, so with the settings a store was begun with these are whole
    batches of the plan (and a resumed run is bit-identical); after a change of
    ``--batch-size`` or grouping, rows already done are not scored again.
    """
    out = []
    for rows in plan:
        left = rows[~done[rows]]
        if len(left):
            out.append(left)
    return out


def record_lengths(mixture: Mixture, encoder: Any, rows: np.ndarray | None = None,
                   chunk: int = 4096) -> np.ndarray:
    """``(N,)`` int64: each record's length in tokens as ``encoder`` makes it, estimated
    without loading images — its turns' text through the tokenizer (batched), plus
    ``TURN_TOKENS`` of template per turn and the encoder's tokens per image, at most its
    ``max_length``. The sort key of length grouping; integers, so every rank agrees.

    Args:
        rows: the rows to measure (others are 0); None: all.
    """
    out = np.zeros(len(mixture), dtype=np.int64)
    rows = np.arange(len(mixture)) if rows is None else np.asarray(rows, dtype=np.int64)
    per_image = getattr(encoder, "image_tokens", None) or IMAGE_TOKENS  # fixed, or estimated
    for start in range(0, len(rows), chunk):
        records = [mixture[int(i)] for i in rows[start:start + chunk]]
        # a lone surrogate (which JSON can hold) becomes "?": no tokenizer takes it, and the
        # record itself is skipped as an encoder error when it is scored
        texts = ["\n".join(t.text for t in r.turns).encode("utf-8", "replace").decode("utf-8")
                 for r in records]
        ids = encoder.tokenizer(texts, add_special_tokens=False)["input_ids"]
        out[rows[start:start + chunk]] = [
            len(x) + TURN_TOKENS * len(r.turns) + per_image * len(r.images)
            for x, r in zip(ids, records)]
    return np.minimum(out, encoder.max_length)


def open_window_rows(done: np.ndarray, batch_size: int) -> np.ndarray:
    """Rows of the grouping windows that still have a row not done (the only ones whose
    lengths the plan needs: a window all done has no pending batch, whatever its order)."""
    window = GROUP_WINDOW * batch_size
    spans = [np.arange(s, min(s + window, len(done)))
             for s in range(0, len(done), window) if not done[s:s + window].all()]
    return np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)


def plan_work(mixture: Mixture, encoder: Any, done: np.ndarray, batch: int, grouped: bool,
              dist: Any) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray | None]:
    """All pending batches, this rank's share of them (``dist``: :class:`~tive.util.dist.Dist`),
    and the ``(N,)`` length estimates when ``grouped`` (else None)."""
    lengths = None
    if grouped:  # measured once, on rank 0, so that every rank has one plan
        lengths = dist.broadcast(
            record_lengths(mixture, encoder, open_window_rows(done, batch))
            if dist.rank == 0 else None)
    work = pending_batches(plan_batches(len(mixture), batch, lengths), done)
    return work, work[dist.rank::dist.world], lengths


def progress_bar(mine: list[np.ndarray], lengths: np.ndarray | None, shown: bool,
                 dist: Any) -> Any:
    """The progress bar: in estimated tokens with grouping (longest batches first, so the time
    left is honest), else in records; shown on rank 0 only."""
    from tqdm.auto import tqdm

    from tive.util.progress import TokenBar

    total = sum(len(rows) for rows in mine)
    options = {"disable": not shown or dist.rank != 0 or total == 0, "smoothing": 0.1,
               "desc": "score" if dist.world == 1 else f"score (rank 0 of {dist.world})"}
    return (TokenBar(mine, lengths, **options) if lengths is not None
            else tqdm(total=total, unit="rec", **options))
