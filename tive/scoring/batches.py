"""Feeding the scoring loop: planned batches encoded ahead of the model, in worker processes.

:class:`EncodedBatches` turns one planned batch of store rows into model inputs (images read
and preprocessed, records tokenised, collated). :func:`prepared_batches` runs it in a
``torch.utils.data.DataLoader`` with ``workers`` processes (pinned memory on a GPU, a few
batches ahead), or in a thread of this process when ``workers`` is 0. Either way the batches
come in plan order, so the store is written in the same order and holds the same bytes.

``--batch-size auto`` (:func:`split_rows`, :data:`AUTO_START`): batches are planned at
:data:`AUTO_START` records; when one does not fit in GPU memory it is halved and retried, and
every later batch is cut to the size that fitted.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tive.models.encoding import collate, encode_row
from tive.models.skips import SkipReason

AUTO_START = 64  # records per planned batch with --batch-size auto (halved until it fits)


@dataclass
class Prepared:
    """One planned batch, ready for the model.

    Attributes:
        rows: ``(B,)`` store rows of the batch, scored or skipped.
        at: ``(b,)`` positions in ``rows`` of the records that were encoded.
        reasons: per row, why it could not be encoded (None when it was).
        inputs: the collated model inputs of the ``b`` encoded records (None when b = 0).
    """

    rows: np.ndarray
    at: np.ndarray
    reasons: list[SkipReason | None]
    inputs: dict[str, torch.Tensor] | None


class EncodedBatches(torch.utils.data.Dataset):
    """Item ``i``: the ``i``-th batch of ``work`` encoded and collated (a :class:`Prepared`)."""

    def __init__(self, encoder: Any, mixture: Any, work: list[np.ndarray], image_root: Any,
                 pad: int, padding_side: str) -> None:
        self.encoder, self.mixture, self.work = encoder, mixture, work
        self.image_root, self.pad, self.padding_side = image_root, pad, padding_side

    def __len__(self) -> int:
        return len(self.work)

    def __getitem__(self, i: int) -> Prepared:
        rows = self.work[i]
        items, at, reasons = [], [], []
        for k, row in enumerate(rows.tolist()):
            item = encode_row(self.encoder, self.mixture, row, self.image_root)
            if isinstance(item, SkipReason):
                reasons.append(item)
            else:
                items.append(item)
                at.append(k)
                reasons.append(None)
        inputs = ({k: v for k, v in collate(items, self.pad, self.padding_side).items()
                   if v is not None} if items else None)
        return Prepared(rows, np.asarray(at, dtype=np.int64), reasons, inputs)


def default_workers(device: torch.device, processes_per_node: int = 1) -> int:
    """0 on a CPU (the model needs the cores); on a GPU, the cores this process may use
    less one for itself, shared among the node's processes, at most 8."""
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 2)
    return max(1, min(8, cores // max(1, processes_per_node) - 1))


def prepared_batches(dataset: EncodedBatches, workers: int,
                     pin: bool = False) -> Iterator[Prepared]:
    """The batches of ``dataset`` in order, encoded ``workers`` processes ahead (0: one thread
    of this process, one batch ahead). Closing the iterator stops the workers."""
    if workers == 0:
        yield from _prefetch(dataset[i] for i in range(len(dataset)))
        return
    # tokenizers' own threads must not be used across fork
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin,
        prefetch_factor=2, collate_fn=_as_is)
    it = iter(loader)
    try:
        yield from it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def split_rows(work: list[np.ndarray], limit: int | None) -> list[np.ndarray]:
    """``work`` with every batch longer than ``limit`` cut into consecutive pieces of at most
    ``limit`` rows (the plan's order kept); ``None``: unchanged."""
    if limit is None:
        return list(work)
    return [rows[i:i + limit] for rows in work for i in range(0, len(rows), limit)]


def _as_is(item: Prepared) -> Prepared:
    return item


def _prefetch(it: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run ``it`` ahead in a thread (encoding overlaps the model's work)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    end = object()
    stop = threading.Event()

    def worker() -> None:
        try:
            for x in it:
                if stop.is_set():
                    return
                q.put(x)
            q.put(end)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while True:
            x = q.get()
            if x is end:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        while thread.is_alive():  # unblock a worker waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)
