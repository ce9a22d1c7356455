"""The projectors: random projections of per-sample gradients, each following
:class:`tive.projection.base.Projector` (docs/design.md, "Adding things").

A per-sample gradient is a list of blocks, one per key LoRA matrix. A projector receives the
blocks of a batch one at a time, as the backward pass produces them, and returns ``(B, k)``
features at the end; the full ``(B, D)`` gradient is held only by projectors that need it.

* :class:`SparseJL` (``sparse-jl``, the default): each gradient coordinate goes to ``nnz``
  output coordinates (one per block of ``k / nnz`` rows) with random signs and weight
  ``1/√nnz``, so ``E ‖Pg‖² = ‖g‖²``. Each matrix block has its own seeded map, generated on the
  CPU from ``(seed, block index)``: the same matrix on every machine. A sum of independently
  seeded block maps is itself a sparse JL map of the whole gradient.
* :class:`TrakProjector` (``trak``): TRAK's Rademacher projector on the whole flattened
  gradient, as the TIVE authors used it (seed 0, entries ±1, unscaled): its CUDA kernel
  (``fast_jl``) when it imports and the device is a GPU, else its CPU projector, which
  regenerates a ``D × block`` matrix on every call (slow for large ``D``).
* :class:`Identity` (``none``): the exact gradient itself (``k = D``), for small models and tests.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch

from tive.errors import ConfigError
from tive.projection.base import Projector
from tive.projection.registry import projector_named
from tive.util.hashing import splitmix64

TRAK_BLOCK = 128  # the TIVE authors' TRAK settings
TRAK_MAX_BATCH = 16
SLOW_CPU_TRAK = 10**9  # D·k above which TRAK's CPU projector takes minutes per batch


class SparseJL:
    """Seeded sparse Johnson–Lindenstrauss map, applied block by block with ``index_add_``.

    Args:
        dims: length of each gradient block (``d_1 … d_M``).
        k: output dimension; a multiple of ``nnz``.
        seed: the map's seed.
        nnz: non-zeros per input coordinate (1: CountSketch; more: lower variance on
            gradients dominated by a few coordinates).
    """

    kind = "sparse-jl"

    def __init__(self, dims: Sequence[int], k: int = 8192, seed: int = 0, nnz: int = 1) -> None:
        if not 0 <= seed < 2**31:
            raise ConfigError(f"--seed {seed}: expected 0 ≤ seed < 2^31")
        if k < 1 or nnz < 1 or k % nnz:
            raise ConfigError(f"--proj-dim {k} with --jl-nnz {nnz}: expected k ≥ 1 and a "
                              f"multiple of nnz")
        self.dims = [int(d) for d in dims]
        self.dim, self.seed, self.nnz = int(k), int(seed), int(nnz)
        self._maps: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._out: torch.Tensor | None = None

    def block_map(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``(nnz, d_block)`` int64 and signs ``(nnz, d_block)`` ±1 of block ``block``."""
        gen = torch.Generator(device="cpu")
        seed = splitmix64(np.array([(self.seed << 20) ^ block], dtype=np.uint64))[0]
        gen.manual_seed(int(seed & np.uint64(0x7FFFFFFFFFFFFFFF)))
        width = self.dim // self.nnz
        d = self.dims[block]
        rows = torch.randint(0, width, (self.nnz, d), generator=gen, dtype=torch.int64)
        rows += torch.arange(self.nnz, dtype=torch.int64)[:, None] * width
        signs = torch.randint(0, 2, (self.nnz, d), generator=gen, dtype=torch.int64) * 2 - 1
        return rows.numpy(), signs.numpy()

    def matrix(self) -> np.ndarray:
        """The dense ``(k, D)`` float64 matrix (small ``D`` only: for tests)."""
        out = np.zeros((self.dim, sum(self.dims)))
        offset = 0
        for b, d in enumerate(self.dims):
            rows, signs = self.block_map(b)
            for j in range(self.nnz):
                np.add.at(out, (rows[j], offset + np.arange(d)), signs[j] / math.sqrt(self.nnz))
            offset += d
        return out

    def start(self, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        self._out = torch.zeros(batch, self.dim, device=device, dtype=dtype)

    def add(self, block: int, grads: torch.Tensor) -> None:
        rows, signs = self._device_map(block, grads.device, grads.dtype)
        for j in range(self.nnz):
            self._out.index_add_(1, rows[j], grads * signs[j])

    def finish(self) -> torch.Tensor:
        out, self._out = self._out, None
        return out

    def describe(self) -> dict:
        return {"type": self.kind, "dim": self.dim, "seed": self.seed, "nnz": self.nnz}

    def _device_map(self, block: int, device: torch.device,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (block, f"{device}/{dtype}")
        if key not in self._maps:
            rows, signs = self.block_map(block)
            scale = 1.0 / math.sqrt(self.nnz)
            # int64: CPU index_add_ with int32 indices is ~20× slower
            self._maps[key] = (torch.from_numpy(rows).to(device=device, dtype=torch.int64),
                               torch.from_numpy(signs * scale).to(device=device, dtype=dtype))
        return self._maps[key]


class _Concatenating:
    """Base of projectors that need the whole ``(B, D)`` gradient: blocks are copied into it."""

    def __init__(self, dims: Sequence[int]) -> None:
        self.dims = [int(d) for d in dims]
        self.offsets = np.concatenate([[0], np.cumsum(self.dims)]).astype(int).tolist()
        self._full: torch.Tensor | None = None

    def start(self, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        self._full = torch.zeros(batch, self.offsets[-1], device=device, dtype=dtype)

    def add(self, block: int, grads: torch.Tensor) -> None:
        self._full[:, self.offsets[block]:self.offsets[block + 1]] = grads


class Identity(_Concatenating):
    """No projection: the features are the exact concatenated gradient (``k = D``)."""

    kind = "none"

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__(dims)
        self.dim = self.offsets[-1]

    def finish(self) -> torch.Tensor:
        out, self._full = self._full, None
        return out

    def describe(self) -> dict:
        return {"type": self.kind, "dim": self.dim}


class TrakProjector(_Concatenating):
    """TRAK's Rademacher projector on the flattened gradient, as the TIVE authors ran it.

    Args:
        dims: block lengths; the gradient is their concatenation in key-parameter order (the
            authors' ``named_parameters`` order).
        k: output dimension (authors: 8192).
        seed: TRAK's seed (authors: 0).
        device: where to project; TRAK's CUDA kernel is used when ``fast_jl`` imports and the
            device is a GPU.
    """

    kind = "trak"

    def __init__(self, dims: Sequence[int], k: int = 8192, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        super().__init__(dims)
        self.dim, self.seed = int(k), int(seed)
        self.device = torch.device(device)
        self.kernel = "cuda" if self.device.type == "cuda" and _fast_jl() else "cpu"
        self._projector = None

    def finish(self) -> torch.Tensor:
        full, self._full = self._full, None
        projector = self._trak(torch.float64 if full.dtype == torch.float64 else torch.float32)
        if self.kernel == "cuda":  # fast_jl takes at most max_batch_size rows at a time
            parts = [projector.project(full[i:i + TRAK_MAX_BATCH].float().contiguous(), 0)
                     for i in range(0, len(full), TRAK_MAX_BATCH)]
            return torch.cat(parts).to(full.dtype)
        return projector.project(full.to(projector.dtype), 0).to(full.dtype)

    def describe(self) -> dict:
        """Type, dim, seed, and where the matrix is drawn: TRAK's CPU projector draws it on
        the model's device (CPU and CUDA generators differ), its CUDA kernel depends on the
        GPU's number of SMs."""
        out = {"type": self.kind, "dim": self.dim, "seed": self.seed, "kernel": self.kernel,
               "device": self.device.type, "proj_type": "rademacher", "block_size": TRAK_BLOCK}
        if self.device.type == "cuda":
            out["sms"] = torch.cuda.get_device_properties(self.device).multi_processor_count
        return out

    def _trak(self, dtype: torch.dtype):
        if self._projector is None or (self.kernel == "cpu" and self._projector.dtype != dtype):
            from trak.projectors import BasicProjector, CudaProjector, ProjectionType

            grad_dim = self.offsets[-1]
            if self.kernel == "cuda":
                self._projector = CudaProjector(grad_dim, self.dim, self.seed,
                                                ProjectionType.rademacher, self.device,
                                                max_batch_size=TRAK_MAX_BATCH)
            else:
                if grad_dim * self.dim > SLOW_CPU_TRAK:
                    warnings.warn(f"TRAK's CPU projector regenerates a {grad_dim:,} × "
                                  f"{TRAK_BLOCK} random matrix {math.ceil(self.dim / TRAK_BLOCK)}"
                                  f" times per batch; expect minutes per batch. The default "
                                  f"--projector sparse-jl is orders of magnitude faster",
                                  stacklevel=2)
                self._projector = BasicProjector(grad_dim, self.dim, self.seed,
                                                 ProjectionType.rademacher, self.device,
                                                 block_size=TRAK_BLOCK, dtype=dtype)
        return self._projector


def make_projector(kind: str, dims: Sequence[int], k: int = 8192, seed: int = 0,
                   nnz: int = 1, device: torch.device | str = "cpu") -> Projector:
    """The projector named ``kind`` (a name in :data:`tive.projection.registry.PROJECTORS`) for
    gradient blocks of ``dims``."""
    return projector_named(kind).build(dims, k=k, seed=seed, nnz=nnz, device=device)


def project_rows(projector: Projector, rows: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """``(n, k)`` features of whole gradient vectors ``rows`` ``(n, Σ dims)``, split into the
    blocks of ``dims`` and added block by block, as the gradient hooks do."""
    projector.start(len(rows), rows.device, rows.dtype)
    offset = 0
    for block, dim in enumerate(dims):
        projector.add(block, rows[:, offset:offset + dim])
        offset += dim
    return projector.finish()


FAST_JL_INSTALL = ("TORCH_CUDA_ARCH_LIST=<your GPU's compute capability, e.g. 9.0 for "
                   "H100/H200, 8.0 for A100> pip install --no-build-isolation fast_jl")


def require_cuda_kernel(device: torch.device) -> None:
    """Refuse to stand in for the authors' projection on a GPU without TRAK's CUDA kernel (its
    CPU projector draws another matrix).

    Raises:
        ConfigError: with the install command.
    """
    if device.type == "cuda" and not _fast_jl():
        raise ConfigError(f"--paper on a GPU projects with TRAK's CUDA kernel (fast_jl), as the "
                          f"authors did, and fast_jl does not import here; fix: "
                          f"{FAST_JL_INSTALL} (its setup.py asks for 7.0+PTX, which CUDA 13 "
                          f"no longer builds), then check with `tive doctor`")


def _fast_jl() -> bool:
    try:
        import fast_jl  # noqa: F401
    except Exception:  # a CUDA extension can fail to import in many ways
        return False
    return True
