"""This process's place in a ``torchrun`` job, and the few collectives tive needs.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) every method is a no-op on rank 0 of 1, so
the same code runs on a laptop and on many GPUs.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable, Iterator

import torch

from tive.errors import ConfigError
from tive.util.files import run_lock


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, device: str) -> Dist:
        """Join the torchrun process group when ``WORLD_SIZE`` > 1 (gloo on CPU, else nccl)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as td

        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not td.is_initialized():
            cuda = device != "cpu" and torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(local)
            # long timeout: ranks wait for each other through long steps (and a slow fold)
            td.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=48))
        return cls(rank, world, local)

    def device(self, device: str) -> str:
        """Under torchrun, ``auto`` (with CUDA) and ``cuda[:N]`` become this rank's own GPU,
        ``cuda:LOCAL_RANK``."""
        if self.world > 1 and torch.cuda.is_available() and (
                device == "auto" or device.startswith("cuda")):
            return f"cuda:{self.local_rank}"
        return device

    def broadcast(self, value: Any) -> Any:
        """``value`` as rank 0 has it, on every rank (others may pass None)."""
        if self.world == 1:
            return value
        import torch.distributed as td

        box = [value if self.rank == 0 else None]
        td.broadcast_object_list(box, src=0)
        return box[0]

    @contextlib.contextmanager
    def exclusive(self, run: str | os.PathLike, command: str) -> Iterator[None]:
        """Hold ``run/.lock`` for the block (:func:`tive.util.files.run_lock`); the ranks of one job
        share rank 0's lock, and all of them stop when it is refused.

        Raises:
            ConfigError: another process holds the run folder.
        """
        with contextlib.ExitStack() as stack:
            refused = None
            if self.rank == 0:
                try:
                    stack.enter_context(run_lock(run, command))
                except ConfigError as e:
                    refused = str(e)
            refused = self.broadcast(refused)
            if refused:
                raise ConfigError(refused)
            yield

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        import torch.distributed as td

        out: list[Any] = [None] * self.world
        td.all_gather_object(out, value)
        return out

    def same(self, value: Any, what: str) -> None:
        """Refuse to go on unless every rank has the same ``value`` (e.g. the size of a step
        each rank worked out on its own); otherwise the ranks would fall out of step.

        Raises:
            RuntimeError: naming ``what`` and each rank's value.
        """
        values = self.gather(value)
        if any(v != values[0] for v in values):
            raise RuntimeError(f"{what}: the processes disagree ({values}, by rank); an image "
                               f"or file read differently on some nodes? fix: make the data "
                               f"the same for every process")

    def sum_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient by its sum over the ranks (a rank that computed
        none contributes zeros), so that every rank takes the same optimizer step."""
        if self.world == 1:
            return
        import torch.distributed as td

        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        for handle in [td.all_reduce(g, async_op=True) for g in grads]:
            handle.wait()
