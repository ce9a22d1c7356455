"""The bar chart of a selection: each task's share of the mixture and of the subset."""

from __future__ import annotations

import numpy as np

from tive.output.views import Chosen


def chart_png(selection: Chosen) -> bytes:
    """The bar chart of a :class:`~tive.selection.subset.Selection` (each task's share of the mixture
    and of the subset) as PNG bytes; excluded tasks are greyed, hatched and labelled
    "(excluded)"."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    d = selection.to_dict()["tasks"]
    names = list(d)
    n, b = sum(e["records"] for e in d.values()), max(len(selection.indices), 1)
    before = [d[t]["records"] / n for t in names]
    after = [d[t]["selected"] / b for t in names]
    excluded = [d[t]["excluded"] for t in names]
    y = np.arange(len(names))
    fig = Figure(figsize=(7, 0.45 * len(names) + 1.5))  # no pyplot: no global state, faster
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    bars = ax.barh(y - 0.2, before, 0.4, label="mixture")
    ax.barh(y + 0.2, after, 0.4, label=f"subset ({selection.config.method}, {b:,})")
    for bar, out in zip(bars, excluded):
        if out:
            bar.set(color="lightgrey", hatch="//", edgecolor="grey")
    shown = [_printable(t) for t in names]  # matplotlib cannot draw a lone surrogate
    ax.set_yticks(y, [f"{t} (excluded)" if out else t for t, out in zip(shown, excluded)])
    for label, out in zip(ax.get_yticklabels(), excluded):
        if out:
            label.set_color("grey")
    ax.invert_yaxis()
    ax.set_xlabel("share of records")
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.legend(loc="best")
    ax.set_title("Task shares: mixture and subset" + (" (grey: excluded tasks)"
                                                      if any(excluded) else ""))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _printable(text: str) -> str:
    """``text`` with lone surrogates as their ``\\u`` escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
