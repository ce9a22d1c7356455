"""Plain-text tables and JSON numbers, as ``tive select`` and ``tive report`` print them."""

from __future__ import annotations

import math
from typing import Sequence


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; first column left-aligned, the rest right-aligned."""
    cells = [list(header)] + [list(r) for r in rows]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(header))]
    lines = []
    for row in cells:
        parts = [str(v).ljust(w) if i == 0 else str(v).rjust(w)
                 for i, (v, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def fmt_value(value: float | None) -> str:
    """A value to 4 significant digits, ``-`` when there is none."""
    return "-" if value is None or not math.isfinite(value) else f"{value:.4g}"


def json_float(value: float) -> float | None:
    """A float for JSON: None for NaN or infinity."""
    return float(value) if math.isfinite(value) else None
