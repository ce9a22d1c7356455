"""A mixture's labels and keys kept beside a store, so that a sweep of selections does not
normalise and label every record again.

Reading LLaVA-665K for ``tive select`` costs about 27 s on a 2-core CPU, most of it turning
665K records into :class:`~tive.data.mixture.Record` s and labelling their tasks — work whose result
(per row: content key, task, whether it was inferred; and the file's container and schema)
depends only on the file and ``--task-field``. The first call writes it to
``RUN/cache/mixture-<key>.npz``; ``key`` is a digest of the file's resolved path, size and
modification time, the task field and :data:`VERSION`. With them it keeps each record's byte
span in a JSON list. A later call builds the :class:`~tive.data.mixture.Mixture` from it without parsing
the file: the subset is copied from the spans, verbatim, and a record is parsed and normalised
only when one is asked for (the HTML report's examples, ``--method length``). Only JSON and JSONL files are cached; parquet and datasets
folders are read as always.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tive.data import mixture as dt, readers, schemas
from tive.data.tasks import TaskLabels, label_tasks
from tive.errors import OutputError
from tive.util.sealed import note_recomputed, read_sealed, write_sealed

VERSION = 4  # bump when records are normalised or labelled differently


def load_labelled(path: str | os.PathLike, task_field: str | None,
                  cache: Path | None) -> tuple[dt.Mixture, TaskLabels]:
    """The mixture at ``path`` and its task labels, through the cache folder ``cache``.

    Returns the same mixture (records, keys, fingerprint, rows) and labels as
    :func:`tive.data.mixture.load_mixture` and :func:`tive.data.tasks.label_tasks`.
    """
    path = Path(path)
    if cache is None or not path.is_file():
        mixture = dt.load_mixture(path, task_field=task_field)
        return mixture, label_tasks(mixture)
    file = cache / f"mixture-{_key(path, task_field)}.npz"
    found = _read(file)
    lazy = _lazy_mixture(path, task_field, found) if found is not None else None
    if lazy is not None:  # the file's bytes are those cached (else: read it afresh)
        return lazy, TaskLabels(found["tasks"], found["inferred"])
    mixture = dt.load_mixture(path, task_field=task_field)
    labels = label_tasks(mixture)
    if mixture.container in ("json", "jsonl") and mixture.digest is not None:
        _write(file, mixture, labels)
    return mixture, labels


def _key(path: Path, task_field: str | None) -> str:
    st = path.stat()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v{VERSION};{path.resolve()};{st.st_size};{st.st_mtime_ns};{task_field!r}".encode())
    return h.hexdigest()


_NAMES = {"keys", "names", "codes", "inferred", "format", "spans", "digest"}


def _read(file: Path) -> dict[str, Any] | None:
    """The cache's arrays when whole (sealed, exactly its names, each of its type and shape,
    task codes in range); a damaged file is said on stderr and None returned (read afresh)."""
    found, why = read_sealed(file)
    if found is not None and not _whole(found):
        found, why = None, "its arrays are not those expected"
    if found is None:
        if why is not None:
            note_recomputed(file, why)
        return None
    found["tasks"] = found["names"].astype(object)[found["codes"]]
    return found


def _whole(a: dict[str, np.ndarray]) -> bool:
    if set(a) != _NAMES:
        return False
    n, kinds = len(a["keys"]), {"keys": "u", "names": "U", "codes": "i", "inferred": "b",
                                "format": "U", "spans": "i", "digest": "U"}
    if any(a[name].dtype.kind != kind for name, kind in kinds.items()):
        return False
    return (a["keys"].shape == a["codes"].shape == a["inferred"].shape == (n,)
            and a["names"].ndim == 1 and a["format"].shape == (2,) and a["digest"].shape == ()
            and a["spans"].ndim == 2 and a["spans"].shape[1] == 2
            and str(a["format"][0]) in ("json", "jsonl")
            and bool(((a["codes"] >= 0) & (a["codes"] < len(a["names"]))).all()))


def _write(file: Path, mixture: dt.Mixture, labels: TaskLabels) -> None:
    """Write atomically; an unwritable folder is simply not cached."""
    names, codes = np.unique(labels.tasks.astype(str), return_inverse=True)
    try:
        write_sealed(file, {"keys": mixture.content_keys, "names": names,
                            "codes": codes.astype(np.int64), "inferred": labels.inferred,
                            "format": np.array([mixture.container, mixture.schema]),
                            "spans": _spans(mixture), "digest": np.array(mixture.digest)})
    except OutputError:
        return


def _spans(mixture: dt.Mixture) -> np.ndarray:
    """The JSON list's record spans, or ``(0, 2)`` where there are none (JSONL, or not found)."""
    spans = mixture.spans
    return spans if spans is not None else np.zeros((0, 2), dtype=np.int64)


def _lazy_mixture(path: Path, task_field: str | None,
                  found: dict[str, Any]) -> dt.Mixture | None:
    """The mixture from the cache, or None when the file's bytes are not those cached (a file
    changed without a new size or modification time: ``cp -p``, ``rsync -a``)."""
    container, schema = (str(x) for x in found["format"])
    spans = found["spans"]
    if container == "json" and len(spans) == len(found["keys"]):
        try:
            rows: Any = readers.SpanRows(path.read_bytes(), spans)  # parsed when asked
        except OSError:
            return None
    else:
        _, rows, _ = readers.read_container(path)  # the rows as stored: written back verbatim
    if rows.digest != str(found["digest"]):
        return None
    records = _LazyRecords(rows, container, schema, path, task_field)
    return dt.Mixture(path, container, schema, rows, records, found["keys"])


class _LazyRecords(Sequence):
    """The mixture's :class:`~tive.data.mixture.Record` s, each normalised when first asked for."""

    def __init__(self, rows: Any, container: str, schema: str, path: Path,
                 task_field: str | None) -> None:
        self._rows, self._container, self._schema = rows, container, schema
        self._path, self._task_field = path, task_field
        self._done: dict[int, dt.Record] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dt.Record:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]
        if index not in self._done:
            raw = self._rows[index]
            if self._container == "jsonl":
                raw = readers.loads(raw)
            self._done[index] = schemas.normalize(raw, index, self._schema, self._path,
                                                  self._task_field)
        return self._done[index]

    def __iter__(self) -> Iterator[dt.Record]:
        return (self[i] for i in range(len(self)))
