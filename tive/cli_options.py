"""Command-line options built from a settings dataclass's fields (:func:`tive.settings.setting`),
the one way every command (select, warmup, score) gets its settings' options."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import MISSING, fields
from enum import Enum
from typing import Any

import click


def settings_options(cls: type, *, prefix: str = "", dest: str = "",
                     skip: Collection[str] = (),
                     only: Collection[str] | None = None) -> Callable[[Callable], Callable]:
    """A decorator adding one option per field of ``cls`` (in field order) that has one.

    Args:
        prefix: put in front of each generated flag name (``warmup-``: ``--warmup-seed``);
            fixed flags (``--lora-r``) keep theirs.
        dest: put in front of each parameter name (``warmup_``), to tell apart two commands'
            settings of the same name.
        skip: fields left out; ``only``: the fields to take (None: all).
    """
    def decorate(f: Callable) -> Callable:
        for fd in reversed(fields(cls)):
            meta = fd.metadata
            if not meta.get("cli") or fd.name in skip or (only is not None
                                                           and fd.name not in only):
                continue
            f = click.option(*_names(fd.name, meta, prefix, dest), **_kwargs(fd))(f)
        return f

    return decorate


def _names(name: str, meta: Any, prefix: str, dest: str) -> tuple[str, str]:
    option = meta.get("option", {})
    flag = meta.get("flag") or f"--{prefix}{name.replace('_', '-')}"
    if option.get("negatable"):
        flag = f"{flag}/--no-{flag[2:]}"
    return flag, f"{dest}{name}"


def _kwargs(fd: Any) -> dict[str, Any]:
    option = dict(fd.metadata.get("option", {}))
    option.pop("negatable", None)
    kwargs: dict[str, Any] = {}
    if fd.default is not MISSING:
        kwargs["default"] = fd.default.value if isinstance(fd.default, Enum) else fd.default
        if isinstance(fd.default, Enum):
            kwargs["type"] = click.Choice([m.value for m in type(fd.default)])
    if "option_default" in option:
        kwargs["default"] = option.pop("option_default")
    choices = option.pop("choices", None)
    if choices is not None:
        kwargs["type"] = click.Choice([m.value for m in choices] if isinstance(choices, type)
                                      else list(choices))
    if "min" in option:
        kwargs["type"] = click.IntRange(min=option.pop("min"))
        option.pop("type", None)
    separator = option.pop("split", None)
    if separator is not None:
        kwargs["callback"] = lambda ctx, p, v: tuple(x for x in v.split(separator) if x)
    return {**kwargs, **option, "help": fd.metadata["help"]}


def option_flag(cls: type, name: str, *, prefix: str = "") -> str:
    """The flag :func:`settings_options` gives field ``name`` of ``cls`` (first form)."""
    meta = next(fd.metadata for fd in fields(cls) if fd.name == name)
    return (meta.get("flag") or f"--{prefix}{name.replace('_', '-')}").split("/")[0]
