"""Stage 1 — read a mixture: any supported file into one list of records, kept verbatim.

Formats (``container`` × ``schema``):

* containers: ``json`` (a JSON list), ``jsonl`` (JSON Lines), ``parquet`` (a file or a folder of
  parquet files), ``hf-disk`` (a ``datasets`` ``save_to_disk`` folder);
* schemas: ``llava`` (``conversations`` of ``{from, value}``, optional ``image``/``images``),
  ``openai`` (``messages`` of ``{role, content}``, content a string or parts),
  ``alpaca`` (``instruction``, ``input``, ``output``).

Each record keeps its original form (the dict of a JSON list, the exact line of a JSONL file,
the row of a ``datasets`` table) so that :meth:`Mixture.write_subset` writes the chosen records
back unchanged, in the input's own format.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import orjson

from tive.errors import DataError
from tive.fileio import atomic_path
from tive.hashing import distinct_keys

CONTAINERS = ("json", "jsonl", "parquet", "hf-disk")
SCHEMAS = ("llava", "openai", "alpaca")
TASK_FIELDS = ("task", "dataset", "source")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
               "system": "system"}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
EMBEDDED = "<embedded>"  # an image stored inside the dataset rather than referenced by path


class Turn(NamedTuple):
    """One message of a conversation. ``role`` is ``system``, ``user`` or ``assistant``."""

    role: str
    text: str


class Record(NamedTuple):
    """One training record, normalised from whatever format it came in.

    Attributes:
        index: row in the mixture (0-based).
        id: the record's ``id`` field, or its row number as a string when it has none.
        turns: the conversation, roles normalised.
        images: image paths as written in the record (``<embedded>`` for images stored inline).
        task: the value of an explicit task field, or None when the record has none.
    """

    index: int
    id: str
    turns: tuple[Turn, ...]
    images: tuple[str, ...]
    task: str | None

    @property
    def first_user_text(self) -> str:
        """The first user turn's text ('' when there is none)."""
        return next((t.text for t in self.turns if t.role == "user"), "")


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
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        bad = rows[(rows < 0) | (rows >= len(self))]
        if len(bad):
            raise IndexError(f"write_subset: row {bad[0]} is outside 0..{len(self) - 1}")
        indices = rows.tolist()
        if self.container == "json" and self.spans is not None:
            with atomic_path(target) as tmp:
                _write_spans(self._rows.source, self._rows.spans, indices, tmp)
        elif self.container == "json":
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
            with atomic_path(target) as tmp, _quiet_datasets():
                self._rows.select(indices).to_parquet(str(tmp))
        else:
            with atomic_path(target, directory=True) as tmp, _quiet_datasets():
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


def _write_spans(source: bytes, spans: np.ndarray, indices: Sequence[int], path: Path) -> None:
    """Write the records at ``indices`` as a JSON list, each copied from ``source`` byte for
    byte (``spans``: ``(N, 2)`` byte offsets of each record in ``source``)."""
    view = memoryview(source)
    chosen = spans[np.asarray(indices, dtype=np.int64).reshape(-1)].tolist()
    with open(path, "wb") as f:
        f.write(b"[\n")
        f.write(b",\n".join(view[start:stop] for start, stop in chosen))
        f.write(b"\n]\n")


def _dump_json(records: list[dict], path: Path, ensure_ascii: bool) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=ensure_ascii, indent=2)
        f.write("\n")


# --------------------------------------------------------------------------------------------
# reading


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
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; expected a mixture (.json, .jsonl, "
                        f".parquet or a datasets folder); fix: check the path and its spelling")
    try:
        return _load(path, task_field)
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read (thousands of levels); "
                        f"expected records of conversations; fix: check the file is a "
                        f"mixture") from None


