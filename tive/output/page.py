"""A self-contained HTML page of a selection: what is kept and what is dropped.

One file, no network: the task table, the bar chart of task shares (PNG, embedded), per task a
histogram of its instance values with the selected records marked (inline SVG), and per task
the selected records (all, or :data:`CHOSEN` spread over their values) and the records of
highest and lowest value as they would be trained (image thumbnail, the conversation, its
value, selected or not); for the soft draw, how uniform τ makes it within a task. It reads only
values already in the :class:`~tive.selection.report.Report` (never the features, except the
few rows the target's section shows beside their nearest target example;
:mod:`tive.output.views` says what) and opens only the images it shows, so it is as fast and as
small on 665K records as on 200: the histograms count every record, the examples are
:data:`EXAMPLES` per end of each task.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from tive.output.chart import chart_png
from tive.output.tables import fmt_value
from tive.errors import TiveError
from tive.output.views import Chosen, Values
from tive.util.files import atomic_path

EXAMPLES = 5  # records shown at each end (highest, lowest value) of every task
CHOSEN = 12  # selected records shown per task at most (all of them when fewer)
BINS = 24  # histogram bars per task
THUMB_PX = 112  # longest side of an embedded thumbnail
TURN_CHARS = 600  # characters of a turn shown before it is cut with "…"

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px}h3{font-size:16px;margin:24px 0 8px}
table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 8px;border-bottom:1px solid #ddd}
th{text-align:left;background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.excluded td{color:#999;font-style:italic}
.meta{color:#555}.task{border-top:2px solid #ccc;margin-top:24px}
.records{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:10px}
.rec{border:1px solid #ddd;border-radius:6px;padding:8px;display:flex;gap:8px}
.rec.kept{border-color:#2a7;background:#f3fbf6}.rec img{flex:none;align-self:flex-start}
.turn{white-space:pre-wrap;word-break:break-word;font-size:12.5px;margin:2px 0}
.role{font-weight:600;color:#555}.badge{font-size:12px;padding:1px 6px;border-radius:8px}
.kept .badge{background:#2a7;color:#fff}.dropped .badge{background:#ddd}
.noimg{width:%dpx;height:60px;flex:none;background:#eee;color:#888;font-size:11px;
display:flex;align-items:center;justify-content:center;text-align:center}
""" % THUMB_PX


def write_html(report: Values, selection: Chosen | None, path: str | os.PathLike,
               image_root: str | os.PathLike | None = None, chart: bytes | None = None) -> Path:
    """Write the page for ``selection`` (or, without one, for the values alone) to ``path``.

    Args:
        report: the values (and the mixture, whose records and images the examples show).
        selection: the subset to mark; None shows the values only.
        path: the ``.html`` file to write (atomically).
        image_root: folder relative image paths resolve against (default: the report's
            recorded image root, else the data file's folder).
        chart: the selection's bar chart as PNG bytes, when already drawn (default: drawn
            here by :func:`tive.output.chart.chart_png`).

    Returns:
        ``path``.
    """
    path = Path(path)
    root = _image_root(report, image_root)
    picked = _times_selected(report, selection)
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
             f"<title>{_e(_title(report, selection))}</title><style>{STYLE}</style></head><body>",
             f"<h1>{_e(_title(report, selection))}</h1>", _summary(report, selection, root),
             _task_table(report, selection), _target_section(report)]
    if selection is not None:
        png = base64.b64encode(chart if chart is not None else chart_png(selection)).decode()
        parts.append(f"<h2>Task shares</h2><img alt='task shares of the mixture and the subset' "
                     f"src='data:image/png;base64,{png}'>")
    parts.append("<h2>Tasks: instance values and examples</h2>")
    excluded = set(selection.config.exclude) if selection is not None else set()
    for task in report.task_names:
        parts.append(_task_section(report, task, picked, root, task in excluded))
    parts.append(_CHECK_IMAGES + "</body></html>")
    with atomic_path(path) as tmp:
        # a lone surrogate (JSON can carry one) is shown as its \u escape
        tmp.write_text("\n".join(parts), encoding="utf-8", errors="backslashreplace")
    return path


