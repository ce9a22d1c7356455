"""Scoring with several warm-up checkpoints (docs/design.md, "Targeted selection"): each
record's features are one block per checkpoint, concatenated.

Block c is the record's projected gradient under checkpoint c at unit length, scaled by
``√w_c`` with ``w_c = η_c / Σ η`` (``η_c`` the checkpoint's mean learning rate, from
``reference.json``). The row is then of unit length, and the dot product of two rows is
``Σ_c w_c cos_c``: the learning-rate-weighted mean of the per-checkpoint cosines, which is how
LESS combines checkpoints. The exact norm kept is ``Σ_c w_c ‖g_c‖``; the loss and token count
are the last checkpoint's (the reference's).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from tive.errors import ConfigError
from tive.scoring.gradients import BatchFeatures, GradientFeatures
from tive.scoring.loop import unit_rows
from tive.scoring.identity import adapter_sha256
from tive.warmup.moments import load_moments


def checkpoints_of(adapter: Path) -> list[dict[str, Any]]:
    """The checkpoints ``reference.json`` lists beside ``adapter`` (``step``, ``lr``, ``path``),
    or ``[]`` for a reference of one checkpoint (or none listed)."""
    info = Path(adapter) / "reference.json"
    if not info.is_file():
        return []
    listed = json.loads(info.read_text(encoding="utf-8")).get("checkpoints") or []
    return listed if len(listed) > 1 else []


def weights(points: list[dict[str, Any]]) -> np.ndarray:
    """``(C,)`` ``w_c = η_c / Σ η``.

    Raises:
        ConfigError: no positive learning rate among them.
    """
    lr = np.array([float(p["lr"]) for p in points])
    if not lr.sum() > 0:
        raise ConfigError("reference.json: every checkpoint's learning rate is 0; fix: a "
                          "warm-up with more steps, or fewer --checkpoints")
    return lr / lr.sum()


def identity_of(adapter: Path, points: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The checkpoints' part of the store identity: each one's adapter digest and weight."""
    if not points:
        return None
    return [{"adapter": adapter_sha256(Path(adapter) / p["path"])[:16], "weight": float(w)}
            for p, w in zip(points, weights(points))]


class CheckpointFeatures:
    """:class:`GradientFeatures`' interface (``gf(batch)``, ``projector.dim``) over several
    checkpoints: the model's LoRA weights are set to each checkpoint's in turn (the last is
    the reference, so the model ends each batch as it was).

    Args:
        gf: the gradient features of the model (its projector gives each block).
        adapter: the reference folder; ``points``: its checkpoints (:func:`checkpoints_of`).
        optimizer_aware: each checkpoint's own AdamW moments precondition its gradients.
    """

    def __init__(self, gf: GradientFeatures, adapter: Path, points: list[dict[str, Any]],
                 optimizer_aware: bool) -> None:
        from safetensors.torch import load_file

        self.gf, self.w = gf, weights(points)
        device = gf._inputs[0].device
        folders = [Path(adapter) / p["path"] for p in points]
        self.states = [load_file(str(f / "adapter_model.safetensors"), device=str(device))
                       for f in folders]
        names = [k.name for k in gf.keys]
        self.moments = [load_moments(f, names, device) if optimizer_aware else None
                        for f in folders]
        self.projector = SimpleNamespace(dim=len(points) * gf.projector.dim)

    def __call__(self, batch: dict[str, Any]) -> BatchFeatures:
        """``(B, C·k)`` features, one weighted unit block per checkpoint."""
        from peft import set_peft_model_state_dict

        blocks, norms, last = [], [], None
        for state, moments, w in zip(self.states, self.moments, self.w):
            set_peft_model_state_dict(self.gf.model, state)
            self.gf._moments = moments
            last = self.gf(batch)
            blocks.append(np.sqrt(w) * unit_rows(last.features))
            norms.append(w * last.norms)
        return BatchFeatures(np.concatenate(blocks, axis=1).astype(np.float32),
                             np.sum(norms, axis=0), last.loss, last.ntokens)
