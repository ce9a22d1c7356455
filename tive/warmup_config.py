"""Warm-up settings, apart from :mod:`tive.warmup` so that the CLI can build its options
(and print ``--help``) without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from tive.errors import ConfigError

# The TIVE authors' warm-up (their finetune_lora.sh: 16 records per device × 8 GPUs, bf16).
# tive's defaults equal these; --paper refuses any other value of them.
AUTHORS = {"fraction": 0.08, "r": 128, "alpha": 256, "dropout": 0.05, "lr": 2e-5,
           "projector_lr": 2e-5, "epochs": 1, "global_batch": 128, "targets": (),
           "train_projector": None, "bf16": True}


@dataclass(frozen=True)
class WarmupConfig:
    """Warm-up settings; the defaults are the TIVE authors' recipe (see :data:`AUTHORS`).

    Attributes:
        fraction: share of the mixture in the sample (equal count per task).
        seed: seed of the sample, the LoRA initialisation and the record order.
        r, alpha, dropout: LoRA rank, alpha and dropout.
        lr: learning rate of the LoRA matrices (AdamW, weight decay 0, cosine after a 3%
            linear warm-up).
        projector_lr: learning rate of the multimodal projector (the authors' mm_projector_lr).
        train_projector: train the multimodal projector too; None: the family's default (yes
            for LLaVA and Bunny, no for Qwen2-VL's merger and for text models, which have none).
        epochs: passes over the sample.
        global_batch: records per optimizer step, whatever the number of processes; the loss
            of a step is the token mean over all its records.
        batch_size: records per forward/backward on one device (memory only: the step is the
            same, up to float rounding and dropout draws, for any value).
        bf16: train under bfloat16 autocast.
        max_length: tokens per record at most (longer records are truncated).
        targets: LoRA on these linear layers of the language model (empty: every one).
        paper: the authors' run exactly: any setting of :data:`AUTHORS` at another value is
            refused, and training runs under bfloat16 autocast as theirs did.
        gradient_checkpointing: recompute activations in the backward pass (memory only; the
            authors trained with it; not part of the reference's identity).
    """

    fraction: float = 0.08
    seed: int = 0
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    lr: float = 2e-5
    projector_lr: float = 2e-5
    train_projector: bool | None = None
    epochs: int = 1
    global_batch: int = 128
    batch_size: int = 4
    bf16: bool = False
    max_length: int = 2048
    targets: tuple[str, ...] = ()
    paper: bool = False
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"--fraction {self.fraction}: expected a fraction in (0, 1]")
        for name in ("epochs", "global_batch", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected ≥ 1")
        for name in ("lr", "projector_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected "
                                  f"a positive learning rate")
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.paper:
            for name, value in AUTHORS.items():
                if name != "bf16" and getattr(self, name) != value:
                    raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: "
                                      f"--paper trains with the authors' value "
                                      f"({value if value != () else 'every linear layer'}); "
                                      f"fix: leave it out, or leave out --paper")
            object.__setattr__(self, "bf16", True)
