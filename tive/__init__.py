"""tive: find the high-value part of a visual instruction-tuning mixture (TIVE)."""

__version__ = "0.1.0"

from tive.api import value_estimate  # noqa: E402
from tive.config import Budget, Method, SelectConfig, Strategy  # noqa: E402
from tive.data import Mixture, Record, Turn, load_mixture  # noqa: E402
from tive.errors import ConfigError, DataError, StoreError, TiveError  # noqa: E402
from tive.report import Report, Selection  # noqa: E402
from tive.store import Store  # noqa: E402

__all__ = [
    "Budget", "ConfigError", "DataError", "Method", "Mixture", "Record", "Report", "SelectConfig",
    "Selection", "Store", "Strategy", "StoreError", "TiveError", "Turn", "__version__",
    "load_mixture", "value_estimate",
]
