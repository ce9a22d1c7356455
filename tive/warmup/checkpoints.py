"""Warm-up checkpoints (LESS scores with several): ``tive warmup --checkpoints N`` keeps the
adapter at N evenly spaced optimizer steps, the last being the reference itself, each with
the mean learning rate of the steps since the previous one (its weight when scoring;
docs/design.md, "Targeted selection").

Layout: ``RUN/reference/`` is the last checkpoint; the others are
``RUN/reference/checkpoints/step-S/`` (``adapter_model.safetensors`` as peft writes it, the
reference's ``adapter_config.json``, and their AdamW moments); ``reference.json`` lists all of
them under ``checkpoints`` (``step``, ``lr``, ``path`` relative to the reference).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tive.errors import ConfigError
from tive.warmup.moments import adam_moments, save_moments

CHECKPOINTS_DIR = "checkpoints"


def checkpoint_steps(n: int, steps: int) -> list[int]:
    """The optimizer steps (1-based) after which the ``n`` checkpoints are taken:
    ``round(c · steps / n)`` for c = 1..n, the last being ``steps``.

    Raises:
        ConfigError: more checkpoints than optimizer steps.
    """
    if n > steps:
        raise ConfigError(f"--checkpoints {n}: the warm-up makes only {steps} optimizer "
                          f"step(s); fix: at most {steps} checkpoints, or a smaller "
                          f"--global-batch")
    return [int(round(c * steps / n)) for c in range(1, n + 1)]


@dataclass
class Keeper:
    """Collects the checkpoints while training: call :meth:`after_step` after every optimizer
    step with the learning rate that step used."""

    at: list[int]
    lrs: list[float] = field(default_factory=list)
    kept: list[dict[str, Any]] = field(default_factory=list)

    def after_step(self, model: Any, optimizer: Any, lr: float) -> None:
        from peft import get_peft_model_state_dict

        self.lrs.append(float(lr))
        step = len(self.lrs)
        if step in self.at[:-1]:
            state = {k: v.detach().clone().cpu().contiguous()
                     for k, v in get_peft_model_state_dict(model).items()}
            self.kept.append({"step": step, "lr": self._mean_lr(step), "state": state,
                              "moments": adam_moments(model, optimizer)})

    def _mean_lr(self, step: int) -> float:
        start = self.kept[-1]["step"] if self.kept else 0
        window = self.lrs[start:step]
        return sum(window) / max(len(window), 1)

    def listing(self) -> list[dict[str, Any]]:
        """``reference.json``'s ``checkpoints``: the kept ones and the last (the reference)."""
        last = len(self.lrs)
        return ([{"step": c["step"], "lr": c["lr"], "path": f"{CHECKPOINTS_DIR}/step-{c['step']}"}
                 for c in self.kept]
                + [{"step": last, "lr": self._mean_lr(last), "path": "."}])


def save_checkpoints(folder: Path, kept: list[dict[str, Any]]) -> None:
    """Write the kept checkpoints under ``folder/checkpoints/`` (``folder``: the reference
    being written, which already holds ``adapter_config.json``)."""
    from safetensors.torch import save_file

    for c in kept:
        out = Path(folder) / CHECKPOINTS_DIR / f"step-{c['step']}"
        out.mkdir(parents=True)
        save_file(c["state"], str(out / "adapter_model.safetensors"))
        shutil.copy(Path(folder) / "adapter_config.json", out / "adapter_config.json")
        save_moments(out, c["moments"])
