"""Measuring the warm-up's progress per task: each task's loss on records the warm-up did not
train on, under the base model and under the reference (docs/design.md, "Task values").

``tive score`` measures it once per store, written as ``STORE/probe.json``
(:mod:`tive.store.probe`): for each task up to
:data:`PER_TASK` records outside the warm-up sample (chosen by their content keys, so the same
whatever the order of the records), each record's mean token loss with the adapter off (the
base model) and on (the reference), in eval mode, no gradients. ``--task-value progress``
reads it: a task whose held-out loss the warm-up did not lower is not being learned, however
large its gradients.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np

from tive.data.tasks import factorize
from tive.models.encoding import collate, encode_row, pad_id
from tive.models.load import text_vocab
from tive.models.registry import derives_positions
from tive.models.skips import SkipReason
from tive.scoring.gradients import record_losses
from tive.selection.quotas import uniforms
from tive.store.probe import PER_TASK

BATCH = 8  # records per forward pass


def probe_rows(tasks: np.ndarray, keys: np.ndarray, trained: np.ndarray,
               per_task: int = PER_TASK) -> np.ndarray:
    """Up to ``per_task`` rows of each task that the warm-up did not train on.

    Args:
        tasks: ``(N,)`` task of each record.
        keys: ``(N,)`` uint64 content keys (the choice follows them, not the row order).
        trained: rows of the warm-up sample.

    Returns:
        increasing rows.
    """
    pool = np.ones(len(tasks), dtype=bool)
    pool[np.asarray(trained, dtype=np.int64)] = False
    _, codes = factorize(tasks)
    # by task, then by seeded uniform (ties by row); keep each task's first per_task
    order = np.lexsort((np.arange(len(keys)), uniforms(keys, 0), codes))
    order = order[pool[order]]
    starts = np.flatnonzero(np.r_[True, np.diff(codes[order]) != 0])
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    return np.sort(order[rank < per_task])


def measure(peft_model: Any, loaded: Any, mixture: Any, rows: np.ndarray, max_length: int,
            image_root: Any = None) -> dict[str, np.ndarray]:
    """Each row's mean token loss with the adapter off and on.

    Returns:
        ``{"rows", "base", "reference"}``: ``(P,)`` rows that could be encoded and their
        float64 losses.
    """
    import torch

    encoder = loaded.encoder(max_length)
    hf = peft_model.get_base_model()
    device = next(peft_model.parameters()).device
    own_positions = derives_positions(getattr(hf.config, "model_type", ""))
    vocab, pad = text_vocab(hf.config), pad_id(loaded.tokenizer)
    was_training = peft_model.training
    peft_model.eval()
    dtype = torch.float64 if next(hf.parameters()).dtype == torch.float64 else torch.float32
    out: dict[str, list[float]] = {"base": [], "reference": []}
    kept: list[int] = []
    with torch.no_grad():
        for start in range(0, len(rows), BATCH):  # encoded batch by batch (images included)
            items = [(int(r), encode_row(encoder, mixture, int(r), image_root))
                     for r in rows[start:start + BATCH]]
            items = [(r, e) for r, e in items if not isinstance(e, SkipReason)]
            if not items:
                continue
            kept += [r for r, _ in items]
            batch = collate([e for _, e in items], pad)
            labels = batch.pop("labels").to(device)
            inputs = {k: v.to(device) for k, v in batch.items() if v is not None}
            if not own_positions:
                inputs["position_ids"] = (inputs["attention_mask"].long().cumsum(-1) - 1) \
                    .clamp(min=0)
            for name in ("base", "reference"):
                with peft_model.disable_adapter() if name == "base" else nullcontext():
                    loss, _ = record_losses(hf.model, hf.get_output_embeddings(), vocab, dtype,
                                            inputs, labels)
                out[name] += loss.double().cpu().tolist()
    peft_model.train(was_training)
    return {"rows": np.array(kept, dtype=np.int64),
            "base": np.array(out["base"]), "reference": np.array(out["reference"])}
