"""tive: find the high-value part of a visual instruction-tuning mixture (TIVE).

The public names are loaded on first use, so that ``import tive`` (and ``tive --help``) stays
light: numpy and torch are imported only by what needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_WHERE = {
    "value_estimate": "tive.api", "Run": "tive.api", "values_from_arrays": "tive.api",
    "check": "tive.api", "Finding": "tive.health.findings",
    "Budget": "tive.selection.settings", "Method": "tive.selection.settings",
    "SelectConfig": "tive.selection.settings", "Strategy": "tive.selection.settings",
    "Mixture": "tive.data.mixture", "load_mixture": "tive.data.mixture",
    "Record": "tive.data.schemas", "Turn": "tive.data.schemas",
    "ConfigError": "tive.errors", "DataError": "tive.errors", "StoreError": "tive.errors",
    "TiveError": "tive.errors",
    "Report": "tive.selection.report", "Selection": "tive.selection.subset",
    "Store": "tive.store.format",
}

__all__ = sorted([*_WHERE, "__version__"])


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` when it is first asked for (PEP 562)."""
    if name not in _WHERE:
        raise AttributeError(f"module 'tive' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
