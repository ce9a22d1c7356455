"""What every command's settings share (docs/design.md, "Settings"): fields that carry their
own help, one rule for which settings apply, and errors that name a setting the way the
caller wrote it.

Each command's settings are a frozen dataclass (:class:`~tive.selection.settings.SelectConfig`,
:class:`~tive.warmup.settings.WarmupConfig`, :class:`~tive.scoring.settings.ScoreConfig`) whose
fields are declared with :func:`setting`; the CLI builds one option per field from that
metadata (:mod:`tive.cli.options`), so a setting's help and default are written once. Light:
no click, numpy or torch here.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Collection, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

from tive.errors import ConfigError

_STYLE: ContextVar[str | None] = ContextVar("tive_setting_names", default=None)


def setting(help: str, default: str | None = None, *, flag: str | None = None,
            cli: bool = True, **option: Any) -> dict[str, Any]:
    """A field's metadata: its help, and how its command-line option looks.

    Args:
        help: one or two sentences for ``--help``.
        default: the default as ``--help`` shows it (``  [default: …]`` is appended), where
            the field's own default (often None: "the method's default") says less.
        flag: the option's name when it is not ``--field-name`` (``--exclude-task``,
            ``--lora-r``); a fixed name takes no prefix.
        cli: False for a setting with no command-line option.
        **option: more of the option: ``type`` (int, float), ``min`` (an integer range),
            ``choices`` (an Enum class or a tuple of names), ``metavar``, ``multiple``,
            ``is_flag``, ``negatable`` (``--x/--no-x``), ``split`` (a separator: the option
            takes one string and the field a tuple), ``show_default``, ``required``, and
            ``option_default`` (the option's default where it differs from the field's).
    """
    text = f"{help}  [default: {default}]" if default is not None else help
    return {"help": text, "default_text": default, "flag": flag, "cli": cli, "option": option}


def flag(name: str, meta: Mapping[str, Any] | None = None) -> str:
    """The command-line flag of setting ``name`` (its first form, for ``--x/--no-x``)."""
    given = (meta or {}).get("flag")
    return given.split("/")[0] if given else f"--{name.replace('_', '-')}"


@contextlib.contextmanager
def python_names() -> Iterator[None]:
    """Inside: errors name settings as Python arguments (``budget=2.0``), unless the command
    line has already claimed the naming (:func:`cli_names`). The notebook API enters this."""
    token = _STYLE.set(_STYLE.get() or "python")
    try:
        yield
    finally:
        _STYLE.reset(token)


@contextlib.contextmanager
def cli_names() -> Iterator[None]:
    """Inside: errors name settings as flags (``--budget 2.0``); the CLI enters this."""
    token = _STYLE.set("cli")
    try:
        yield
    finally:
        _STYLE.reset(token)


def named(name: str, shown: Any = None, *, option: str | None = None) -> str:
    """Setting ``name`` (with the value as ``shown``) the way the caller wrote it:
    ``--budget 2.0`` on the command line (and by default), ``budget=2.0`` from the notebook API.

    Args:
        option: the flag, when it is not ``--name`` with dashes.
    """
    if _STYLE.get() == "python":
        return name if shown is None else f"{name}={shown}"
    text = option or flag(name)
    return text if shown is None else f"{text} {shown}"


def settle(config: Any, defaults: Mapping[str, Any], applies: Collection[str],
           refused: Callable[[str], str]) -> None:
    """The one "which settings apply" rule, for every command: a setting given (not None)
    where it does not apply is refused, never ignored; one not given where it applies takes
    its default; one that does not apply stays None.

    Args:
        config: a frozen settings dataclass, being built (its ``__post_init__``).
        defaults: setting → its default where it applies.
        applies: the settings that apply to this configuration.
        refused: setting → the error message for giving it here.

    Raises:
        ConfigError: ``refused(name)`` for the first setting given that does not apply.
    """
    for name, default in defaults.items():
        given = getattr(config, name)
        if given is not None and name not in applies:
            raise ConfigError(refused(name))
        object.__setattr__(config, name, default if given is None and name in applies else given)


def python_api(function: Callable) -> Callable:
    """Decorate a notebook-API entry point: its errors name settings as Python arguments."""
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with python_names():
            return function(*args, **kwargs)

    return wrapper
