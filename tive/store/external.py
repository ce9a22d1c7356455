"""``tive import``: build a store from gradient features computed elsewhere.

Two sources:

* ``.npy`` arrays: ``features`` (N, k), ``norms`` (N,), optionally ``loss`` and ``ntokens``,
  in the data's row order (or in the order of an ``--ids`` file, reordered here);
* the TIVE authors' outputs (``compute_gradient_features.py``): per chunk ``c`` a file
  ``output_{c}`` (``torch.save`` of a list of ``(batch, k)`` tensors) and
  ``output_norm_{c}.json`` (a list of norms). Chunks are contiguous slices of the data file in
  order, so concatenating chunk 0, 1, … gives the data's row order.

Features are never held whole: ``.npy`` files are memory-mapped, the authors' chunks are loaded
one at a time, and :func:`tive.store.writers.write_store` copies them into the store block by block.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tive import __version__
from tive.data.mixture import Mixture
from tive.data.tasks import TaskLabels
from tive.errors import DataError
from tive.store.format import IndexEntry, Store
from tive.store.writers import write_store
from tive.util.files import NPY_HEADER_ERRORS, special_kind

PER_RECORD = ("norms", "loss", "ntokens")


NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"


def load_npy(path: str | os.PathLike, what: str) -> np.ndarray:
    """``np.load`` (memory-mapped) with a one-line error naming the option; the file must be a
    real ``.npy`` array (not an ``.npz`` archive, a text file or pickled objects)."""
    kind = special_kind(path)
    if kind is not None:
        raise DataError(f"--{what} {path}: is a {kind}, not a file; expected a .npy array "
                        f"written by numpy.save")
    try:
        with open(path, "rb") as f:
            head = f.read(len(NPY_MAGIC))
    except FileNotFoundError:
        raise DataError(f"--{what} {path}: no such file") from None
    except OSError as e:
        raise DataError(f"--{what} {path}: cannot read ({e.strerror or e})") from None
    if head.startswith(ZIP_MAGIC):
        raise DataError(f"--{what} {path}: an .npz archive of several arrays; expected one .npy "
                        f"array; fix: numpy.save('{what}.npy', numpy.load('{path}')['NAME'])")
    if head != NPY_MAGIC:
        raise DataError(f"--{what} {path}: not a .npy file (no NumPy header; it starts with "
                        f"{head[:8]!r}); expected a file written by numpy.save")
    try:
        return np.load(path, mmap_mode="r")
    except NPY_HEADER_ERRORS as e:
        raise DataError(f"--{what} {path}: a damaged .npy file ({str(e) or type(e).__name__}); "
                        f"expected a file written by numpy.save") from None


class AuthorsChunks:
    """The TIVE authors' ``output_{c}`` files as one ``(N, k)`` array-like, read in order.

    Slicing loads the chunk files it needs (at most the current one is kept), so a sequential
    copy holds one chunk in memory.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        numbers = sorted(int(m.group(1)) for p in self.folder.glob("output_*")
                         if (m := re.fullmatch(r"output_(\d+)", p.name)))
        if not numbers:
            raise DataError(f"{self.folder}: no output_<chunk> files; expected the folder "
                            f"written by the authors' compute_gradient_features.py (output_0, "
                            f"output_norm_0.json, ...)")
        if numbers != list(range(len(numbers))):
            raise DataError(f"{self.folder}: chunks {numbers} are not 0..{len(numbers) - 1}; a "
                            f"chunk is missing; fix: rerun that chunk")
        self.norms = [self._norms(c) for c in numbers]
        self.starts = np.cumsum([0] + [len(n) for n in self.norms])
        self._cached: tuple[int, np.ndarray] | None = None
        first = self._chunk(0)
        self.shape = (int(self.starts[-1]), first.shape[1])
        self.dtype = first.dtype

    def all_norms(self) -> np.ndarray:
        """``(N,)`` float64 norms of all chunks, in order."""
        return np.concatenate([np.asarray(n, dtype=np.float64) for n in self.norms])

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        parts = []
        for c in range(len(self.norms)):
            lo, hi = max(start, self.starts[c]), min(stop, self.starts[c + 1])
            if lo < hi:
                parts.append(self._chunk(c)[lo - self.starts[c]:hi - self.starts[c]])
        return np.concatenate(parts) if parts else np.empty((0, self.shape[1]), self.dtype)

    def _chunk(self, c: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != c:
            self._cached = None  # let the previous chunk go before loading the next
            self._cached = (c, self._load(c))
        return self._cached[1]

    def _load(self, c: int) -> np.ndarray:
        import torch

        path = self.folder / f"output_{c}"
        try:
            parts = torch.load(path, map_location="cpu", weights_only=True)
            block = torch.cat(list(parts), dim=0) if isinstance(parts, (list, tuple)) else parts
            block = block.float().numpy()
        except Exception as e:  # torch raises many kinds for a damaged or foreign file
            why = (str(e).splitlines() or [type(e).__name__])[0]
            if "weights_only" in why or "Weights only" in why:  # not torch's advice to unpickle
                why = "not a torch.save file of plain tensors"
            raise DataError(f"{path}: cannot read ({why[:120]}); expected a torch.save list of "
                            f"(batch, k) tensors") from None
        k = getattr(self, "shape", (0, block.shape[-1] if block.ndim else 0))[1]
        if block.ndim == 2 and block.shape[1] != k:
            raise DataError(f"{path}: {block.shape[1]} features per row, output_0 has {k}; "
                            f"expected every chunk from the same run (the same projection "
                            f"dimension)")
        if block.ndim != 2 or block.shape[0] != len(self.norms[c]):
            raise DataError(f"{self.folder / f'output_norm_{c}.json'}: {len(self.norms[c])} "
                            f"norms for {block.shape[0]} feature rows in {path.name}; expected "
                            f"one norm per row")
        return block

    def _norms(self, c: int) -> list[float]:
        path = self.folder / f"output_norm_{c}.json"
        kind = special_kind(path)
        try:
            if kind is not None:
                raise DataError(f"{path}: is a {kind}; expected a JSON list of norms")
            norms = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{path}: missing beside output_{c}; fix: copy it here") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None
        except (OSError, UnicodeDecodeError, RecursionError, ValueError) as e:
            why = getattr(e, "strerror", None) or type(e).__name__
            raise DataError(f"{path}: cannot read ({why}); expected a JSON list of numbers (one "
                            f"norm per record)") from None
        if not isinstance(norms, list) or not all(isinstance(x, (int, float)) for x in norms):
            raise DataError(f"{path}: expected a JSON list of numbers (one norm per record)")
        return norms


def read_authors_outputs(folder: str | os.PathLike) -> dict[str, Any]:
    """``{"features": AuthorsChunks, "norms": (N,)}`` from the authors' chunk files.

    Each chunk's row count is checked against its norms when the chunk is read (while the
    store is written, which then leaves nothing behind if one is wrong).
    """
    chunks = AuthorsChunks(folder)
    return {"features": chunks, "norms": chunks.all_norms()}


class Reordered:
    """Rows of ``features`` taken in ``order``, as an array-like read slice by slice."""

    def __init__(self, features: Any, order: np.ndarray) -> None:
        self.features, self.order = features, order
        self.shape, self.dtype = (len(order), features.shape[1]), features.dtype

    def __getitem__(self, rows: slice) -> np.ndarray:
        wanted = self.order[rows]
        sort = np.argsort(wanted)  # read in file order, then put back
        block = np.asarray(self.features[wanted[sort]])
        out = np.empty_like(block)
        out[sort] = block
        return out


def reorder_by_ids(mixture: Mixture, ids: list[str], arrays: dict[str, Any],
                   ids_path: str) -> dict[str, Any]:
    """Put rows given in the order of ``ids`` into the mixture's order (features lazily)."""
    dup = _first_duplicate(mixture.ids)
    if dup is not None:
        raise DataError(f"{mixture.path}: id {dup!r} is used by more than one record, so rows "
                        f"cannot be matched by id; fix: give features in the data's row order "
                        f"(leave out --ids), or make ids unique")
    if (d := _first_duplicate(ids)) is not None:
        raise DataError(f"--ids {ids_path}: id {d!r} appears twice; expected one row per record")
    rows = arrays["features"].shape[0]
    if len(ids) != rows:
        raise DataError(f"--ids {ids_path}: {len(ids):,} ids for {rows:,} feature rows; "
                        f"expected one id per row")
    position = {rid: i for i, rid in enumerate(ids)}
    missing = [rid for rid in mixture.ids if rid not in position]
    if missing or len(ids) != len(mixture):
        raise DataError(f"--ids {ids_path}: {len(ids):,} ids for {len(mixture):,} records"
                        f"{f', no row for id {missing[0]!r}' if missing else ''}; expected the "
                        f"ids of exactly the records of {mixture.path}")
    order = np.array([position[rid] for rid in mixture.ids])
    return {k: Reordered(v, order) if k == "features" else np.asarray(v)[order]
            for k, v in arrays.items()}


def read_ids(path: str | os.PathLike) -> list[str]:
    """Ids from a JSON list, a ``.npy`` array, or a text file with one id per line."""
    path = Path(path)
    kind = special_kind(path)
    if kind is not None:
        raise DataError(f"--ids {path}: is a {kind}; expected a file of ids")
    if path.suffix == ".npy":
        values = load_npy(path, "ids")
        if values.ndim != 1:
            raise DataError(f"--ids {path}: shape {values.shape}; expected one id per row")
        return [str(x) for x in values]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--ids {path}: cannot read ({getattr(e, 'strerror', None) or e})") \
            from None
    if path.suffix != ".json":
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"--ids {path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); expected "
                        f"a JSON list of ids") from None
    except (RecursionError, ValueError) as e:  # nested too deep, integers too long
        raise DataError(f"--ids {path}: cannot read ({type(e).__name__}: {str(e)[:60]}); "
                        f"expected a JSON list of ids") from None
    if not isinstance(values, list):
        raise DataError(f"--ids {path}: expected a JSON list of ids")
    return [str(x) for x in values]


