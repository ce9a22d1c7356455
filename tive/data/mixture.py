"""The mixture: any supported file read into one list of records, kept verbatim.

Formats (``container`` × ``schema``):

* containers: ``json`` (a JSON list), ``jsonl`` (JSON Lines), ``parquet`` (a file or a folder of
  parquet files), ``hf-disk`` (a ``datasets`` ``save_to_disk`` folder);
* schemas: ``llava`` (``conversations`` of ``{from, value}``, optional ``image``/``images``),
  ``openai`` (``messages`` of ``{role, content}``, content a string or parts),
  ``alpaca`` (``instruction``, ``input``, ``output``).

Each record keeps its original form (the dict of a JSON list, the exact line of a JSONL file,
the row of a ``datasets`` table) so that :meth:`Mixture.write_subset` writes the chosen records
back unchanged, in the input's own format.

Read in three modules: :mod:`tive.data.readers` (containers: rows as stored, and the byte span
of each record of a JSON list), :mod:`tive.data.schemas` (one row into a :class:`Record`), and this
one (the :class:`Mixture`, reading it whole, writing subsets). See docs/design.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tive.data.paths import require_mixture_path
from tive.data.readers import CONTAINERS, quiet_datasets, read_container
from tive.data.schemas import EMBEDDED, SCHEMAS, Record, content_key, detect_schema, normalize
from tive.errors import DataError
from tive.util.files import atomic_path, special_kind
from tive.util.hashing import distinct_keys


class Mixture:
    """A mixture of records read from one file or folder.

    Attributes:
        path: where it was read from.
        container: one of :data:`CONTAINERS`.
        schema: one of :data:`SCHEMAS`.
        ids: record ids, ``(N,)`` list of str.
        explicit_tasks: per record, the explicit task field's value or None.
        content_keys: ``(N,)`` uint64 digest of each record's content (identical records share
            one; independent of position, whitespace and key order).
        keys: ``content_keys`` with repeats of identical records made
            distinct (order-free identity, used to seed per-record random draws so a selection
            does not depend on row order).
        fingerprint: digest of the ordered records; a store built on other data is refused.
    """

    def __init__(self, path: Path, container: str, schema: str, rows: Any,
                 records: list[Record], keys: np.ndarray) -> None:
        self.path = path
        self.container = container
        self.schema = schema
        self._rows = rows  # list[dict] (json), list[str] (jsonl lines) or datasets.Dataset
        self._records = records
        self.content_keys = keys
        self.keys = distinct_keys(keys)
        self.fingerprint = hashlib.blake2b(keys.tobytes(), digest_size=16).hexdigest()

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Record:
        return self._records[index]

    def __iter__(self) -> Iterator[Record]:
        return iter(self._records)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self._records]

    @property
    def explicit_tasks(self) -> list[str | None]:
        return [r.task for r in self._records]

    @property
    def spans(self) -> np.ndarray | None:
        """``(N, 2)`` byte spans of a JSON list's records in the file, else None."""
        return getattr(self._rows, "spans", None)

    @property
    def digest(self) -> str | None:
        """Checksum of the JSON or JSONL file's bytes as read (:func:`tive.data.readers.source_digest`),
        else None."""
        return getattr(self._rows, "digest", None)

    def raw(self, index: int) -> Any:
        """The record as stored in the input: a dict (json, parquet, hf-disk) or the line (jsonl)."""
        return self._rows[index]

    def default_suffix(self) -> str:
        """File-name suffix of this container ('' for a save_to_disk folder)."""
        return {"json": ".json", "jsonl": ".jsonl", "parquet": ".parquet", "hf-disk": ""}[self.container]

    def write_subset(self, indices: Sequence[int], target: str | os.PathLike) -> Path:
        """Write the records at ``indices`` (repeats allowed) to ``target`` in the input's format.

        Records are written verbatim: a JSON list's records and JSONL lines byte for byte as
        they are in the input (a JSON list as ``[``, the records joined by ``,`` and new lines,
        ``]``), dataset rows by ``Dataset.select``. The file appears only when complete (temporary name, rename).
        """
        target = Path(target)
        rows = np.fromiter(indices, dtype=np.int64) if not isinstance(indices, np.ndarray) \
            else indices.astype(np.int64).reshape(-1)
        bad = rows[(rows < 0) | (rows >= len(self))]
        if len(bad):
            raise IndexError(f"write_subset: row {bad[0]} is outside 0..{len(self) - 1}")
        indices = rows.tolist()
        source = self._rows.source() if self.container == "json" and self.spans is not None \
            else None
        if source is not None:
            with atomic_path(target) as tmp:
                _write_spans(source, self.spans[rows], tmp)
        elif self.container == "json":  # no spans, or the file changed since it was read
            chosen = [self._rows[i] for i in indices]
            with atomic_path(target) as tmp:
                try:
                    _dump_json(chosen, tmp, ensure_ascii=False)
                except UnicodeEncodeError:  # a lone surrogate: only \u escapes can carry it
                    _dump_json(chosen, tmp, ensure_ascii=True)
        elif self.container == "jsonl":
            with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
                for i in indices:
                    f.write(self._rows[i])
                    f.write("\n")
        elif self.container == "parquet":
            with atomic_path(target) as tmp, quiet_datasets():
                self._rows.select(indices).to_parquet(str(tmp))
        else:
            with atomic_path(target, directory=True) as tmp, quiet_datasets():
                self._rows.select(indices).save_to_disk(str(tmp))
        return target

    def missing_images(self, image_root: str | os.PathLike | None = None) -> np.ndarray:
        """``(N,)`` bool: records with an image path that does not exist under ``image_root``.

        Relative paths resolve against ``image_root`` (default: the data file's folder); absolute
        paths are used as they are; embedded images and ``data:`` URIs always exist; ``http(s)``
        URLs count as missing (tive never downloads).
        """
        root = self.image_root(image_root)
        missing = np.zeros(len(self), dtype=bool)
        for i, record in enumerate(self._records):
            missing[i] = any(not _image_exists(p, root) for p in record.images)
        return missing

    def image_root(self, image_root: str | os.PathLike | None = None) -> Path:
        """The folder relative image paths resolve against."""
        return Path(image_root) if image_root is not None else _default_image_root(self.path)

    def check_images(self, image_root: str | os.PathLike | None = None,
                     skip_missing: bool = False) -> np.ndarray:
        """:meth:`missing_images`, raising unless ``skip_missing``.

        Raises:
            DataError: naming how many records have missing images and the first three.
        """
        missing = self.missing_images(image_root)
        if missing.any() and not skip_missing:
            root = self.image_root(image_root)
            first = []
            for i in np.flatnonzero(missing)[:3]:
                path = next(p for p in self[i].images if not _image_exists(p, root))
                first.append(f"record {i} (id {self[i].id}): {path}")
            raise DataError(f"{self.path}: {int(missing.sum()):,} records reference images that "
                            f"do not exist under {root} (first: {'; '.join(first)}); fix: pass "
                            f"--image-root DIR, or --skip-missing-images to leave them out")
        return missing


