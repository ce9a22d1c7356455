"""Saving a selection: the subset in the input's own format, ``<stem>.report.json``, the
bar chart ``<stem>.png``, the page ``<stem>.html`` and, with data, the manifest
``<stem>.manifest.json`` (:mod:`tive.output.manifest`), all or none.

A :class:`~tive.selection.subset.Selection` is read through the attributes
:class:`tive.output.views.Chosen` names; nothing here imports the selection package, which
calls :func:`save_selection` from ``Selection.save``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Sequence

from tive.errors import OutputError
from tive.output.chart import chart_png
from tive.output.manifest import build_manifest
from tive.output.page import write_html
from tive.output.views import Chosen
from tive.util.files import atomic_path, write_json


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
    _refuse_inputs(targets.values(),
                   [*([mixture.path] if mixture is not None else []), *inputs])
    folder = mixture is not None and mixture.container == "hf-disk"
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
