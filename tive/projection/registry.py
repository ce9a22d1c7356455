"""The projectors ``tive score`` knows, one :class:`ProjectorSpec` each (docs/design.md,
"Adding things").

A spec names its projector, says which scoring settings apply to it, how it is described in
``--help`` and in a store's identity, and where its class lives (imported only when a run
builds one: ``tive --help`` reads this table without torch). The class itself implements
:class:`tive.projection.base.Projector`.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tive.errors import ConfigError
from tive.projection.base import Projector
from tive.settings import named

# scoring setting → (its key in a store's projector description, its default)
SETTINGS = {"proj_dim": ("dim", 8192), "seed": ("seed", 0), "jl_nnz": ("nnz", 1)}


@dataclass(frozen=True)
class ProjectorSpec:
    """One projector.

    Attributes:
        name: its ``--projector`` value, and ``type`` in a store's identity.
        help: one phrase for ``--help``.
        options: the :class:`~tive.scoring.settings.ScoreConfig` settings it takes (a subset of
            :data:`SETTINGS`); giving another is refused.
        target: ``module:Class`` of the implementation.
        arguments: what its constructor takes after the gradient's block lengths, in order:
            ``k`` (proj_dim), ``seed``, ``nnz`` (jl_nnz), ``device``.
    """

    name: str
    help: str
    options: tuple[str, ...]
    target: str
    arguments: tuple[str, ...] = ()

    def describe(self) -> str:
        """``name: help``, for ``--help`` and error messages."""
        return f"{self.name}: {self.help}"

    def settings(self, config: Any) -> dict[str, Any]:
        """The projector's part of a store's identity known before the gradient's size is:
        ``type`` and each setting that applies (the projector's own ``describe()`` repeats
        them, with what it learns later)."""
        out = {"type": self.name}
        out.update({SETTINGS[o][0]: getattr(config, o) for o in SETTINGS
                    if getattr(config, o) is not None})
        return out

    def build(self, dims: Sequence[int], **values: Any) -> Projector:
        """The projector for gradient blocks of ``dims``, from ``k``, ``seed``, ``nnz`` and
        ``device`` (those it does not take are ignored)."""
        module, name = self.target.split(":")
        cls = getattr(importlib.import_module(module), name)
        return cls(dims, *[values[a] for a in self.arguments])


PROJECTORS: dict[str, ProjectorSpec] = {p.name: p for p in (
    ProjectorSpec("sparse-jl", "seeded sparse Johnson-Lindenstrauss, the same on every device",
                  ("proj_dim", "seed", "jl_nnz"), "tive.projection.projectors:SparseJL",
                  ("k", "seed", "nnz")),
    ProjectorSpec("trak", "TRAK's Rademacher projector, as the TIVE authors used it",
                  ("proj_dim", "seed"), "tive.projection.projectors:TrakProjector", ("k", "seed", "device")),
    ProjectorSpec("none", "the whole gradient (small models only)", (),
                  "tive.projection.projectors:Identity"),
)}
DEFAULT = "sparse-jl"


def projector_named(name: str) -> ProjectorSpec:
    """The spec of ``name``.

    Raises:
        ConfigError: no such projector, with the valid names.
    """
    if name not in PROJECTORS:
        raise ConfigError(f"{named('projector', repr(name))}: expected one of "
                          f"{', '.join(PROJECTORS)}")
    return PROJECTORS[name]
