"""``tive apply``: a selection's manifest (:mod:`tive.output.manifest`) onto a mixture, with no
store and no model (docs/design.md, "Manifests"); and ``tive apply --check``, a subset
compared with its manifest.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from tive.data.keys import KEY_VERSION, as_text, record_keys
from tive.data.mixture import Mixture, load_mixture
from tive.data.tasks import label_tasks
from tive.errors import DataError, OutputError
from tive.output.manifest import MANIFEST_VERSION, tree_digest
from tive.util.files import special_kind


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest at ``path``, checked for what :func:`apply_manifest` reads.

    Raises:
        DataError: missing, unreadable, of another version, or without its records.
    """
    path = Path(path)
    kind = special_kind(path)
    if kind is not None:  # reading a FIFO would wait for a writer forever
        raise DataError(f"{path}: is a {kind}; expected the <stem>.manifest.json that `tive "
                        f"select` writes beside a subset; fix: pass that file")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such manifest; expected the <stem>.manifest.json that "
                        f"`tive select` writes beside a subset") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable manifest ({e}); fix: use the file `tive select` "
                        f"wrote") from None
    ok = (isinstance(manifest, dict) and manifest.get("manifest_version") == MANIFEST_VERSION
          and manifest.get("record_key_version") == KEY_VERSION
          and isinstance(manifest.get("records"), list)
          and isinstance(manifest.get("subset"), dict)
          and all(isinstance(r, dict) and isinstance(r.get("key"), str)
                  and isinstance(r.get("id"), str) and isinstance(r.get("position"), int)
                  for r in manifest["records"]))
    if not ok:
        raise DataError(f"{path}: not a manifest of version {MANIFEST_VERSION} with record "
                        f"keys of version {KEY_VERSION} (records of key, id, position); fix: "
                        f"use a manifest written by this version of tive")
    return manifest


def _keyed(data: str | os.PathLike, manifest: dict[str, Any],
           image_root: str | os.PathLike | None) -> tuple[Mixture, list[str]]:
    """The mixture at ``data`` and its record keys, labelled and resolved as the manifest's
    selection was (task field; image root: given, else the manifest's where it exists, else
    the data's folder)."""
    mixture = load_mixture(data, manifest.get("task_field"))
    if image_root is None and manifest.get("image_root") and Path(
            manifest["image_root"]).is_dir():
        image_root = manifest["image_root"]
    return mixture, as_text(record_keys(mixture, label_tasks(mixture).tasks, image_root))


def match(manifest: dict[str, Any], keys: list[str], ids: list[str]) -> tuple[list[int], list]:
    """The mixture row of each manifest record, and the records not found.

    A record is found by its key; among rows of that key (identical records), the one with its
    id and position, else its id, else its position, else the first.
    """
    rows_of: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        rows_of[k].append(i)
    rows, missing = [], []
    for r in manifest["records"]:
        found = rows_of.get(r["key"], [])
        if not found:
            missing.append(r)
            continue
        same_id = [i for i in found if ids[i] == r["id"]]
        pick = [i for i in same_id if i == r["position"]] or same_id or \
            [i for i in found if i == r["position"]] or found
        rows.append(pick[0])
    return rows, missing


def apply_manifest(manifest_path: str | os.PathLike, data: str | os.PathLike,
                   out: str | os.PathLike,
                   image_root: str | os.PathLike | None = None) -> tuple[Path, int]:
    """Write the subset the manifest describes, taken from ``data``, to ``out``; the path and
    the number of records written.

    Raises:
        DataError: records of the manifest that ``data`` lacks (how many, the first ids);
            nothing is written.
        OutputError: ``out`` is the mixture itself.
    """
    manifest = read_manifest(manifest_path)
    mixture, keys = _keyed(data, manifest, image_root)
    rows, missing = match(manifest, keys, mixture.ids)
    if missing:
        first = ", ".join(f"{r['id']} (position {r['position']}, key {r['key'][:12]})"
                          for r in missing[:5])
        raise DataError(f"{mixture.path}: {len(missing):,} of the manifest's "
                        f"{len(manifest['records']):,} records are not in this mixture (first: "
                        f"{first}); nothing was written; fix: the mixture the selection was "
                        f"made from, or one that still has these records")
    out = Path(out)
    if out.exists() and os.path.samefile(out, mixture.path):
        raise OutputError(f"{out}: is the mixture; writing there would destroy it; fix: "
                          f"choose another -o")
    return mixture.write_subset(np.asarray(rows, dtype=np.int64), out), len(rows)


def check_subset(subset: str | os.PathLike, manifest_path: str | os.PathLike,
                 image_root: str | os.PathLike | None = None) -> str:
    """Compare ``subset`` with its manifest; one line saying how they agree.

    Raises:
        DataError: the subset's records differ from the manifest's (what differs).
    """
    manifest = read_manifest(manifest_path)
    subset = Path(subset)
    n = len(manifest["records"])
    if tree_digest(subset) == manifest["subset"].get("sha256"):
        return f"{subset}: matches {manifest_path} byte for byte ({n:,} records)"
    mixture, keys = _keyed(subset, manifest, image_root)
    want = [(r["key"], r["id"]) for r in manifest["records"]]
    got = list(zip(keys, mixture.ids))
    if got == want:
        return (f"{subset}: the same {n:,} records as {manifest_path} (keys and ids, in "
                f"order), written with other bytes")
    raise DataError(f"{subset}: differs from {manifest_path}: {_difference(want, got)}; fix: "
                    f"rebuild it with `tive apply {manifest_path} --data MIX -o {subset}`")


def _difference(want: list[tuple[str, str]], got: list[tuple[str, str]]) -> str:
    """The differences of two record lists ``(key, id)``, in words."""
    have, asked = set(got), set(want)
    lacking = [i for k, i in want if (k, i) not in have]
    extra = [i for k, i in got if (k, i) not in asked]
    parts = [f"{len(got):,} records, the manifest {len(want):,}"] if len(got) != len(want) else []
    if lacking:
        parts.append(f"{len(lacking):,} of the manifest's records missing (ids "
                     f"{', '.join(lacking[:5])})")
    if extra:
        parts.append(f"{len(extra):,} records not in the manifest (ids {', '.join(extra[:5])})")
    if not parts:
        at = next(n for n, (a, b) in enumerate(zip(want, got)) if a != b)
        parts.append(f"the same records in another order (first at record {at})")
    return "; ".join(parts)