def check_arrays(arrays: dict[str, Any], n: int, where: str,
                 label: Callable[[str], str] = lambda name: f"--{name}") -> dict[str, Any]:
    """Check shapes and values against ``n`` records before anything is written: the one
    validation of given arrays, for ``tive import`` and the Python API alike.

    Args:
        arrays: ``features`` ``(N, k)``, ``norms`` ``(N,)``, optionally ``loss`` and
            ``ntokens`` ``(N,)``.
        label: how a message names an array (``--norms`` on the command line, ``norms=`` in
            Python).

    Returns the per-record arrays as plain numpy arrays (``ntokens`` as int64).

    Raises:
        DataError: a wrong shape, complex or non-numeric values, a negative norm, or token
            counts that are negative, non-integral or too large.
    """
    features = arrays["features"]
    shape = tuple(getattr(features, "shape", ()))
    if len(shape) != 2 or shape[0] != n:
        raise DataError(f"{label('features')}: shape {shape}, but {where} has {n:,} records; "
                        f"expected ({n}, k), one row per record in the data's order")
    if shape[1] < 1:
        raise DataError(f"{label('features')}: shape {shape} has no columns; expected ({n}, k) "
                        f"with k ≥ 1 projected gradient features")
    _real(np.dtype(features.dtype), label("features"))
    out = {"features": features}
    for name in PER_RECORD:
        if name not in arrays:
            continue
        arr = np.asarray(arrays[name])
        if arr.shape != (n,):
            raise DataError(f"{label(name)}: shape {arr.shape}, but {where} has {n:,} records; "
                            f"expected ({n},)")
        _real(arr.dtype, label(name))
        out[name] = arr
    negative = np.flatnonzero(out["norms"] < 0)
    if len(negative):
        raise DataError(f"{label('norms')}: row {negative[0]} is {out['norms'][negative[0]]}; "
                        f"expected exact gradient norms (≥ 0)")
    if "ntokens" in out:
        out["ntokens"] = _token_counts(out["ntokens"], label("ntokens"))
    return out