# Marks on <body> how many images decoded and how many failed: what a headless browser test
# reads back from the rendered page.
_CHECK_IMAGES = ("<script>addEventListener('load',function(){var ok=0,bad=0;"
                 "document.querySelectorAll('img').forEach(function(i){"
                 "if(i.complete&&i.naturalWidth>0){ok++}else{bad++}});"
                 "document.body.dataset.imagesLoaded=ok;document.body.dataset.imagesBroken=bad;"
                 "});</script>")


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _title(report: Values, selection: Chosen | None) -> str:
    if selection is None:
        return f"tive: values of {len(report.tasks):,} records"
    c = selection.config
    return f"tive: {c.method} subset, budget {c.budget} ({len(selection.indices):,} records)"


def _image_root(report: Values, given: str | os.PathLike | None) -> Path | None:
    if given is not None:
        return Path(given)
    if report.source.get("image_root"):
        return Path(report.source["image_root"])
    return None if report.mixture is None else report.mixture.image_root()


def _times_selected(report: Values, selection: Chosen | None) -> np.ndarray:
    """``(N,)`` how many times each record is in the subset (0 without a selection)."""
    if selection is None:
        return np.zeros(len(report.tasks), dtype=np.int64)
    return np.bincount(selection.indices, minlength=len(report.tasks))


def _summary(report: Values, selection: Chosen | None, root: Path | None) -> str:
    items = [(k, v) for k, v in report.source.items() if k != "image_root"]
    items.append(("image root", root if root is not None else "-"))
    left = sum(report.invalid.values())
    items.append(("records", f"{len(report.tasks):,} in {len(report.sizes)} tasks"
                  + (f"; {left:,} left out ("
                     + ", ".join(f"{n:,} {r}" for r, n in report.invalid.items()) + ")"
                     if left else "")))
    if selection is not None:
        items.append(("settings", _settings_text(selection.config.to_dict())))
        distinct = len(np.unique(selection.indices))
        items.append(("subset", f"{len(selection.indices):,} records ({distinct:,} distinct) "
                      f"of a budget of {selection.budget:,}"))
        items += [("note", n) for n in selection.notes]
        draw = _draw_note(report, selection)
        if draw:
            items.append(("within-task draw", draw))
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in items)
    return f"<table class=meta>{rows}</table>"


def _settings_text(settings: dict[str, Any]) -> str:
    """``method tive, budget 0.15, strategy soft, …, seed 0, exclude textcaps, vg``: every
    setting given (a seed of 0 included), lists as text, unset ones and false flags left out."""
    shown = []
    for k, v in settings.items():
        if v is None or v is False or (isinstance(v, (list, tuple)) and not v):
            continue
        text = ", ".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)
        shown.append(f"{k} {text}")
    return ", ".join(shown)


def _draw_note(report: Values, selection: Chosen) -> str | None:
    """What the soft draw's τ does on these values: by how much at most the weights exp(v/τ)
    of two records of one task differ (nearly uniform at the authors' τ = 1000)."""
    c = selection.config
    if getattr(c, "strategy", None) is None or str(getattr(c.strategy, "value", c.strategy)) \
            != "soft" or c.temperature is None:
        return None
    tau = float(c.temperature)
    if math.isinf(tau):
        return "τ = inf: a uniform draw within each task"
    spread = 0.0
    for task in report.task_names:
        values = report.instance_values[report.members(task)]
        values = values[np.isfinite(values)]
        if len(values):
            spread = max(spread, float(values.max() - values.min()))
    ratio = math.exp(min(spread / tau, 700.0)) - 1.0
    text = (f"τ = {tau:g}: within a task the weights exp(v/τ) of the most and the least "
            f"valuable record differ by at most {ratio:.2%}")
    if ratio <= 0.05:
        text += (", so the draw within a task is nearly uniform: the task values set how many "
                 "records each task gives, the instance values barely which ones (a smaller "
                 "--temperature favours the representative records)")
    return text