def _load(path: Path, task_field: str | None) -> Mixture:
    container, rows, dicts = _read_container(path)
    if not len(rows):
        raise DataError(f"{path}: the mixture has no records; expected at least one record")
    records: list[Record] = []
    keys = np.empty(len(rows), dtype=np.uint64)
    schema = ""
    for i, raw in enumerate(dicts):
        schema = schema or _detect_schema(path, raw)
        records.append(_normalize(raw, i, schema, path, task_field))
        keys[i] = _content_key(raw)
    if task_field is not None and all(r.task is None for r in records):
        raise DataError(f"{path}: --task-field {task_field!r} is absent from every record; "
                        f"fix: name a field the records have, or leave it out to infer tasks")
    return Mixture(path, container, schema, rows, records, keys)


def _read_container(path: Path) -> tuple[str, Any, Iterable[dict]]:
    """Return (container, rows as stored, an iterable of the rows as dicts)."""
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            ds = _load_from_disk(path)
            return "hf-disk", ds, _iter_rows(ds)
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise DataError(f"{path}: folder holds neither parquet files nor a datasets "
                            f"save_to_disk copy; fix: point --data at the data file")
        ds = _load_parquet(files)
        return "parquet", ds, _iter_rows(ds)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        ds = _load_parquet([path])
        return "parquet", ds, _iter_rows(ds)
    source, text = _read_text(path)
    if suffix == ".jsonl" or _looks_like_jsonl(suffix, text):
        lines = _jsonl_lines(path, text)
        return "jsonl", lines, (_parse_line(path, n, line) for n, line in lines.numbered)
    spans = record_spans(source)  # before parsing: its scratch arrays are gone by then
    records = JsonRows(_parse_json_list(path, text))
    del text
    records.source = source
    records.spans = spans if spans is not None and len(spans) == len(records) else None
    return "json", records, records


def _looks_like_jsonl(suffix: str, text: str) -> bool:
    """JSON Lines under another name: a ``.json`` file of several objects, or no ``[`` start."""
    if suffix != ".json":
        return not text.lstrip().startswith("[")
    if not text.lstrip().startswith("{"):
        return False
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return e.msg == "Extra data"
    return False


MAGIC = ((b"\xff\xd8\xff", "JPEG image"), (b"\x89PNG", "PNG image"), (b"GIF8", "GIF image"),
         (b"RIFF", "RIFF (WebP image?)"), (b"BM", "BMP image"), (b"PK\x03\x04", "zip archive"),
         (b"\x1f\x8b", "gzip archive"), (b"\x93NUMPY", "numpy .npy"), (b"%PDF", "PDF"))


def _binary_kind(path: Path) -> str | None:
    """What a non-text file is, from its first bytes (None when not recognised)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    return next((kind for magic, kind in MAGIC if head.startswith(magic)), None)


def _read_text(path: Path) -> tuple[bytes, str]:
    """The file's bytes, and its text (UTF-8, a leading byte-order mark dropped)."""
    try:
        source = path.read_bytes()
        return source, source.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        kind = _binary_kind(path)
        if kind:
            raise DataError(f"{path}: a {kind} file, not a mixture; expected a JSON, JSONL or "
                            f"parquet file of records; fix: pass the mixture file (its records "
                            f"name the images)") from None
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); expected a JSON or JSONL "
                        f"file; fix: re-encode it as UTF-8") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); fix: check permissions") from None


def _parse_json_list(path: Path, text: str) -> list[dict]:
    try:
        data = _loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); expected a JSON "
                        f"list of records (or JSON Lines, one record per line); fix the file "
                        f"there") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: top-level JSON is a {type(data).__name__}; expected a list of "
                        f"records; fix: store the records as a JSON list or as JSON Lines")
    for i, raw in enumerate(data):
        if not isinstance(raw, dict):
            raise DataError(f"{path}: record {i} is a {type(raw).__name__}; expected a JSON "
                            f"object per record")
    return data


class JsonRows(list):
    """The records of a JSON list as parsed, with the file's bytes (``source``) and each
    record's ``(N, 2)`` byte span in them (``spans``; None where they could not be found), from
    which :meth:`Mixture.write_subset` copies records verbatim."""

    source: bytes
    spans: np.ndarray | None


