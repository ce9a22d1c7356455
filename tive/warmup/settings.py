"""Warm-up settings, apart from :mod:`tive.warmup.training` so that the CLI can build its options
(and print ``--help``) without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from tive.errors import ConfigError
from tive.settings import flag, named, setting

# The TIVE authors' warm-up (their finetune_lora.sh: 16 records per device × 8 GPUs, bf16).
# tive's defaults equal these; --paper refuses any other value of them.
AUTHORS = {"fraction": 0.08, "r": 128, "alpha": 256, "dropout": 0.05, "lr": 2e-5,
           "projector_lr": 2e-5, "epochs": 1, "global_batch": 128, "targets": (),
           "train_projector": None, "bf16": True, "group_by_modality": True}
_SHOWN = {"show_default": True}  # --help shows these defaults as they are


@dataclass(frozen=True)
class WarmupConfig:
    """Warm-up settings; the defaults are the TIVE authors' recipe (see :data:`AUTHORS`). Each
    field carries its ``--help`` (the CLI builds its options from them).

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
            of a step is the token mean over all its records. None: the authors' 128 where it
            gives at least 100 steps, else smaller (:func:`tive.warmup.plan.chosen_batch`).
        group_by_modality: each optimizer step all-image or all-text (LLaVA's
            ``group_by_modality_length``, as the authors trained).
        batch_size: records per forward/backward on one device (memory only: the step is the
            same, up to float rounding and dropout draws, for any value).
        bf16: train under bfloat16 autocast.
        max_length: tokens per record at most (longer records are truncated).
        targets: LoRA on these linear layers of the language model (empty: every one).
        paper: the authors' run exactly: any setting of :data:`AUTHORS` at another value is
            refused (the global batch is their 128 on any sample), and training runs under
            bfloat16 autocast as theirs did.
        gradient_checkpointing: recompute activations in the backward pass (memory only; the
            authors trained with it; not part of the reference's identity).
    """

    fraction: float = field(default=0.08, metadata=setting(
        "Share of the mixture in the warm-up sample (equal count per task).", **_SHOWN, type=float))
    seed: int = field(default=0, metadata=setting(
        "Seed of the sample and of training.", **_SHOWN, type=int))
    r: int = field(default=128, metadata=setting(
        "LoRA rank.", flag="--lora-r", **_SHOWN, type=int))
    alpha: int = field(default=256, metadata=setting(
        "LoRA alpha.", flag="--lora-alpha", **_SHOWN, type=int))
    dropout: float = field(default=0.05, metadata=setting(
        "LoRA dropout.", flag="--lora-dropout", **_SHOWN, type=float))
    lr: float = field(default=2e-5, metadata=setting(
        "Learning rate of the LoRA matrices (AdamW, weight decay 0, cosine schedule after a 3% "
        "linear warm-up).", **_SHOWN, type=float))
    projector_lr: float = field(default=2e-5, metadata=setting(
        "Learning rate of the multimodal projector.", **_SHOWN, type=float))
    train_projector: bool | None = field(default=None, metadata=setting(
        "Train the multimodal projector too  [default: yes for LLaVA and Bunny, no for "
        "Qwen2-VL's merger]", negatable=True))
    epochs: int = field(default=1, metadata=setting(
        "Passes over the sample.", **_SHOWN, type=int))
    global_batch: int | None = field(default=None, metadata=setting(
        "Records per optimizer step, however many processes share it.", "the authors' 128 where "
        "that gives at least 100 steps, else the largest batch that does, down to 8", type=int))
    group_by_modality: bool = field(default=True, metadata=setting(
        "Each optimizer step all-image or all-text, as the authors' (LLaVA's "
        "group_by_modality_length).", **_SHOWN, negatable=True))
    batch_size: int = field(default=4, metadata=setting(
        "Records per forward/backward on one device (memory only; reached by gradient "
        "accumulation).", **_SHOWN, type=int))
    bf16: bool = field(default=False, metadata=setting(
        "Train under bfloat16 autocast.", **_SHOWN, is_flag=True))
    max_length: int = field(default=2048, metadata=setting(
        "Tokens per record at most (longer records are truncated).", **_SHOWN, type=int))
    targets: tuple[str, ...] = field(default=(), metadata=setting(
        "LoRA on these linear layers of the language model, comma-separated (e.g. "
        "q_proj,v_proj); default: every linear layer (the authors').", flag="--lora-targets",
        option_default="", metavar="NAMES", split=","))
    paper: bool = field(default=False, metadata=setting(
        "The TIVE authors' run exactly: refuses warm-up settings other than theirs (their global "
        "batch of 128 on any mixture, said how much it trains) and trains under bfloat16 "
        "autocast.", is_flag=True))
    gradient_checkpointing: bool = field(default=False, metadata=setting(
        "Recompute activations in the backward pass: less memory, one more forward pass per "
        "layer.", **_SHOWN, is_flag=True))
    checkpoints: int = field(default=1, metadata=setting(
        "Keep the adapter at N evenly spaced optimizer steps (the last is the reference); "
        "scoring then keeps one feature block per checkpoint, weighted by its learning rate "
        "(LESS).", **_SHOWN, type=int))

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"{named('fraction', self.fraction)}: expected a fraction in (0, 1]")
        if self.paper and self.global_batch is None:
            object.__setattr__(self, "global_batch", AUTHORS["global_batch"])
        for name in ("epochs", "global_batch", "batch_size", "max_length", "checkpoints"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{named(name, getattr(self, name))}: expected ≥ 1")
        for name in ("lr", "projector_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{named(name, getattr(self, name))}: expected a positive "
                                  f"learning rate")
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.paper:
            for name, value in AUTHORS.items():
                if name != "bf16" and getattr(self, name) != value:
                    option = flag(name, {f.name: f.metadata for f in fields(self)}[name])
                    raise ConfigError(f"{named(name, getattr(self, name), option=option)}: "
                                      f"{named('paper')} "
                                      f"trains with the authors' value "
                                      f"({value if value != () else 'every linear layer'}); "
                                      f"fix: leave it out, or leave out {named('paper')}")
            if self.checkpoints != 1:
                raise ConfigError(f"{named('checkpoints', self.checkpoints)}: {named('paper')} "
                                  f"keeps the authors' one reference (checkpoints are LESS's); "
                                  f"fix: leave it out, or leave out {named('paper')}")
            object.__setattr__(self, "bf16", True)