def _token_counts(t: np.ndarray, what: str) -> np.ndarray:
    """``t`` as int64 token counts: whole, finite, ≥ 0 and below 2⁵³."""
    if not np.issubdtype(t.dtype, np.integer) and t.dtype != np.bool_:
        with np.errstate(invalid="ignore"):
            bad = np.flatnonzero(~(np.isfinite(t) & (np.abs(t) < 2 ** 53) & (t == np.round(t))))
        if len(bad):
            raise DataError(f"{what}: holds non-integral, non-finite or too large values (row "
                            f"{bad[0]} is {t[bad[0]].item()!r}); expected supervised token "
                            f"counts")
    negative = np.flatnonzero(t < 0)
    if len(negative):
        raise DataError(f"{what}: row {negative[0]} is {t[negative[0]].item()!r}; expected "
                        f"supervised token counts (≥ 0)")
    return t.astype(np.int64)


def _real(dtype: np.dtype, what: str) -> None:
    """Refuse arrays that are not real numbers (strings, objects, complex: no silent cast)."""
    if dtype.kind not in "fiub":
        kind = {"c": "complex numbers", "U": "strings", "S": "bytes", "O": "Python objects"}.get(
            dtype.kind, f"{dtype}")
        raise DataError(f"{what}: holds {kind} ({dtype}); expected real numbers (float or int); "
                        f"fix: save the array as float32 or float64")


def import_store(
    run: str | os.PathLike,
    mixture: Mixture,
    labels: TaskLabels,
    arrays: dict[str, Any],
    *,
    source: str,
    settings: dict[str, Any],
    feature_dtype: str = "float16",
    skipped: np.ndarray | None = None,
    overwrite: bool = False,
) -> Store:
    """Check the arrays against the data and write ``run/store``.

    Args:
        arrays: ``features`` (N, k) array-like and ``norms`` (N,), optionally ``loss``,
            ``ntokens``.
        source: where the features came from (recorded in meta.json).
        settings: options that shaped the store (task field, image root), for later commands.
        skipped: ``(N,)`` int8 skip codes (e.g. missing images), 0 for none.
    """
    arrays = check_arrays(arrays, len(mixture), str(mixture.path))
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
    return write_store(Path(run) / "store", features=arrays["features"], norms=arrays["norms"],
                       loss=arrays.get("loss"), ntokens=arrays.get("ntokens"), skipped=skipped,
                       index=index, meta=meta, feature_dtype=feature_dtype, overwrite=overwrite)


def _first_duplicate(values: list[str]) -> str | None:
    seen: set[str] = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return None
