"""The exceptions tive raises for bad input; the CLI prints them as one line."""

from __future__ import annotations


class TiveError(Exception):
    """Base class: a problem the user can fix. Its message is one line: what, where, expected, fix."""


class DataError(TiveError):
    """A mixture file or record is unreadable or malformed."""


class StoreError(TiveError):
    """A feature store is missing, damaged, or does not match the data or settings."""


class ConfigError(TiveError):
    """An option has an invalid value (budget, task name, strategy, ...)."""


class OutputError(TiveError):
    """An output file or folder cannot be written where asked."""
