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

    pool = np.ones(len(tasks), dtype=bool)
    pool[np.asarray(trained, dtype=np.int64)] = False
    order = np.lexsort((np.arange(len(keys)), uniforms(keys, 0)))  # by seeded uniform
    order = order[pool[order]]
    chosen = []
    for task in np.unique(tasks[order].astype(str)):
        chosen.append(order[tasks[order].astype(str) == task][:per_task])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


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
    items = [(int(r), encode_row(encoder, mixture, int(r), image_root)) for r in rows]
    items = [(r, e) for r, e in items if not isinstance(e, SkipReason)]
    hf = peft_model.get_base_model()
    device = next(peft_model.parameters()).device
    own_positions = derives_positions(getattr(hf.config, "model_type", ""))
    vocab, pad = text_vocab(hf.config), pad_id(loaded.tokenizer)
    was_training = peft_model.training
    peft_model.eval()
    out: dict[str, list[float]] = {"base": [], "reference": []}
    with torch.no_grad():
        for start in range(0, len(items), BATCH):
            batch = collate([e for _, e in items[start:start + BATCH]], pad)
            labels = batch.pop("labels").to(device)
            inputs = {k: v.to(device) for k, v in batch.items() if v is not None}
            if not own_positions:
                inputs["position_ids"] = (inputs["attention_mask"].long().cumsum(-1) - 1) \
                    .clamp(min=0)
            for name in ("base", "reference"):
                with peft_model.disable_adapter() if name == "base" else nullcontext():
                    loss, _ = record_losses(hf.model, hf.get_output_embeddings(), vocab,
                                            torch.float64, inputs, labels)
                out[name] += loss.cpu().tolist()
    peft_model.train(was_training)
    return {"rows": np.array([r for r, _ in items], dtype=np.int64),
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
                adapter: str) -> Path:
    """Write ``STORE/probe.json`` atomically."""
    path = Path(store_root) / PROBE_FILE
    info = {"version": VERSION, "adapter": adapter, "per_task_limit": PER_TASK,
            "rows": found["rows"].tolist(), "base": found["base"].tolist(),
            "reference": found["reference"].tolist(), "tasks": per_task(tasks, found)}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return path


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
        rows = np.asarray(info["rows"], dtype=np.int64)
        base = np.asarray(info["base"], dtype=np.float64)
        ref = np.asarray(info["reference"], dtype=np.float64)
        if not (rows.shape == base.shape == ref.shape and rows.ndim == 1):
            raise ValueError("rows, base and reference differ in length")
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
    rows = probe["rows"]
    keep = (rows < len(codes))
    rows, base, ref = rows[keep], probe["base"][keep], probe["reference"][keep]
    ok = valid[rows] & np.isfinite(base) & np.isfinite(ref)
    c = codes[rows[ok]]
    n = np.bincount(c, minlength=n_tasks).astype(np.float64)
    lb = np.bincount(c, weights=base[ok], minlength=n_tasks)
    lr = np.bincount(c, weights=ref[ok], minlength=n_tasks)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(lb > 0, 1.0 - lr / np.where(lb > 0, lb, 1.0), 0.0)
    return np.where(n > 0, np.maximum(ratio, 0.0), math.nan)
