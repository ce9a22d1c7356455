"""Health checks of values and selections (docs/design.md, "Health checks"): degenerate and
collapsed features, task labels the LLaVA-665K rules made up, outlier task values, quotas
larger than their task."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from tive.data.tasks import LLAVA_TASKS
from tive.health.findings import Finding
from tive.selection.report import Report

COLLAPSE = 0.95  # a task's mean pairwise cosine at or above this: its features have collapsed
COLLAPSE_MIN = 3  # records a task needs for its cosines to say anything
OUTLIER = 3.0  # a task value above this many times the median task value is an outlier
NON_FINITE = {"non-finite-feature": "features", "non-finite-norm": "exact gradient norms",
              "non-finite": "gradients (tive score skipped them)"}
READ_ROWS = 4096  # candidate rows read at a time when looking for zero feature rows


def report_findings(report: Report) -> list[Finding]:
    """Zero and non-finite feature rows, collapsed tasks and made-up task labels."""
    return [*feature_findings(report), *collapse_findings(report),
            *label_findings(*report.task_codes, report.inferred)]


def zero_rows(report: Report) -> np.ndarray:
    """``(N,)`` bool: valid records whose feature row is all zero or whose exact gradient norm
    is 0. A zero row has instance value exactly 0, so only rows with ``v_i == 0`` are read."""
    zero = report.valid & (report.norms == 0)
    if report.features is not None:
        candidates = np.flatnonzero(report.valid & (report.instance_values == 0) & ~zero)
        for start in range(0, len(candidates), READ_ROWS):
            rows = candidates[start:start + READ_ROWS]
            zero[rows] = ~np.any(np.asarray(report.features[rows]) != 0, axis=1)
    return zero


def feature_findings(report: Report) -> list[Finding]:
    """Feature rows that are zero (kept, but cosine 0 with everything) or NaN/Inf (left out)."""
    found = []
    zero = zero_rows(report)
    if zero.any():
        first = int(np.flatnonzero(zero)[0])
        found.append(Finding(
            "features", f"{int(zero.sum()):,} of {int(report.valid.sum()):,} valid records have "
            f"a zero feature row or gradient norm (first: {_row(report, first)}): each has "
            f"cosine 0 with every record, so instance value 0",
            "check that the reference is trained (the reference check) and that these "
            "records have supervised tokens, then score again with --force; for imported "
            "features, correct the arrays"))
    for reason, what in NON_FINITE.items():
        n = report.invalid.get(reason, 0)
        if n:
            found.append(Finding(
                "features", f"{n:,} records have NaN or Inf {what} and are left out of "
                f"valuation and selection", "score in float32 (--dtype fp32), or correct the "
                "arrays given to tive import"))
    return found


def mean_pairwise_cosines(values: np.ndarray, codes: np.ndarray, n_tasks: int,
                          valid: np.ndarray, nonzero: np.ndarray) -> np.ndarray:
    """Each task's mean cosine between distinct valid records, from the instance values.

    With ``u_t = Σ_{i∈t} φ̂_i`` (a zero row adds 0), ``v_i = φ̂_i · u_t / n`` so
    ``Σ_i v_i = ‖u_t‖² / n``, and ``Σ_{i≠j} cos(φ_i, φ_j) = ‖u_t‖² − z``, ``z`` the task's
    non-zero rows: ``C(t) = (n Σ_i v_i − z) / (n(n−1))``, which is
    ``(n‖m_t‖² − 1)/(n − 1)`` (``m_t = u_t / n``) when no row is zero. Not clipped.

    Args:
        values: ``(N,)`` instance values; codes: ``(N,)`` task codes in ``[0, n_tasks)``;
        valid: ``(N,)`` bool; nonzero: ``(N,)`` bool, rows whose feature is not zero.

    Returns:
        ``(n_tasks,)`` float64; NaN for a task of fewer than two valid records.
    """
    n = np.bincount(codes[valid], minlength=n_tasks).astype(np.float64)
    sums = np.bincount(codes[valid], weights=values[valid], minlength=n_tasks)
    z = np.bincount(codes[valid & nonzero], minlength=n_tasks)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 1, (n * sums - z) / (n * (n - 1)), np.nan)


def collapse_findings(report: Report) -> list[Finding]:
    """Tasks whose features point almost one way (mean pairwise cosine ≥ :data:`COLLAPSE`)."""
    names, codes = report.task_codes
    cosines = mean_pairwise_cosines(report.instance_values, codes, len(names), report.valid,
                                    ~zero_rows(report))
    counts = np.bincount(codes[report.valid], minlength=len(names))
    return [Finding("collapse", f"task {t!r}: its {int(n):,} records' features have mean "
                    f"pairwise cosine {c:.3f} (≥ {COLLAPSE}): they point almost one way, so "
                    f"instance values cannot tell its records apart",
                    "check that its records differ (not duplicates), that the reference is "
                    "trained, and that the projection keeps enough dimensions (--proj-dim)")
            for t, c, n in zip(names, cosines, counts) if n >= COLLAPSE_MIN and c >= COLLAPSE]


def label_findings(names: list[str], codes: np.ndarray,
                   inferred: np.ndarray | None) -> list[Finding]:
    """Tasks the LLaVA-1.5 665K rules named after image folders: data that is not LLaVA-665K
    labelled by rules made for it.

    Args:
        names: the distinct task names; codes: ``(N,)`` each record's index into them;
        inferred: ``(N,)`` bool, labels that came from the rules (None: not known).
    """
    if inferred is None:
        return []
    foreign = np.array([n not in LLAVA_TASKS for n in names], dtype=bool)
    counts = np.bincount(codes[inferred], minlength=len(names)) * foreign
    if not counts.any():
        return []
    order = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i]]
    shown = ", ".join(f"{names[i]} ({counts[i]:,})" for i in order[:4])
    more = f" and {len(order) - 4} more" if len(order) > 4 else ""
    return [Finding("tasks", f"{int(counts.sum()):,} records have no task field and the "
                    f"LLaVA-1.5 665K rules named their tasks after image folders ({shown}{more}): "
                    f"this data does not look like LLaVA-665K, so these may not be its tasks",
                    "give each record a task field (task, dataset or source), or name yours "
                    "with --task-field")]


def value_findings(values: Mapping[str, float],
                   quotas: Mapping[str, int] | None = None) -> list[Finding]:
    """Tasks whose value is more than :data:`OUTLIER` times the median task value (over the
    tasks of ``values`` with a finite value): a task the model cannot learn keeps large
    gradients, and so takes a large quota."""
    finite = {t: v for t, v in values.items() if np.isfinite(v)}
    median = float(np.median(list(finite.values()))) if finite else 0.0
    if median <= 0:
        return []
    return [Finding("task-value", f"task {t!r}: value {v:.4g} is {v / median:.1f}× the median "
                    f"task value ({median:.4g})"
                    + (f" and takes {quotas[t]:,} records" if quotas and t in quotas else "")
                    + ": is it learnable? a task the model cannot learn keeps large gradients",
                    f"look at its records; --task-value progress weighs a task by how much the "
                    f"warm-up lowered its loss on records it did not train on; or --exclude-task "
                    f"{t}")
            for t, v in sorted(finite.items(), key=lambda kv: -kv[1]) if v > OUTLIER * median]


def quota_findings(quotas: Mapping[str, int], valid: Mapping[str, int],
                   where: str = "") -> list[Finding]:
    """Quotas larger than their task's valid records (the task is repeated)."""
    return [Finding("quota", f"{where}task {t!r}: quota {q:,} exceeds its {valid[t]:,} valid "
                    f"records, so they are repeated (about {q / valid[t]:.1f}× each)",
                    "--no-oversample caps each task at its size and gives the surplus to the "
                    "others; or a smaller budget")
            for t, q in quotas.items() if valid.get(t, 0) > 0 and q > valid[t]]


def selection_findings(selection: Any) -> list[Finding]:
    """Outlier values among the tasks a selection weighs by value, and its repeats."""
    found = []
    if selection.uses_values():
        values = selection.report.task_values
        found += value_findings({t: values[t] for t in selection.quotas}, selection.quotas)
    return found + quota_findings(selection.quotas, selection.report.valid_sizes())


def _row(report: Report, row: int) -> str:
    """A record named for a message: its row, and its id when the report has the data."""
    ids = getattr(report.mixture, "ids", None) if report.mixture is not None else None
    return f"row {row}, id {ids[row]!r}" if ids is not None else f"row {row}"
