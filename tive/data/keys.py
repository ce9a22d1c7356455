"""Record keys: a 128-bit content key of each record as it is scored (docs/design.md,
"Record keys"), the link between a store's rows, the records of another version of the
mixture, other stores, and a selection's manifest.

The key of record i is the blake2b-128 digest (32 hex digits) of the canonical JSON (sorted
keys, no spaces, UTF-8) of::

    {"v": KEY_VERSION, "turns": [[role, text], ...], "task": label, "images": [image, ...]}

with the normalised conversation (:class:`~tive.data.schemas.Record` turns: roles
``system``/``user``/``assistant``), the task label the run uses, and per image, in order:
``"file:" + blake2b-128 of the file's bytes`` for a path that resolves to a file under the image
root, ``"missing:" + the path`` for one that does not (or an ``http(s)`` URL), and
``"inline:" + blake2b-128`` of the data URI or, for an image stored inside a dataset row, of the
whole row's canonical JSON. The record's id, its position, its other fields and its
formatting do not enter: they do not change its gradient.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import orjson

from tive.data.mixture import Mixture
from tive.data.schemas import EMBEDDED, content_key
from tive.util.hashing import file_digest

KEY_VERSION = 1
KEY_DTYPE = np.dtype("S32")  # 32 ASCII hex digits


def record_keys(mixture: Mixture, tasks: np.ndarray, image_root: str | os.PathLike | None = None,
                rows: Iterable[int] | None = None) -> np.ndarray:
    """The record keys of ``rows`` (default: all), ``(n,)`` of :data:`KEY_DTYPE`.

    Args:
        tasks: ``(N,)`` the task label of every record of ``mixture``.
        image_root: the folder relative image paths resolve against (default: the data's).
    """
    root = mixture.image_root(image_root)
    rows = range(len(mixture)) if rows is None else [int(r) for r in rows]
    seen: dict[str, str] = {}  # image path -> its entry (images shared by records read once)
    out = np.empty(len(rows), dtype=KEY_DTYPE)
    for n, i in enumerate(rows):
        record = mixture[i]
        images = [_image_entry(ref, root, mixture, i, seen) for ref in record.images]
        material = {"v": KEY_VERSION, "turns": [[t.role, t.text] for t in record.turns],
                    "task": str(tasks[i]), "images": images}
        out[n] = _digest(_canonical(material)).encode("ascii")
    return out


def _canonical(value: Any) -> bytes:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except (TypeError, orjson.JSONEncodeError):  # a lone surrogate: JSON escapes carry it
        import json

        return json.dumps(value, sort_keys=True, ensure_ascii=True,
                          separators=(",", ":")).encode("ascii")


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _image_entry(ref: str, root: Path, mixture: Mixture, row: int, seen: dict[str, str]) -> str:
    if ref == EMBEDDED:
        return f"inline:{content_key(_as_dict(mixture.raw(row))):016x}"
    if ref.startswith("data:"):
        return f"inline:{_digest(ref.encode('utf-8', 'surrogatepass'))}"
    if ref.startswith(("http://", "https://")):
        return f"missing:{ref}"
    if ref not in seen:
        path = Path(ref) if Path(ref).is_absolute() else root / ref
        seen[ref] = f"file:{file_digest(path)}" if path.is_file() else f"missing:{ref}"
    return seen[ref]


def _as_dict(raw: Any) -> dict:
    return raw if isinstance(raw, dict) else {"row": str(raw)}


def as_text(keys: np.ndarray) -> list[str]:
    """Keys as Python strings (for JSON and messages)."""
    return [k.decode("ascii") for k in np.asarray(keys, dtype=KEY_DTYPE).tolist()]
