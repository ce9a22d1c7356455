"""Every health check of a run folder (``tive check``, ``tive report``, :func:`tive.check`),
and those that ``tive select`` adds to its selection (docs/design.md, "Health checks")."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tive.data.tasks import factorize
from tive.health.findings import WARNING, Finding
from tive.health.store_checks import data_findings, store_findings
from tive.health.value_checks import (
    label_findings,
    quota_findings,
    report_findings,
    selection_findings,
    value_findings,
)
from tive.output.saving import find_reports
from tive.selection import valuation
from tive.selection.report import Report
from tive.store.format import Store


def run_findings(store: Store, report: Report | None = None, data: Any = None,
                 task_field: str | None = None) -> list[Finding]:
    """Every check of a complete store, the data it was built from (or ``data``), its values
    (``report``, else built from the store) and the selections saved beside it.

    Raises:
        StoreError: the store is missing, damaged or incomplete.
    """
    store.require_complete()
    from_data, mixture, labels = data_findings(store, data, task_field)
    if report is None:
        matches = mixture is not None and not any(f.level == WARNING for f in from_data)
        report = valuation.from_store(store, str(mixture.path) if matches else False,
                                      task_field, None, False, False, None)
    found = [*from_data, *store_findings(store), *report_findings(report)]
    if report.inferred is None and labels is not None:
        found += label_findings(*factorize(labels.tasks), labels.inferred)
    return found + value_findings(report.task_values) + saved_findings(store.root.parent)


def select_findings(store: Store | None, selection: Any) -> list[Finding]:
    """The checks of ``tive select``: the store's (when the values come from one), the
    values' and the selection's."""
    found = store_findings(store) if store is not None else []
    return found + report_findings(selection.report) + selection_findings(selection)


def saved_findings(run: Path) -> list[Finding]:
    """Quotas larger than their task in the selections saved in ``run`` (``*.report.json``)."""
    found = []
    for path, saved in find_reports(run):  # selection reports only, never a special file
        try:
            tasks = saved["tasks"]
            quotas = {t: int(e["quota"]) for t, e in tasks.items() if not e.get("excluded")}
            valid = {t: int(e["valid"]) for t, e in tasks.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a report without task sizes: tive report says so when asked for its page
        found += quota_findings(quotas, valid, where=f"{path.name}: ")
    return found


def check(run: str | os.PathLike = "tive-out", data: Any = None,
          task_field: str | None = None) -> list[Finding]:
    """Every health check of the run folder ``run`` (or a ``store`` folder): see
    :func:`run_findings`."""
    return run_findings(Store.open(run), data=data, task_field=task_field)
