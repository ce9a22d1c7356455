"""The warm-up's progress per task: each task's loss on records the warm-up did not train on,
under the base model and under the reference (docs/design.md, "Task values").

``tive score`` writes it once per store, as ``STORE/probe.json``: for each task up to
:data:`PER_TASK` records outside the warm-up sample (chosen by their content keys, so the same
whatever the order of the records), each record's mean token loss with the adapter off (the
base model) and on (the reference), in eval mode, no gradients. ``--task-value progress``
reads it: a task whose held-out loss the warm-up did not lower is not being learned, however
large its gradients.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from tive.errors import DataError
from tive.fileio import atomic_path

PROBE_FILE = "probe.json"
PER_TASK = 32  # held-out records per task (the whole task when it has fewer left)
BATCH = 8  # records per forward pass
VERSION = 1


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
    from tive.selection import uniforms
    from tive.tasks import factorize

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

    from tive.encode import collate, encode_row, pad_id
    from tive.gradients import record_losses, text_vocab
    from tive.models.registry import derives_positions
    from tive.skips import SkipReason

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


def per_task(tasks: np.ndarray, found: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Task → ``{"records", "base", "reference"}``: the mean losses of its probe records."""
    names = tasks[found["rows"]].astype(str)
    out = {}
    for t in sorted(set(names.tolist())):
        at = names == t
        out[t] = {"records": int(at.sum()), "base": float(found["base"][at].mean()),
                  "reference": float(found["reference"][at].mean())}
    return out


def write_probe(store_root: Path, tasks: np.ndarray, found: dict[str, np.ndarray],
                adapter: str, sample_known: bool = True) -> dict[str, Any]:
    """Write ``STORE/probe.json`` atomically; return what it holds.

    Args:
        sample_known: whether the warm-up sample was known (and left out); when not, probe
            records may include records the adapter was trained on.
    """
    path = Path(store_root) / PROBE_FILE
    info = {"version": VERSION, "adapter": adapter, "records": len(tasks),
            "sample_known": sample_known, "per_task_limit": PER_TASK,
            "rows": found["rows"].tolist(), "base": found["base"].tolist(),
            "reference": found["reference"].tolist(), "tasks": per_task(tasks, found)}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return info


def read_probe(store_root: Path) -> dict[str, Any] | None:
    """``STORE/probe.json``, or None when the store has none.

    Raises:
        DataError: the file is there but damaged.
    """
    path = Path(store_root) / PROBE_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        records = info["records"]
        rows = np.asarray(info["rows"])
        base = np.asarray(info["base"], dtype=np.float64)
        ref = np.asarray(info["reference"], dtype=np.float64)
        if not (rows.shape == base.shape == ref.shape and rows.ndim == 1):
            raise ValueError("rows, base and reference differ in length")
        if not isinstance(records, int) or (len(rows) and (
                rows.dtype.kind not in "iu" or rows.min() < 0 or rows.max() >= records
                or len(np.unique(rows)) != len(rows))):
            raise ValueError(f"rows are not distinct positions among {records!r} records")
        rows = rows.astype(np.int64)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: damaged ({type(e).__name__}: {e}); fix: delete it and run "
                        f"tive score --run RUN again (only the probe is computed)") from None
    return {**info, "rows": rows, "base": base, "reference": ref}


def progress_ratios(codes: np.ndarray, n_tasks: int, valid: np.ndarray,
                    probe: dict[str, Any]) -> np.ndarray:
    """``(n_tasks,)`` relative drop of each task's probe loss, ``max(0, 1 − L_ref / L_base)``
    (means over the task's valid probe records); NaN for a task with none.

    Args:
        codes: ``(N,)`` task code of each record; ``valid``: ``(N,)`` bool.
        probe: :func:`read_probe`'s result.
    """
    if probe["records"] != len(codes):
        raise DataError(f"probe.json: made for {probe['records']:,} records, this report has "
                        f"{len(codes):,}; fix: delete it and run tive score --run RUN again "
                        f"(only the probe is computed)")
    rows, base, ref = probe["rows"], probe["base"], probe["reference"]
    ok = valid[rows] & np.isfinite(base) & np.isfinite(ref)
    c = codes[rows[ok]]
    n = np.bincount(c, minlength=n_tasks).astype(np.float64)
    lb = np.bincount(c, weights=base[ok], minlength=n_tasks)
    lr = np.bincount(c, weights=ref[ok], minlength=n_tasks)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(lb > 0, 1.0 - lr / np.where(lb > 0, lb, 1.0), 0.0)
    return np.where(n > 0, np.maximum(ratio, 0.0), math.nan)