class SpanRows(Sequence):
    """A JSON list's records parsed one at a time from their byte spans (``source``,
    ``spans`` as in :class:`JsonRows`): a cached mixture reads no record it does not need."""

    def __init__(self, source: bytes, spans: np.ndarray) -> None:
        self.source, self.spans = source, spans

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, index: int) -> dict:  # type: ignore[override]
        start, stop = self.spans[index]
        return _loads(self.source[start:stop].decode("utf-8"))


BRACKETS = np.zeros(256, dtype=bool)
BRACKETS[list(b"[]{}")] = True


def record_spans(source: bytes) -> np.ndarray | None:
    """``(N, 2)`` int64 byte offsets ``[start, stop)`` of each top-level object of the JSON
    list in ``source``, found without parsing: quotes not escaped by an odd run of backslashes
    delimit strings; outside them, ``{``/``[`` open and ``}``/``]`` close; a record is an object
    opened at depth 1. None when the brackets do not make one list of objects (the caller
    also checks that there are as many spans as parsed records, and otherwise writes subsets
    from the parsed records). Scratch memory: about 2.5 bytes per byte of ``source``."""
    data = np.frombuffer(source, dtype=np.uint8)
    quotes = np.flatnonzero(data == ord('"'))
    after = np.flatnonzero(data[np.maximum(quotes - 1, 0)] == ord("\\"))  # rare: check each
    quotes = np.delete(quotes, np.array([i for i in after if _escaped(data, int(quotes[i]))],
                                        dtype=np.int64))
    marks = np.flatnonzero(BRACKETS[data])
    marks = marks[np.searchsorted(quotes, marks) % 2 == 0]  # outside strings
    del quotes
    kinds = data[marks]
    opens = (kinds == ord("[")) | (kinds == ord("{"))
    depth = np.cumsum(np.where(opens, 1, -1))  # depth after each mark
    starts = marks[opens & (depth == 2)]
    stops = marks[~opens & (depth == 1)] + 1
    one_list = (len(kinds) >= 2 and kinds[0] == ord("[") and kinds[-1] == ord("]")
                and depth[-1] == 0 and bool((depth[:-1] > 0).all()))
    if (not one_list or len(starts) != len(stops)
            or (kinds[opens & (depth == 2)] != ord("{")).any()):
        return None
    return np.stack([starts, stops], axis=1).astype(np.int64)


def _escaped(data: np.ndarray, q: int) -> bool:
    """Whether the quote at ``q`` follows an odd run of backslashes."""
    run = 0
    while q - run - 1 >= 0 and data[q - run - 1] == ord("\\"):
        run += 1
    return run % 2 == 1


class _Lines(list):
    """The non-blank lines of a JSONL file (as written), with their 1-based line numbers."""

    numbered: list[tuple[int, str]]


def _jsonl_lines(path: Path, text: str) -> _Lines:
    numbered = [(n, line.rstrip("\r")) for n, line in enumerate(text.split("\n"), start=1)
                if line.strip()]
    lines = _Lines(line for _, line in numbered)
    lines.numbered = numbered
    return lines


def _parse_line(path: Path, lineno: int, line: str) -> dict:
    try:
        raw = _loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}:{e.colno}: invalid JSON ({e.msg}); expected one JSON "
                        f"object per line; fix that line") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}:{lineno}: line holds a {type(raw).__name__}; expected a JSON "
                        f"object per line")
    return raw


