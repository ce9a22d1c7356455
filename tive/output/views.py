"""What the output stage reads of a valuation and of a selection, as Protocols (the
:class:`~tive.selection.subset.Selection` reads its report through :class:`Values` too).

:class:`~tive.selection.report.Report` and :class:`~tive.selection.subset.Selection`
(:mod:`tive.selection`, the layer above) have these attributes; the output stage names only
these, so that it imports nothing of the selection stage (docs/design.md, "Packages and the
direction of imports").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np


class Values(Protocol):
    """A mixture's values, as a :class:`~tive.selection.report.Report` holds them."""

    tasks: np.ndarray  # (N,) task name of each record
    task_values: dict[str, float]  # task -> V(t)
    instance_values: np.ndarray  # (N,) v_i, NaN where not valid
    invalid: dict[str, int]  # reason -> records left out
    mixture: Any  # the records (a Mixture), or None
    inferred: np.ndarray | None  # (N,) bool, labels inferred by rules
    source: dict[str, Any]  # where the values came from: store, data, image root

    @property
    def sizes(self) -> dict[str, int]: ...

    @property
    def task_names(self) -> list[str]: ...

    def valid_sizes(self) -> dict[str, int]: ...

    def members(self, task: str) -> np.ndarray: ...

    def count_by_task(self, rows: np.ndarray) -> dict[str, int]: ...

    def value_header(self) -> str: ...

    def target_summary(self) -> dict[str, Any] | None: ...  # per task: alignment, nearest


class Chosen(Protocol):
    """A chosen subset, as a :class:`~tive.selection.subset.Selection` holds it."""

    indices: np.ndarray  # (B,) mixture rows, repeated where oversampled
    config: Any  # the SelectConfig that made it
    budget: int
    notes: list[str]
    report: Values

    def to_dict(self) -> dict[str, Any]: ...

    def by_task(self) -> bool: ...  # the method fills a quota per task

    def uses_values(self) -> bool: ...  # the task values set the quotas
