"""Saving a selection: the subset in the input's own format, ``<stem>.report.json``, the
bar chart ``<stem>.png``, the page ``<stem>.html`` and, with data, the manifest
``<stem>.manifest.json`` (:mod:`tive.output.manifest`), all or none. ``-o /dev/null`` discards
them all (nothing is written beside it).

A :class:`~tive.selection.subset.Selection` is read through the attributes
:class:`tive.output.views.Chosen` names; nothing here imports the selection package, which
calls :func:`save_selection` from ``Selection.save``.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from tive.errors import ConfigError, OutputError
from tive.output.chart import chart_png
from tive.output.manifest import build_manifest
from tive.output.page import write_html
from tive.output.views import Chosen
from tive.util.files import atomic_path, check_target, is_null_device, special_kind, write_json


def save_selection(selection: Chosen, path: str | Path,
                   inputs: Sequence[str | Path] = ()) -> dict[str, Path]:
    """:meth:`Selection.save <tive.selection.subset.Selection.save>`: write the files (four,
    five with data: the manifest), each under a temporary name, renamed only once all are
    written."""
    path = Path(path)
    mixture = selection.report.mixture
    suffix = mixture.default_suffix() if mixture is not None else ".json"
    name = path.name[: -len(suffix)] if suffix and path.name.endswith(suffix) else path.name
    stem = path.parent / name
    targets = {"subset": path, "report": Path(f"{stem}.report.json"),
               "chart": Path(f"{stem}.png"), "html": Path(f"{stem}.html")}
    if mixture is not None:
        targets["manifest"] = Path(f"{stem}.manifest.json")
    folder = mixture is not None and mixture.container == "hf-disk"
    if is_null_device(path):  # -o /dev/null: discard them all, write nothing beside it
        targets = dict.fromkeys(targets, path)
    else:
        for kind, target in targets.items():  # before anything is written: all or none
            check_target(target, directory=folder and kind == "subset")
    _refuse_inputs(targets.values(),
                   [*([mixture.path] if mixture is not None else []), *inputs])
    with contextlib.ExitStack() as stack:
        tmp = {kind: stack.enter_context(atomic_path(target, directory=folder and
                                                      kind == "subset"))
               for kind, target in targets.items()}
        if mixture is not None:
            mixture.write_subset(selection.indices, tmp["subset"])
        else:
            write_json(tmp["subset"], [int(i) for i in selection.indices], indent=None)
        write_json(tmp["report"], {**selection.to_dict(), "output": str(path)})
        write_chart(selection, tmp["chart"])
        write_html(selection.report, selection, tmp["html"], chart=tmp["chart"].read_bytes())
        if mixture is not None:
            write_json(tmp["manifest"], build_manifest(selection, path, tmp["subset"]),
                       indent=1)
    return targets


def _refuse_inputs(outputs: Any, inputs: Sequence[str | Path]) -> None:
    """Refuse an output that is one of the inputs (the same file, by inode)."""
    for out in outputs:
        for given in inputs:
            if Path(out).exists() and Path(given).exists() and os.path.samefile(out, given):
                raise OutputError(f"{out}: is an input of this selection ({given}); writing "
                                  f"there would destroy it; nothing was written; fix: choose "
                                  f"another output path")


def write_chart(selection: Chosen, path: Path) -> Path:
    """Bar chart of each task's share of the mixture and of the subset, as PNG."""
    png = chart_png(selection)
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)
    return path


REPORT_LIMIT = 64 << 20  # bytes: a selection report is a few KB per task


def read_report(path: str | Path) -> dict[str, Any]:
    """A selection's ``.report.json`` (written by :func:`save_selection`), checked against
    its schema: a regular file of JSON, an object whose ``settings`` is an object with a
    string ``method``, ``source`` an object (when present) with string-or-null ``data`` and
    ``image_root``, ``output`` a string, ``selected`` and ``unique`` counts, and ``tasks`` an
    object of ``{value, excluded, quota, selected}``.

    Raises:
        ConfigError: naming the file, what is wrong and the fix.
    """
    path = Path(path)
    kind = special_kind(path)
    why = f"a {kind}" if kind is not None else None
    saved: Any = None
    if why is None:
        try:
            if path.stat().st_size > REPORT_LIMIT:
                raise ValueError(f"over {REPORT_LIMIT >> 20} MB")
            saved = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            why = str(getattr(e, "strerror", None) or e)[:80] or type(e).__name__
    why = why or _report_schema(saved)
    if why is not None:
        raise ConfigError(f"{path}: not a selection report ({why}); expected a *.report.json "
                          f"written by tive select; fix: pass --selection with one of those, "
                          f"or make the selection again")
    return saved


def _report_schema(saved: Any) -> str | None:
    """What is wrong with a parsed report, or None."""
    if not isinstance(saved, dict):
        return f"a JSON {type(saved).__name__}, expected an object"
    if not isinstance(saved.get("settings"), dict):
        return "no settings object"
    source = saved.get("source", {})
    if not isinstance(source, dict):
        return "source is not an object"
    for key in ("data", "image_root"):
        if not isinstance(source.get(key), (str, type(None))):
            return f"source.{key} is not a string"
    if not isinstance(saved.get("output", ""), str):
        return "output is not a string"
    if not isinstance(saved["settings"].get("method"), str):
        return "settings.method is not a string"
    if not all(_count(saved.get(key)) for key in ("selected", "unique")):
        return "selected or unique is not a count"
    tasks = saved.get("tasks")
    if not isinstance(tasks, dict) or not all(_task_entry(e) for e in tasks.values()):
        return "tasks is not an object of {value, excluded, quota, selected}"
    return None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _task_entry(e: Any) -> bool:
    return (isinstance(e, dict) and isinstance(e.get("excluded"), bool)
            and _count(e.get("quota")) and _count(e.get("selected"))
            and (e.get("value") is None or isinstance(e.get("value"), (int, float))
                 and not isinstance(e.get("value"), bool)))


def find_reports(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The selection reports in ``folder``, oldest first; other ``*.report.json`` files (a
    user's notes, damaged or special files) are passed over."""
    found = []
    for path in folder.glob("*.report.json"):
        try:
            found.append((os.stat(path).st_mtime_ns, path, read_report(path)))
        except (ConfigError, OSError):
            continue
    return [(path, saved) for _, path, saved in sorted(found, key=lambda f: (f[0], f[1]))]
