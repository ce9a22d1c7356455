"""What ``tive report`` and the HTML page show of a target (docs/design.md, "Targeted
selection"): per task its alignment with the target and the target task it serves, and for
its records closest to the target, the nearest target example of each.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tive.selection.targeted import nearest_target
from tive.store.format import Store

TOP = 3  # records shown per task


def target_summary(report: Any, top: int = TOP) -> dict[str, Any]:
    """``{"tasks": {task: {"serves", "alignment", "top": [...]}}}`` in the report's task order;
    each of ``top`` entries (the task's records of largest ``tive-target`` instance value) is
    ``{"row", "id", "value", "nearest": {"row", "id", "task", "cosine"}}``."""
    values, target = report.targeted(), report.target
    ids = report.mixture.ids if report.mixture is not None else None
    if ids is None and report.source.get("store"):  # data=False: the store's own index
        ids = [e.id for e in Store.open(report.source["store"]).index()]
    tasks = {}
    for task in report.task_names:
        members = report.members(task)
        v = values.instance[members]
        order = members[np.argsort(-np.where(np.isfinite(v), v, -np.inf), kind="stable")]
        rows = [int(r) for r in order[:top] if np.isfinite(values.instance[r])]
        near = nearest_target(report.features, np.array(rows, dtype=np.int64), target) \
            if rows else []
        value = values.task_values.get(task, math.nan)
        tasks[task] = {
            "serves": values.serves.get(task) if np.isfinite(value) else None,
            "alignment": float(value) if np.isfinite(value) else None,
            "top": [{"row": r, "id": ids[r] if ids is not None else str(r),
                     "value": float(values.instance[r]),
                     "nearest": {"row": j, "id": target.ids[j] if j >= 0 else None,
                                 "task": str(target.tasks[j]) if j >= 0 else None,
                                 "cosine": c}}
                    for r, (j, c) in zip(rows, near) if j >= 0]}
    return {"target_tasks": list(values.names), "tasks": tasks}


def summary_lines(summary: dict[str, Any]) -> list[list[str]]:
    """Rows of the plain-text table: task, serves, alignment, its top record → nearest target
    example (cosine)."""
    rows = []
    for task, e in summary["tasks"].items():
        first = e["top"][0] if e["top"] else None
        near = (f"{first['id']} → {first['nearest']['id']} ({first['nearest']['task']}, "
                f"cos {first['nearest']['cosine']:.3f})" if first else "-")
        value = e["alignment"]
        rows.append([task, e["serves"] or "-", "-" if value is None else f"{value:.4g}", near])
    return rows
