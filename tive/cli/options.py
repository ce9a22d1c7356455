"""What the commands share: options built from a settings dataclass's fields
(:func:`tive.settings.setting`, the one way select, warmup and score get their settings'
options), the data and model options, and small helpers."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import MISSING, fields
from enum import Enum
from pathlib import Path
from typing import Any

import click

from tive.models.registry import ALIASES
from tive.util.files import remove_stale_temps

DEFAULT_RUN = "tive-out"


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


def task_option(f: Callable) -> Callable:
    return click.option("--task-field", metavar="NAME",
                        help="Record field naming the task  [default: task, dataset or source; "
                             "else the LLaVA-1.5 665K rules]")(f)


def data_options(f: Callable, missing_help: str = "Leave records whose images are missing out "
                  "(counted in the report) instead of stopping.") -> Callable:
    f = click.option("--skip-missing-images", is_flag=True, help=missing_help)(f)
    f = click.option("--image-root", type=click.Path(file_okay=False, path_type=Path),
                     help="Folder that relative image paths resolve against  [default: the "
                          "data file's folder]")(f)
    return task_option(f)


def removed_temps(folder: Path) -> None:
    """Remove what killed runs left in ``folder`` (temporary names), and say so."""
    removed = remove_stale_temps(folder)
    if removed:
        click.echo(f"removed {len(removed)} temporary file(s) left by killed runs: "
                   f"{', '.join(p.name for p in removed)}")


def reasons(invalid: dict[str, int]) -> str:
    return ", ".join(f"{n:,} {r}" for r, n in invalid.items())


def model_options(f: Callable) -> Callable:
    f = click.option("--device", default="auto", show_default=True,
                     help="auto (CUDA when available), cpu or cuda[:N].")(f)
    f = click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]),
                     default="auto", show_default=True,
                     help="Weights' type (auto: bf16 on a GPU that has it, else fp32).")(f)
    return click.option("--model", "model_spec", required=True, metavar="MODEL",
                        help=f"Alias ({', '.join(ALIASES)}), hub id in the local cache, "
                             f"folder, or .gguf file.")(f)


def mixture_path(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """``--data``'s callback: a path with nothing there is said before anything heavy loads."""
    from tive.data.paths import require_mixture_path

    return value if value is None else require_mixture_path(value)
