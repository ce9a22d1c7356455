"""``tive import``: build a store from gradient features computed elsewhere.

Two sources:

* ``.npy`` arrays: ``features`` (N, k), ``norms`` (N,), optionally ``loss`` and ``ntokens``,
  in the data's row order (or in the order of an ``--ids`` file, reordered here);
* the TIVE authors' outputs (``compute_gradient_features.py``): per chunk ``c`` a file
  ``output_{c}`` (``torch.save`` of a list of ``(batch, k)`` tensors) and
  ``output_norm_{c}.json`` (a list of norms). Chunks are contiguous slices of the data file in
  order, so concatenating chunk 0, 1, … gives the data's row order.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from tive import __version__
from tive.data import Mixture
from tive.errors import DataError
from tive.store import IndexEntry, Store, write_store
from tive.tasks import TaskLabels


def load_npy(path: str | os.PathLike, what: str) -> np.ndarray:
    """``np.load`` with a one-line error naming the option."""
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise DataError(f"--{what} {path}: no such file") from None
    except (ValueError, OSError) as e:
        raise DataError(f"--{what} {path}: not a .npy array ({e}); expected a file written by "
                        f"numpy.save") from None


def read_authors_outputs(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(N, k)`` float32 and norms ``(N,)`` from the TIVE authors' chunk files."""
    import torch

    folder = Path(folder)
    chunks = sorted((int(m.group(1)), p) for p in folder.glob("output_*")
                    if (m := re.fullmatch(r"output_(\d+)", p.name)))
    if not chunks:
        raise DataError(f"{folder}: no output_<chunk> files; expected the folder written by the "
                        f"authors' compute_gradient_features.py (output_0, output_norm_0.json, ...)")
    numbers = [c for c, _ in chunks]
    if numbers != list(range(len(numbers))):
        raise DataError(f"{folder}: chunks {numbers} are not 0..{len(numbers) - 1}; a chunk "
                        f"is missing; fix: rerun that chunk")
    feats, norms = [], []
    for c, path in chunks:
        try:
            parts = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DataError(f"{path}: cannot read ({str(e).splitlines()[0]}); expected a "
                            f"torch.save list of tensors") from None
        block = torch.cat(list(parts), dim=0) if isinstance(parts, (list, tuple)) else parts
        norm_path = folder / f"output_norm_{c}.json"
        try:
            chunk_norms = json.loads(norm_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{norm_path}: missing beside {path.name}; fix: copy it here") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{norm_path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None
        if len(chunk_norms) != block.shape[0]:
            raise DataError(f"{norm_path}: {len(chunk_norms)} norms for {block.shape[0]} "
                            f"feature rows in {path.name}; expected one norm per row")
        feats.append(block.float().numpy())
        norms.extend(float(x) for x in chunk_norms)
    return np.concatenate(feats), np.asarray(norms, dtype=np.float64)


def reorder_by_ids(mixture: Mixture, ids: list[str], arrays: dict[str, np.ndarray],
                   ids_path: str) -> dict[str, np.ndarray]:
    """Put rows given in the order of ``ids`` into the mixture's order."""
    dup = _first_duplicate(mixture.ids)
    if dup is not None:
        raise DataError(f"{mixture.path}: id {dup!r} is used by more than one record, so rows "
                        f"cannot be matched by id; fix: give features in the data's row order "
                        f"(leave out --ids), or make ids unique")
    if (d := _first_duplicate(ids)) is not None:
        raise DataError(f"--ids {ids_path}: id {d!r} appears twice; expected one row per record")
    position = {rid: i for i, rid in enumerate(ids)}
    missing = [rid for rid in mixture.ids if rid not in position]
    if missing or len(ids) != len(mixture):
        raise DataError(f"--ids {ids_path}: {len(ids):,} ids for {len(mixture):,} records"
                        f"{f', no row for id {missing[0]!r}' if missing else ''}; expected the "
                        f"ids of exactly the records of {mixture.path}")
    order = np.array([position[rid] for rid in mixture.ids])
    return {k: v[order] for k, v in arrays.items()}


def read_ids(path: str | os.PathLike) -> list[str]:
    """Ids from a JSON list, a ``.npy`` array, or a text file with one id per line."""
    path = Path(path)
    if path.suffix == ".npy":
        return [str(x) for x in load_npy(path, "ids")]
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return [str(x) for x in json.loads(text)]
    return [line.strip() for line in text.splitlines() if line.strip()]


def import_store(
    run: str | os.PathLike,
    mixture: Mixture,
    labels: TaskLabels,
    arrays: dict[str, np.ndarray],
    *,
    source: str,
    settings: dict[str, Any],
    feature_dtype: str = "float16",
    skipped: np.ndarray | None = None,
    overwrite: bool = False,
) -> Store:
    """Check the arrays against the data and write ``run/store``.

    Args:
        arrays: ``features`` (N, k) and ``norms`` (N,), optionally ``loss``, ``ntokens``.
        source: where the features came from (recorded in meta.json).
        settings: options that shaped the store (task field, image root), for later commands.
        skipped: ``(N,)`` int8 skip codes (e.g. missing images), 0 for none.
    """
    n = len(mixture)
    features = arrays["features"]
    if features.ndim != 2:
        raise DataError(f"features have shape {features.shape}; expected (records, dim)")
    for name, arr in arrays.items():
        if arr.shape[0] != n:
            raise DataError(f"{name}: {arr.shape[0]:,} rows but {mixture.path} has {n:,} "
                            f"records; expected one row per record, in the data's order")
    index = [IndexEntry(r.id, str(t), int(k))
             for r, t, k in zip(mixture, labels.tasks, mixture.keys)]
    meta = {
        "tive_version": __version__,
        "source": source,
        "model": None,
        "adapter": None,
        "key_parameters": None,
        "projector": {"type": "imported", "seed": None},
        "data": {"path": str(mixture.path.resolve()), "format": mixture.container,
                 "schema": mixture.schema, "fingerprint": mixture.fingerprint},
        "settings": settings,
    }
    return write_store(Path(run) / "store", features=features, norms=arrays["norms"],
                       loss=arrays.get("loss"), ntokens=arrays.get("ntokens"), skipped=skipped,
                       index=index, meta=meta, feature_dtype=feature_dtype, overwrite=overwrite)


def _first_duplicate(values: list[str]) -> str | None:
    seen: set[str] = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return None
