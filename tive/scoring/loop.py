"""The scoring loop: prepared batches through the gradient features into the store's rows,
halving a batch that does not fit in GPU memory (``--batch-size auto``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tive.data.mixture import Mixture
from tive.errors import OutputError
from tive.models.skips import SkipReason
from tive.scoring.batches import (
    AUTO_START,
    EncodedBatches,
    default_workers,
    prepared_batches,
    split_rows,
)
from tive.scoring.settings import ScoreConfig
from tive.store.format import Store
from tive.store.writers import RowWriter
from tive.util.dist import Dist
from tive.util.files import write_json


def score_batches(gf: Any, encoder: Any, pad: int, mixture: Mixture, work: list[np.ndarray],
                  writer: RowWriter, config: ScoreConfig, image_root: Any = None,
                  progress: Any = None, workers: int = 0, pin: bool = False,
                  limit: int | None = None,
                  on_limit: Any = None) -> int:
    """Compute and write ``work`` (the store rows of each batch, in order); return the rows
    written.

    Args:
        workers: processes encoding batches ahead (0: a thread of this one).
        pin: pinned host memory for the inputs (their copy to the GPU overlaps).
        limit: most records per forward/backward (``--batch-size auto``: batches are cut to
            it; None with a fixed batch size, whose batches are never cut).
        on_limit: called with the new limit when a batch did not fit in GPU memory and was
            halved (``--batch-size auto``); None: out of memory is an error.
    """
    written = 0
    pending = split_rows(work, limit)
    while pending:
        dataset = EncodedBatches(encoder, mixture, pending, image_root, pad,
                                 config.padding_side)
        done = 0
        try:
            for prepared in prepared_batches(dataset, workers, pin):
                _score_one(gf, prepared, writer)
                done += 1
                written += len(prepared.rows)
                if progress is not None:
                    progress.update(len(prepared.rows))
            pending = []
        except torch.cuda.OutOfMemoryError:
            failed = pending[done]
            if on_limit is None or len(failed) == 1:
                raise OutputError(_oom_message(mixture, failed, on_limit is None)) from None
            limit = len(failed) // 2  # halve, and retry the same rows
            on_limit(limit)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            pending = split_rows(pending[done:], limit)
    return written


def _score_one(gf: Any, prepared: Any, writer: RowWriter) -> None:
    """Features of one prepared batch, written with each row's skip reason."""
    rows, at = prepared.rows, prepared.at
    n = len(rows)
    features = np.zeros((n, gf.projector.dim), dtype=np.float32)
    norms = np.full(n, np.nan)
    loss = np.full(n, np.nan)
    ntokens = np.full(n, -1, dtype=np.int64)
    skipped = np.array([0 if r is None else r.code for r in prepared.reasons], dtype=np.int8)
    if prepared.inputs is not None:
        result = gf(prepared.inputs)
        features[at] = unit_rows(result.features)
        norms[at], loss[at] = result.norms, result.loss
        ntokens[at] = result.ntokens
        bad = ~result.finite
        skipped[at[bad]] = SkipReason.NON_FINITE.code
        skipped[at[result.ntokens == 0]] = SkipReason.NO_SUPERVISED_TOKEN.code
    writer.write(rows, features, norms, loss, ntokens, skipped)


def _oom_message(mixture: Mixture, rows: np.ndarray, fixed: bool) -> str:
    first = mixture[int(rows[0])]
    if fixed:
        return (f"a batch of {len(rows)} records (from record {int(rows[0])}, id {first.id}) "
                f"does not fit in GPU memory; nothing of it was written; fix: --batch-size auto "
                f"(halves until it fits), a smaller --batch-size, or --gradient-checkpointing")
    return (f"record {int(rows[0])} (id {first.id}) alone does not fit in GPU memory; fix: a "
            f"smaller --max-length, --gradient-checkpointing, or --key-layers last:N")


def unit_rows(features: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (zero rows stay zero).

    Selection uses only the features' directions (cosines); the exact gradient norm is kept
    in ``norms.npy``. Unit rows always fit float16 with full relative precision, whatever the
    size of the gradient (a well-learnt record's tiny gradient would underflow otherwise).
    """
    f = features.astype(np.float64)
    n = np.linalg.norm(f, axis=1, keepdims=True)
    return np.divide(f, n, out=np.zeros_like(f), where=n > 0).astype(np.float32)


@dataclass
class Feeding:
    """How the planned batches reach the model.

    Attributes:
        planned: records per planned batch (``--batch-size``, or :data:`AUTO_START` for auto).
        auto: ``--batch-size auto``: a batch that does not fit in GPU memory is halved.
        limit: most records per forward/backward so far (auto; None: the planned size).
        workers: encoding processes (0: a thread of this one).
        pin: inputs in pinned memory (on a GPU).
        rank: this process's rank (rank 0 alone writes meta.json).
        halvings: how often auto halved the batch in this run.
    """

    planned: int
    auto: bool
    limit: int | None
    workers: int
    pin: bool
    rank: int = 0
    halvings: int = 0

    @classmethod
    def resolve(cls, config: ScoreConfig, device: torch.device, dist: Dist,
                store: Store) -> Feeding:
        """The feeding of this run; auto resumes from the size a killed run had reached."""
        auto = config.batch_size == "auto"
        workers = (default_workers(device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
                   if config.workers is None else config.workers)
        reached = store.meta.get("settings", {}).get("batch_used") if auto else None
        return cls(AUTO_START if auto else int(config.batch_size), auto,
                   int(reached) if isinstance(reached, int) else None, workers,
                   device.type == "cuda", dist.rank)

    def record(self, root: Path) -> Any:
        """The ``on_limit`` of :func:`score_batches`: remember the size that fits, in this
        object and (rank 0's) in ``meta.json``, so a resumed run starts from it."""
        def on_limit(limit: int) -> None:
            self.limit, self.halvings = limit, self.halvings + 1
            if self.rank == 0:
                meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
                meta.setdefault("settings", {})["batch_used"] = limit
                write_json(root / "meta.json", meta)

        return on_limit

    def describe(self) -> str:
        workers = f"{self.workers} encoding worker{'s' if self.workers != 1 else ''}"
        if not self.auto:
            return f"{self.planned} ({workers})"
        used = self.limit or self.planned
        how = (f", after {self.halvings} halving{'s' if self.halvings > 1 else ''} out of GPU "
               f"memory" if self.halvings else "")
        return f"auto → {used}{how} ({workers})"