def _write_spans(source: bytes, chosen: np.ndarray, path: Path) -> None:
    """Write a JSON list of records, each copied from ``source`` byte for byte (``chosen``:
    ``(n, 2)`` byte offsets ``[start, stop)`` of each record to write, in order)."""
    view = memoryview(source)
    with open(path, "wb") as f:
        f.write(b"[\n")
        for n, (start, stop) in enumerate(chosen.tolist()):
            if n:
                f.write(b",\n")
            f.write(view[start:stop])
        f.write(b"\n]\n")


def _dump_json(records: list[dict], path: Path, ensure_ascii: bool) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=ensure_ascii, indent=2)
        f.write("\n")


def load_mixture(path: str | os.PathLike, task_field: str | None = None) -> Mixture:
    """Read a mixture file or folder into a :class:`Mixture`.

    Args:
        path: a ``.json``/``.jsonl`` file, a ``.parquet`` file or folder of them, or a
            ``datasets`` ``save_to_disk`` folder.
        task_field: record field that names the task; default: the first of ``task``,
            ``dataset``, ``source`` that a record has.

    Raises:
        DataError: the file is missing or unreadable, or a record is malformed (one line:
            file, record index and id, what was expected, the fix).
    """
    path = require_mixture_path(path)
    kind = special_kind(path)
    if kind is not None:  # reading a FIFO would wait for a writer forever
        raise DataError(f"{path}: is a {kind}; expected a mixture file or folder; fix: pass "
                        f"the file itself")
    try:
        return _load(path, task_field)
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read (thousands of levels); "
                        f"expected records of conversations; fix: check the file is a "
                        f"mixture") from None
    except ValueError as e:
        if "digits" not in str(e):
            raise
        raise DataError(f"{path}: holds an integer of more than {sys.get_int_max_str_digits():,} "
                        f"digits, which Python refuses to read; expected records of "
                        f"conversations; fix: check the file is a mixture") from None


def _load(path: Path, task_field: str | None) -> Mixture:
    container, rows, dicts = read_container(path)
    if not len(rows):
        raise DataError(f"{path}: the mixture has no records; expected at least one record")
    records: list[Record] = []
    keys = np.empty(len(rows), dtype=np.uint64)
    schema = ""
    for i, raw in enumerate(dicts):
        schema = schema or detect_schema(path, raw)
        records.append(normalize(raw, i, schema, path, task_field))
        keys[i] = content_key(raw)
    if task_field is not None and all(r.task is None for r in records):
        raise DataError(f"{path}: --task-field {task_field!r} is absent from every record; "
                        f"fix: name a field the records have, or leave it out to infer tasks")
    return Mixture(path, container, schema, rows, records, keys)


def _default_image_root(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _image_exists(ref: str, root: Path) -> bool:
    if ref == EMBEDDED or ref.startswith("data:"):
        return True
    if ref.startswith(("http://", "https://")):
        return False
    p = Path(ref)  # a regular file (a FIFO would block a reader); a name too long: missing
    return os.path.isfile(p if p.is_absolute() else root / p)