def _task_table(report: Values, selection: Chosen | None) -> str:
    sizes, valid, n = report.sizes, report.valid_sizes(), max(len(report.tasks), 1)
    value = selection is None or selection.uses_values()  # as the CLI's table: baselines
    quota = selection is not None and selection.by_task()  # show no value or quota columns
    header = ["task", "records", "valid"] + ([report.value_header()] if value else [])
    if selection is not None:
        d = selection.to_dict()["tasks"]
        b = max(len(selection.indices), 1)
        header += (["quota"] if quota else []) + ["selected", "distinct", "share before → after"]
    rows = []
    for t in report.task_names:
        cells = [f"<td>{_e(t)}</td>", _num(f"{sizes[t]:,}"), _num(f"{valid[t]:,}")]
        if value:
            cells.append(_num(fmt_value(report.task_values.get(t, math.nan))))
        css = ""
        if selection is not None:
            e = d[t]
            css = " class=excluded" if e["excluded"] else ""
            if quota:
                cells.append(_num("excluded" if e["excluded"] else f"{e['quota']:,}"))
            cells += [_num("excluded" if e["excluded"] and not quota else f"{e['selected']:,}"),
                      _num(f"{e['unique']:,}"),
                      _num(f"{sizes[t] / n:.1%} → {e['selected'] / b:.1%}")]
        rows.append(f"<tr{css}>{''.join(cells)}</tr>")
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    return f"<h2>Tasks</h2><table><tr>{head}</tr>{''.join(rows)}</table>"


def _target_section(report: Values) -> str:
    """The target's table: per task the target task it serves, its alignment, and its records
    nearest the target with their nearest target example; empty without a target."""
    try:
        summary = report.target_summary()
    except TiveError as e:  # a stale target: say so, the rest of the page stands
        return f"<h2>Target</h2><p class=meta>{_e(e)}</p>"
    if summary is None:
        return ""
    rows = []
    for task, e in summary["tasks"].items():
        near = "<br>".join(
            f"{_e(t['id'])} ({t['value']:.3f}) → {_e(t['nearest']['id'])} "
            f"[{_e(t['nearest']['task'])}], cos {t['nearest']['cosine']:.3f}"
            for t in e["top"]) or "-"
        value = e["alignment"]
        rows.append(f"<tr><td>{_e(task)}</td><td>{_e(e['serves'] or '-')}</td>"
                    f"{_num(fmt_value(math.nan if value is None else value))}<td>{near}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("task", "serves target task", "alignment",
                                             "records nearest the target → nearest example"))
    return (f"<h2>Target</h2><p class=meta>target tasks: "
            f"{_e(', '.join(summary['target_tasks']))}; alignment = mean cosine of the task's "
            f"records to the target task it serves (tive-target's task value).</p>"
            f"<table><tr>{head}</tr>{''.join(rows)}</table>")


def _num(text: str) -> str:
    return f"<td class=n>{_e(text)}</td>"


def _task_section(report: Values, task: str, picked: np.ndarray, root: Path | None,
                  excluded: bool) -> str:
    members = report.members(task)
    values = report.instance_values[members]
    ok = np.isfinite(values)
    members, values = members[ok], values[ok]
    kept = picked[members]
    head = (f"<div class=task><h3>{_e(task)}{' (excluded)' if excluded else ''}</h3>"
            f"<p class=meta>{len(members):,} valued records, {int((kept > 0).sum()):,} "
            f"selected; value = mean cosine of a record's gradient to its task's.</p>")
    if not len(members):
        return head + "<p>No valued record.</p></div>"
    order = np.argsort(-values, kind="stable")
    top = order[:EXAMPLES]
    bottom = [i for i in order[::-1][:EXAMPLES] if i not in set(top.tolist())][::-1]
    chosen = order[kept[order] > 0]  # the selected records, highest value first
    shown = chosen[np.unique(np.linspace(0, len(chosen) - 1, CHOSEN).round().astype(int))] \
        if len(chosen) > CHOSEN else chosen
    label = (f"selected: all {len(chosen):,}" if len(shown) == len(chosen) else
             f"selected: {len(shown)} of {len(chosen):,}, evenly spaced from the highest "
             f"value to the lowest")
    parts = [head, _histogram(values, kept > 0)]
    for label, rows in ((label, shown), ("highest value", top), ("lowest value", bottom)):
        if len(rows):
            cards = "".join(_record_card(report, int(members[i]), float(values[i]),
                                         int(kept[i]), root) for i in rows)
            parts.append(f"<p><b>{label}</b></p><div class=records>{cards}</div>")
    return "".join(parts) + "</div>"


