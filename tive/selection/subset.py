"""A :class:`Selection`: the subset a :class:`~tive.selection.report.Report` chose, its
table and JSON report, and ``save`` (the files are written by :mod:`tive.output.saving`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tive.output.saving import save_selection
from tive.output.tables import fmt_value, format_table, json_float
from tive.output.views import Values
from tive.selection.methods import method_named
from tive.selection.settings import SelectConfig


@dataclass
class Selection:
    """A chosen subset.

    Attributes:
        indices: ``(B,)`` mixture rows in increasing order, repeated where oversampled.
        quotas: task → number of records chosen from it.
        config: the settings that made it.
        budget: B.
        report: the :class:`~tive.selection.report.Report` it came from.
        notes: lines worth telling the user (printed by ``tive select``).
    """

    indices: np.ndarray
    quotas: dict[str, int]
    config: SelectConfig
    budget: int
    report: Values
    notes: list[str] = field(default_factory=list)

    def selected(self) -> dict[str, int]:
        """Records chosen per task (counting repeats)."""
        return self.report.count_by_task(self.indices)

    def to_dict(self) -> dict[str, Any]:
        """The JSON report: settings, totals, and per task its size, value, quota, selection."""
        r = self.report
        sizes, valid, chosen = r.sizes, r.valid_sizes(), self.selected()
        seen = np.zeros(len(r.tasks), dtype=bool)
        seen[self.indices] = True  # rows chosen at least once
        unique = r.count_by_task(seen)
        tasks = {t: {"records": sizes[t], "valid": valid[t],
                     "value": json_float(r.task_values.get(t, math.nan)),
                     "excluded": t in self.config.exclude,
                     "quota": self.quotas.get(t, 0), "selected": chosen[t],
                     "unique": unique[t]}
                 for t in r.task_names}
        if method_named(self.config.method).needs_target:  # what the target made of each task
            aligned = r.targeted().task_values
            for t, e in tasks.items():
                e["alignment"] = json_float(aligned.get(t, math.nan))
        inferred = None if r.inferred is None else int(r.inferred.sum())
        return {"settings": self.config.to_dict(), "budget_kind": self.config.budget.to_dict()["kind"],
                "records": len(r.tasks), "budget": self.budget,
                "selected": int(len(self.indices)), "unique": int(seen.sum()),
                "left_out": dict(r.invalid), "inferred_task_labels": inferred,
                "source": r.source, "tasks": tasks}

    def table(self) -> str:
        """Plain-text table: per task records, value, quota, selected, share before → after."""
        r, d = self.report, self.to_dict()
        n, b = max(len(r.tasks), 1), max(len(self.indices), 1)
        columns = ["task", "records", "value", "alignment", "quota", "selected", "share"]
        if not self.uses_values():
            columns.remove("value")
        if not method_named(self.config.method).needs_target:
            columns.remove("alignment")
        if not self.by_task():
            columns.remove("quota")
        rows = []
        for t, e in d["tasks"].items():
            cells = {"task": t, "records": f"{e['records']:,}", "value": fmt_value(e["value"]),
                     "alignment": fmt_value(e.get("alignment")),
                     "quota": "excluded" if e["excluded"] else f"{e['quota']:,}",
                     "selected": "excluded" if e["excluded"] and "quota" not in columns
                     else f"{e['selected']:,}",
                     "share": f"{e['records'] / n:.1%} → {e['selected'] / b:.1%}"}
            rows.append([cells[c] for c in columns])
        return format_table(columns, rows)

    def by_task(self) -> bool:
        """Whether the method fills a quota per task (else it ranks or draws over the mixture,
        and has no quota column)."""
        return method_named(self.config.method).by_task

    def uses_values(self) -> bool:
        """Whether the task values set the quotas (``tive``, ``kmeans --quota value``)."""
        return method_named(self.config.method).weighs_by_value(self.config.quota)

    def save(self, path: str | Path,
             inputs: Sequence[str | Path] = ()) -> dict[str, Path]:
        """Write the subset, ``<stem>.report.json``, ``<stem>.png``, ``<stem>.html`` (the
        page of :mod:`tive.output.page`) and, with data, ``<stem>.manifest.json`` (what
        ``tive apply`` rebuilds the subset from) beside it, all or none: each is written under
        a temporary name, and they are renamed only once all are written (a full disk while
        drawing the chart leaves the old outputs as they were).

        With data, the subset is written in the input's own format, records verbatim. Without
        data (arrays only), ``path`` receives the selected row indices as a JSON list.

        Args:
            inputs: files this selection reads (besides the mixture, always protected), which
                no output may overwrite.

        Returns:
            ``{"subset": ..., "report": ..., "chart": ..., "html": ...}`` paths, and
            ``"manifest"`` with data.

        Raises:
            OutputError: an output would land on an input, or writing failed (nothing written).
        """
        return save_selection(self, path, inputs)

    def __repr__(self) -> str:
        return (f"<tive.Selection: {len(self.indices):,} records "
                f"({self.config.method}, budget {self.config.budget})>\n{self.table()}")
