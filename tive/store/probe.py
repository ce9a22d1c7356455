"""``STORE/probe.json``: the warm-up's progress per task, as ``tive score`` measured it
(:mod:`tive.scoring.probe`): which held-out records, their loss under the base model and under
the reference, per task; and the relative drop ``--task-value progress`` weighs by
(docs/design.md, "Task values").
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from tive.errors import DataError
from tive.util.files import atomic_path

PROBE_FILE = "probe.json"
PER_TASK = 32  # held-out records per task (the whole task when it has fewer left)
VERSION = 1


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