def _histogram(values: np.ndarray, selected: np.ndarray, width: int = 480,
               height: int = 120) -> str:
    """Inline SVG: counts of all valued records per value bin (grey), the selected ones
    (green) in front."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, BINS + 1)
    total = np.histogram(values, edges)[0]
    chosen = np.histogram(values[selected], edges)[0]
    top = max(int(total.max()), 1)
    w = width / BINS
    bars = []
    for j, (a, c) in enumerate(zip(total, chosen)):
        x = j * w
        for count, color in ((a, "#ccc"), (c, "#2a7")):
            h = (height - 20) * count / top
            bars.append(f"<rect x='{x + 1:.1f}' y='{height - 16 - h:.1f}' width='{w - 2:.1f}' "
                        f"height='{h:.1f}' fill='{color}'><title>{edges[j]:.3g} to "
                        f"{edges[j + 1]:.3g}: {a:,} records, {c:,} selected</title></rect>")
    axis = (f"<text x='0' y='{height - 2}' font-size='11'>{lo:.3g}</text>"
            f"<text x='{width}' y='{height - 2}' font-size='11' text-anchor='end'>{hi:.3g}</text>"
            f"<text x='{width / 2}' y='{height - 2}' font-size='11' text-anchor='middle'>"
            f"instance value (grey: all, green: selected)</text>")
    return (f"<svg width='{width}' height='{height}' role='img' aria-label='histogram'>"
            f"{''.join(bars)}{axis}</svg>")


def _record_card(report: Values, row: int, value: float, times: int, root: Path | None) -> str:
    status = "kept" if times else "dropped"
    badge = ("selected" + (f" ×{times}" if times > 1 else "")) if times else "not selected"
    if report.mixture is None:
        body = f"<div>row {row} (no data given: no text to show)</div>"
        thumb = ""
    else:
        record = report.mixture[row]
        thumb = _thumbnail(record.images, root)
        turns = "".join(f"<div class=turn><span class=role>{_e(t.role.upper())}:</span> "
                        f"{_e(_cut(t.text))}</div>" for t in record.turns)
        body = f"<div><div class=meta>row {row}, id {_e(record.id)}</div>{turns}</div>"
    return (f"<div class='rec {status}'>{thumb}<div><span class=badge>{badge}</span> "
            f"value {value:.4f}{body}</div></div>")


def _cut(text: str) -> str:
    return text if len(text) <= TURN_CHARS else text[:TURN_CHARS] + "…"


def _thumbnail(images: tuple[str, ...], root: Path | None) -> str:
    """An ``<img>`` of the record's first image as an embedded JPEG, or a grey box saying why
    there is none ('' for a text record)."""
    if not images:
        return ""
    ref = images[0]
    path = Path(ref) if Path(ref).is_absolute() or root is None else root / ref
    if not os.path.isfile(path):  # never open a FIFO or a device: it would block or not end
        return f"<div class=noimg title='{_e(path)}'>image not found<br>{_e(Path(ref).name)}</div>"
    try:
        import PIL.Image

        with PIL.Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((THUMB_PX, THUMB_PX))
            buffer = io.BytesIO()
            img.save(buffer, format="JPEG", quality=80)
    except Exception:  # missing, unreadable or embedded: say so instead of breaking the page
        return f"<div class=noimg title='{_e(path)}'>image not found<br>{_e(Path(ref).name)}</div>"
    data = base64.b64encode(buffer.getvalue()).decode()
    return f"<img alt='{_e(ref)}' src='data:image/jpeg;base64,{data}'>"
