"""Schemas: one record of any schema as a :class:`Record`: its conversation, images, explicit
task and content key (a new schema: docs/design.md, "Adding things").

Schemas: ``llava`` (``conversations`` of ``{from, value}``, optional ``image``/``images``),
``openai`` (``messages`` of ``{role, content}``, content a string or parts), ``alpaca``
(``instruction``, ``input``, ``output``). Malformed records raise a one-line
:class:`~tive.errors.DataError` naming the file, the record and what was expected.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from tive.errors import DataError

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


def detect_schema(path: Path, first: dict) -> str:
    """The schema of a mixture, from its first record's fields."""
    if "conversations" in first:
        return "llava"
    if "messages" in first:
        return "openai"
    if "instruction" in first and "output" in first:
        return "alpaca"
    raise DataError(f"{path}: record 0 has fields {sorted(first)}; expected `conversations` "
                    f"(LLaVA/ShareGPT), `messages` (OpenAI) or `instruction`+`output` (Alpaca); "
                    f"fix: convert the file to one of these formats")


def normalize(raw: dict, index: int, schema: str, path: Path, task_field: str | None) -> Record:
    """The :class:`Record` of row ``index`` (a dict in ``schema``) of the file at ``path``."""
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
    turns = []
    for j, turn in enumerate(_nonempty(raw, "conversations", "{from, value} turns", where)):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: turn {j} is {_describe(turn)}; expected "
                            f"{{\"from\": ..., \"value\": \"text\"}}")
        role = _role(LLAVA_ROLES, turn.get("from"), f"{where}: turn {j}", "from")
        turns.append(Turn(role, turn["value"]))
    return tuple(turns)


def _nonempty(raw: dict, field: str, items: str, where: str) -> list:
    """The record's ``field``: a non-empty list (of ``items``, for the message)."""
    value = raw.get(field)
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: `{field}` is {_describe(value)}; expected a non-empty list "
                        f"of {items}; fix or remove the record")
    return value


def _role(roles: dict[str, str], value: Any, where: str, field: str) -> str:
    """The normalised role for ``value`` in ``roles`` (``where``: the turn, for the message)."""
    role = roles.get(str(value).lower())
    if role is None:
        raise DataError(f"{where} has unknown role {value!r}; expected one of {sorted(roles)}; "
                        f"fix the `{field}` field")
    return role


def _openai_turns(raw: dict, where: str) -> tuple[Turn, ...]:
    turns = []
    for j, msg in enumerate(_nonempty(raw, "messages", "{role, content} messages", where)):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: message {j} is {_describe(msg)}; expected {{role, content}}")
        role = _role(OPENAI_ROLES, msg.get("role"), f"{where}: message {j}", "role")
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
                found.append(image_ref(part["image"], where, "image part"))
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
        found.extend(image_ref(v, where, key) for v in values)
    return tuple(found)


def image_ref(value: Any, where: str = "", field: str = "image") -> str:
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


def content_key(raw: dict) -> int:
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


def _bytes_digest(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return hashlib.blake2b(value, digest_size=16).hexdigest()
    return str(value)
