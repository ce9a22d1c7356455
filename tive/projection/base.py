"""The contract every projector implements (docs/design.md, "Adding things").

A projector receives a batch's per-sample gradient blocks one at a time, as the backward pass
produces them, and returns ``(B, k)`` features at the end. It is constructed as
``cls(dims, *arguments)`` by its :class:`~tive.projection.registry.ProjectorSpec`, ``dims``
being the length of each block (one per key LoRA matrix). Light on purpose: torch is named for
annotations only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@runtime_checkable
class Projector(Protocol):
    """Receives a batch's gradient blocks and returns its features.

    Attributes:
        dim: ``k``, the number of output features.
    """

    dim: int

    def start(self, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        """Begin a batch of ``batch`` records; blocks arrive in ``dtype`` on ``device``."""

    def add(self, block: int, grads: torch.Tensor) -> None:
        """Add block ``block``'s per-sample gradients, ``(B, d_block)``."""

    def finish(self) -> torch.Tensor:
        """The batch's ``(B, k)`` features."""

    def describe(self) -> dict:
        """Type, dim, seed and options, for the store's ``meta.json``; ``type`` is the
        spec's name."""
