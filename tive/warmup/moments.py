"""The warm-up's AdamW moments, saved with the reference, and LESS's Adam update direction of a
gradient (docs/design.md, "Targeted selection").

``tive warmup`` saves each LoRA matrix's first and second moments (``exp_avg``,
``exp_avg_sq``) after its last step into ``RUN/reference/optimizer.safetensors``;
``tive score --optimizer-aware`` reads those of the key parameters and scores each record's
Adam direction instead of its plain gradient:

    m' = β₁ m + (1 − β₁) g,   v' = β₂ v + (1 − β₂) g²,   g̃ = m' / √(v' + ε)

elementwise, with LESS's constants β₁ = 0.9, β₂ = 0.999, ε = 1e-8 (``obtain_gradients_with_adam``:
the update Adam would make if the record were the next batch, without bias correction).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from tive.errors import ConfigError

MOMENTS_FILE = "optimizer.safetensors"
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def adam_moments(model: Any, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """``{name.exp_avg, name.exp_avg_sq}`` of every trained LoRA matrix of ``model``, on the
    CPU in float32 (a parameter the optimizer never stepped has zero moments)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and ".lora_" in name:
            state = optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                value = state.get(key)
                out[f"{name}.{key}"] = (torch.zeros(p.shape) if value is None
                                        else value.detach().float().cpu().contiguous())
    return out


def save_moments(folder: Path, moments: dict[str, torch.Tensor]) -> None:
    """Write ``folder/optimizer.safetensors`` (inside the reference's atomic write)."""
    from safetensors.torch import save_file

    save_file(moments, str(Path(folder) / MOMENTS_FILE))


def load_moments(folder: Path, names: list[str],
                 device: Any = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(m, v)`` of each key parameter in ``names`` order, each flattened ``(numel,)`` in the
    order of the per-sample gradient blocks (row-major ``(out, in)``).

    Raises:
        ConfigError: no moments saved with this adapter, or one missing.
    """
    from safetensors.torch import load_file

    path = moments_path(folder)
    saved = load_file(str(path))
    out = []
    for name in names:
        pair = [saved.get(f"{name}.{key}") for key in ("exp_avg", "exp_avg_sq")]
        if pair[0] is None or pair[1] is None:
            raise ConfigError(f"{path}: no moments for {name}; the file does not belong to "
                              f"this adapter; fix: tive warmup ... --force")
        out.append(tuple(t.flatten().to(device) for t in pair))
    return out


def moments_path(folder: Path) -> Path:
    """``folder/optimizer.safetensors``.

    Raises:
        ConfigError: the adapter has no saved moments.
    """
    path = Path(folder) / MOMENTS_FILE
    if not path.is_file():
        raise ConfigError(f"{folder}: no AdamW moments beside this adapter ({MOMENTS_FILE}); "
                          f"--optimizer-aware needs a warm-up trained by this version of tive; "
                          f"fix: tive warmup ... --force, or leave out --optimizer-aware")
    return path


def moments_sha256(folder: Path) -> str:
    """Digest of the saved moments (part of an ``--optimizer-aware`` store's identity)."""
    h = hashlib.sha256()
    with open(moments_path(folder), "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def adam_direction(grads: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(B, d)`` LESS's Adam direction of each row of ``grads`` ``(B, d)`` given the moments
    ``m``, ``v`` ``(d,)``, in ``grads``' dtype."""
    m, v = m.to(grads.dtype), v.to(grads.dtype)
    return (BETA1 * m + (1 - BETA1) * grads) / torch.sqrt(BETA2 * v + (1 - BETA2) * grads ** 2
                                                          + EPS)
