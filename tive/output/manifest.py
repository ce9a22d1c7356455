"""A selection's manifest, ``<stem>.manifest.json`` beside the subset (docs/design.md,
"Manifests"): the chosen records (record keys, ids, positions, tasks, values), the settings,
the store's identity, the input's fingerprint and the library versions, enough to rebuild the
subset from the mixture alone (:mod:`tive.output.apply`).
"""

from __future__ import annotations

import hashlib
import math
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from tive.data.keys import KEY_VERSION, as_text, record_keys
from tive.errors import OutputError, StoreError
from tive.output.views import Chosen
from tive.store.format import Store
from tive.store.keys import has_keys, read_keys

MANIFEST_VERSION = 1
PACKAGES = ("tive", "numpy", "torch", "transformers", "peft", "datasets", "orjson")


def manifest_path(subset: str | Path) -> Path:
    """Where the manifest of the subset ``subset`` lives: ``<stem>.manifest.json`` (the stem
    without the data format's suffix, as the report's)."""
    subset = Path(subset)
    name = subset.name
    for suffix in (".jsonl", ".json", ".parquet"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return subset.parent / f"{name}.manifest.json"


def build_manifest(selection: Chosen, subset: Path, written: Path) -> dict[str, Any]:
    """The manifest of ``selection``, whose subset file is ``subset`` (written, under its
    temporary name, at ``written``)."""
    report = selection.report
    mixture = report.mixture
    rows = np.asarray(selection.indices, dtype=np.int64)
    distinct = np.unique(rows)
    image_root = report.source.get("image_root") or str(mixture.image_root().resolve())
    keys = dict(zip(distinct.tolist(), as_text(_keys(report, image_root, distinct))))
    values = report.instance_values
    records = [{"key": keys[i], "id": mixture[i].id, "position": i,
                "task": str(report.tasks[i]), "value": _number(values[i])}
               for i in rows.tolist()]
    return {
        "manifest_version": MANIFEST_VERSION, "record_key_version": KEY_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "subset": {"name": subset.name, "format": mixture.container, "schema": mixture.schema,
                   "records": len(rows), "sha256": tree_digest(written)},
        "data": {"path": str(mixture.path.resolve()), "fingerprint": mixture.fingerprint,
                 "records": len(mixture), "sha256": mixture.digest},
        "image_root": image_root, "task_field": report.source.get("task_field"),
        "settings": selection.config.to_dict(), "budget": int(selection.budget),
        "task_values": {t: _number(v) for t, v in report.task_values.items()},
        "store": _store(report.source.get("store")),
        "versions": versions(),
        "records": records,
    }


def _keys(report: Any, image_root: str, rows: np.ndarray) -> np.ndarray:
    """The record keys of ``rows``: the store's (``keys.npy``), when it has them for the same
    task field and image root, else computed (reading the images)."""
    path = report.source.get("store")
    store = Store.open(path) if path is not None else None
    if store is not None and has_keys(store):
        data = Path(store.meta["data"].get("path") or "")
        root = store.meta.get("identity", {}).get("image_root") or str(
            (data if data.is_dir() else data.parent).resolve())
        same_field = store.meta.get("settings", {}).get("task_field") == \
            report.source.get("task_field")
        if same_field and Path(root).resolve() == Path(image_root).resolve():
            try:
                return read_keys(store, "for the manifest")[rows]
            except StoreError:  # damaged: the keys are computed from the records instead
                pass
    return record_keys(report.mixture, report.tasks, image_root, rows)


def _number(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _store(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    meta = Store.open(path).meta
    return {"path": str(Path(path).resolve()), "identity": meta.get("identity"),
            "source": meta.get("source"), "created": meta.get("created")}


def versions() -> dict[str, str | None]:
    """Python's and the libraries' versions (None: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def tree_digest(path: Path) -> str:
    """sha256 of a file's bytes; of a folder (``save_to_disk``), of each file's relative name
    and bytes, in name order."""
    h = hashlib.sha256()
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise OutputError(f"{path}: nothing to digest; expected the subset file or folder")
    for f in files:
        if f != path:
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()
