"""Containers: a mixture's rows as stored, and an iterator of them as dicts (a new container:
docs/design.md, "Adding things").

Containers: ``json`` (a JSON list; its records' byte spans are found too, so that a subset is
copied from the file verbatim), ``jsonl`` (JSON Lines, kept as the exact lines), ``parquet`` (a
file or a folder of them) and ``hf-disk`` (a ``datasets`` ``save_to_disk`` folder). Unreadable
input raises a one-line :class:`~tive.errors.DataError`.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from tive.errors import DataError

CONTAINERS = ("json", "jsonl", "parquet", "hf-disk")


def read_container(path: Path) -> tuple[str, Any, Iterable[dict]]:
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
        lines.digest = source_digest(source)
        return "jsonl", lines, (_parse_line(path, n, line) for n, line in lines.numbered)
    spans = record_spans(source)  # before parsing: its scratch arrays are gone by then
    records = JsonRows(_parse_json_list(path, text))
    del text
    records.path, records.digest = path, source_digest(source)
    records.spans = spans if spans is not None and len(spans) == len(records) else None
    return "json", records, records


def source_digest(source: bytes) -> str:
    """A checksum of a data file's bytes (CRC-32 and length: to notice a changed file, not a
    forged one; 0.03 s per 100 MB)."""
    return f"{zlib.crc32(source):08x}-{len(source)}"


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
    except (ValueError, RecursionError):  # the reader says what is wrong
        return False
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
        data = loads(text)
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
    """The records of a JSON list as parsed, with the file (``path``), the checksum of the
    bytes they were parsed from (``digest``) and each record's ``(N, 2)`` byte span in them
    (``spans``; None where they could not be found). :meth:`source` reads the bytes again for
    :meth:`~tive.data.mixture.Mixture.write_subset` to copy records from, verbatim — only if they are
    still the bytes parsed; the bytes are not held in between (a real mixture is ~1 GB)."""

    path: Path
    digest: str
    spans: np.ndarray | None

    def source(self) -> bytes | None:
        """The file's bytes, or None when it changed (or vanished) since it was parsed."""
        try:
            data = self.path.read_bytes()
        except OSError:
            return None
        return data if source_digest(data) == self.digest else None


class SpanRows(Sequence):
    """A JSON list's records parsed one at a time from their byte spans (``source``,
    ``spans`` as in :class:`JsonRows`): a cached mixture reads no record it does not need."""

    def __init__(self, source: bytes, spans: np.ndarray) -> None:
        self._source, self.spans = source, spans
        self.digest = source_digest(source)

    def source(self) -> bytes:
        """The bytes the records are parsed from (checked against the cache when read)."""
        return self._source

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, index: int) -> dict:  # type: ignore[override]
        start, stop = self.spans[index]
        return loads(self._source[start:stop].decode("utf-8"))


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
    quotes = _unescaped_quotes(data)
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


def _unescaped_quotes(data: np.ndarray) -> np.ndarray:
    """Positions of the quotes in ``data`` that do not follow an odd run of backslashes."""
    quotes = np.flatnonzero(data == ord('"'))
    slashes = np.flatnonzero(data == ord("\\"))
    if not len(slashes):
        return quotes
    runs = slashes[np.r_[True, np.diff(slashes) != 1]]  # where each run of backslashes starts
    after = quotes[(quotes > 0) & (data[np.maximum(quotes - 1, 0)] == ord("\\"))]
    start = runs[np.searchsorted(runs, after - 1, side="right") - 1]  # the run before each
    return np.setdiff1d(quotes, after[(after - start) % 2 == 1], assume_unique=True)


class Lines(list):
    """The non-blank lines of a JSONL file (as written), with their 1-based line numbers."""

    numbered: list[tuple[int, str]]


def _jsonl_lines(path: Path, text: str) -> Lines:
    numbered = [(n, line.rstrip("\r")) for n, line in enumerate(text.split("\n"), start=1)
                if line.strip()]
    lines = Lines(line for _, line in numbered)
    lines.numbered = numbered
    return lines


def _parse_line(path: Path, lineno: int, line: str) -> dict:
    try:
        raw = loads(line)
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
    with quiet_datasets():
        return ds.cast(features)


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
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


def loads(text: str) -> Any:
    """``json.loads`` through orjson when it can (faster); errors and edge cases via ``json``."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)  # the standard message and position, or lone surrogates