def _load_parquet(files: list[Path]) -> Any:
    """Parquet files as one in-memory ``datasets.Dataset`` (no cache files written)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.concat_tables([pq.read_table(f) for f in files])
    except Exception as e:  # pyarrow raises many types for a damaged file
        raise DataError(f"{files[0]}: cannot read parquet ({str(e).splitlines()[0]}); "
                        f"fix: check the files are complete parquet files with one schema") \
            from None
    return datasets.Dataset(table) if table.num_rows else []


def _load_from_disk(path: Path) -> Any:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: cannot load datasets folder ({str(e).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if len(splits) != 1:
            raise DataError(f"{path}: a DatasetDict with splits {splits}; expected one split; "
                            f"fix: point --data at {path}/<split>")
        ds = ds[splits[0]]
    return ds


def _undecoded(ds: Any) -> Any:
    """Stop ``datasets`` from decoding image columns: we only need to know images are there."""
    import datasets

    def off(feature: Any) -> Any:
        if isinstance(feature, datasets.Image):
            return datasets.Image(decode=False)
        if isinstance(feature, dict):
            return {k: off(v) for k, v in feature.items()}
        if isinstance(feature, datasets.List):
            return datasets.List(off(feature.feature), length=feature.length)
        return feature

    features = datasets.Features({k: off(v) for k, v in ds.features.items()})
    if features == ds.features:
        return ds
    with _quiet_datasets():
        return ds.cast(features)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No ``datasets`` progress bars on stderr while tive reads or writes."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def _iter_rows(ds: Any) -> Iterator[dict]:
    """Rows of a dataset as dicts, images left undecoded (the dataset itself is not changed)."""
    for batch in _undecoded(ds).iter(batch_size=1000):
        names = list(batch)
        for values in zip(*(batch[n] for n in names)):
            yield dict(zip(names, values))


def _detect_schema(path: Path, first: dict) -> str:
    if "conversations" in first:
        return "llava"
    if "messages" in first:
        return "openai"
    if "instruction" in first and "output" in first:
        return "alpaca"
    raise DataError(f"{path}: record 0 has fields {sorted(first)}; expected `conversations` "
                    f"(LLaVA/ShareGPT), `messages` (OpenAI) or `instruction`+`output` (Alpaca); "
                    f"fix: convert the file to one of these formats")


# --------------------------------------------------------------------------------------------
# normalising one record


def _normalize(raw: dict, index: int, schema: str, path: Path, task_field: str | None) -> Record:
    rid = raw.get("id")
    if isinstance(rid, float) and not math.isfinite(rid) or isinstance(rid, (dict, list, bool)):
        raise DataError(f"{path}: record {index} has id {rid!r}; expected a string or an "
                        f"integer; fix: give the record a proper id, or none")
    rid = str(index) if rid is None else str(rid)
    where = f"{path}: record {index} (id {rid})"
    if schema == "llava":
        turns = _llava_turns(raw, where)
    elif schema == "openai":
        turns = _openai_turns(raw, where)
    else:
        turns = _alpaca_turns(raw, where)
    images = _image_fields(raw, where) + (_openai_images(raw, where) if schema == "openai" else ())
    return Record(index, rid, turns, images, _explicit_task(raw, task_field, where))


def _llava_turns(raw: dict, where: str) -> tuple[Turn, ...]:
    conv = raw.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataError(f"{where}: `conversations` is {_describe(conv)}; expected a non-empty "
                        f"list of {{from, value}} turns; fix or remove the record")
    turns = []
    for j, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: turn {j} is {_describe(turn)}; expected "
                            f"{{\"from\": ..., \"value\": \"text\"}}")
        role = LLAVA_ROLES.get(str(turn.get("from")).lower())
        if role is None:
            raise DataError(f"{where}: turn {j} has unknown role {turn.get('from')!r}; expected "
                            f"one of {sorted(LLAVA_ROLES)}; fix the `from` field")
        turns.append(Turn(role, turn["value"]))
    return tuple(turns)


def _openai_turns(raw: dict, where: str) -> tuple[Turn, ...]:
    msgs = raw.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: `messages` is {_describe(msgs)}; expected a non-empty list "
                        f"of {{role, content}} messages; fix or remove the record")
    turns = []
    for j, msg in enumerate(msgs):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: message {j} is {_describe(msg)}; expected {{role, content}}")
        role = OPENAI_ROLES.get(str(msg.get("role")).lower())
        if role is None:
            raise DataError(f"{where}: message {j} has unknown role {msg.get('role')!r}; "
                            f"expected one of {sorted(OPENAI_ROLES)}")
        content = msg.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = "".join(_part_text(p, where, j) for p in content)
        else:
            raise DataError(f"{where}: message {j} content is {_describe(content)}; expected "
                            f"a string or a list of content parts")
        turns.append(Turn(role, text))
    return tuple(turns)


def _part_text(part: Any, where: str, j: int) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        return str(part.get("text", ""))
    if kind in ("image", "image_url"):
        return "<image>"
    raise DataError(f"{where}: message {j} has content part {_describe(part)}; expected "
                    f"type `text`, `image` or `image_url`")


def _openai_images(raw: dict, where: str) -> tuple[str, ...]:
    found = []
    for msg in raw.get("messages") or []:
        content = msg.get("content") if isinstance(msg, dict) else None
        for part in content if isinstance(content, list) else []:
            if part.get("type") == "image_url":
                url = part.get("image_url")
                found.append(str(url.get("url") if isinstance(url, dict) else url))
            elif part.get("type") == "image" and part.get("image") is not None:
                found.append(_image_ref(part["image"], where, "image part"))
    return tuple(found)


def _alpaca_turns(raw: dict, where: str) -> tuple[Turn, ...]:
    instruction, inp, output = raw.get("instruction"), raw.get("input") or "", raw.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str) or not output.strip():
        raise DataError(f"{where}: `instruction`/`output` are {_describe(instruction)}/"
                        f"{_describe(output)}; expected two strings, output non-empty")
    turns = [Turn("system", raw["system"])] if isinstance(raw.get("system"), str) else []
    user = f"{instruction}\n\n{inp}" if str(inp).strip() else instruction
    return tuple(turns + [Turn("user", user), Turn("assistant", output)])


def _image_fields(raw: dict, where: str) -> tuple[str, ...]:
    found: list[str] = []
    for key in ("image", "images"):
        value = raw.get(key)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        found.extend(_image_ref(v, where, key) for v in values)
    return tuple(found)


def _image_ref(value: Any, where: str = "", field: str = "image") -> str:
    """A path for an image value; ``<embedded>`` for image bytes stored in the dataset.

    Accepts a path string, or a ``datasets`` image (``{"bytes", "path"}``).
    """
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            return EMBEDDED
        if value.get("path"):
            return str(value["path"])
    raise DataError(f"{where}: `{field}` holds {_describe(value)}; expected an image path (or "
                    f"a list of them)")


def _explicit_task(raw: dict, task_field: str | None, where: str) -> str | None:
    names = (task_field,) if task_field else TASK_FIELDS
    for name in names:
        value = raw.get(name)
        if value is None or value == "":
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise DataError(f"{where}: task field `{name}` is {_describe(value)}; expected a "
                            f"task name (string)")
        return str(value)
    return None


def _describe(value: Any) -> str:
    if value is None:
        return "missing"
    if isinstance(value, (list, dict, str)) and not value:
        return f"an empty {type(value).__name__}"
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _content_key(raw: dict) -> int:
    """64-bit digest of a record's content (independent of its position in the file).

    The digest is of the record's canonical JSON (sorted keys, no spaces, UTF-8). orjson writes
    it ten times faster than ``json``; records orjson cannot write (lone surrogates, integers
    beyond 64 bits) go through ``json``.
    """
    try:
        data = orjson.dumps(raw, option=orjson.OPT_SORT_KEYS, default=_bytes_digest)
    except (TypeError, orjson.JSONEncodeError):
        text = json.dumps(raw, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                          default=_bytes_digest)
        data = text.encode("utf-8", "surrogatepass")  # JSON may escape lone surrogates
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _loads(text: str) -> Any:
    """``json.loads`` through orjson when it can (faster); errors and edge cases via ``json``."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)  # the standard message and position, or lone surrogates


def _bytes_digest(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return hashlib.blake2b(value, digest_size=16).hexdigest()
    return str(value)


def _default_image_root(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _image_exists(ref: str, root: Path) -> bool:
    if ref == EMBEDDED or ref.startswith("data:"):
        return True
    if ref.startswith(("http://", "https://")):
        return False
    p = Path(ref)
    return (p if p.is_absolute() else root / p).is_file()
