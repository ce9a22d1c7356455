"""Settings of ``tive score``, apart from :mod:`tive.scoring.run` so that the CLI can build its options
(and print ``--help``) without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tive.errors import ConfigError
from tive.projection.registry import DEFAULT, PROJECTORS, SETTINGS, projector_named
from tive.settings import named, setting, settle

FEATURE_DTYPES = ("float16", "float32")
ADAPTER_DTYPES = ("float32", "model")
DEFAULT_BATCH = 8  # records per batch on a CPU (on a GPU: auto)


def _batch_size(value: Any) -> int | str | None:
    """``auto``, a positive integer (also as text), or None (the device's default)."""
    if value is None or value == "auto":
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{named('batch_size', repr(value))}: expected auto or a number of "
                          f"records ≥ 1")
    return value


# The TIVE authors' features (their compute_gradient_features.py: TRAK's projector, seed 0).
AUTHORS = {"projector": "trak", "proj_dim": 8192, "seed": 0, "feature_dtype": "float16"}


@dataclass(frozen=True)
class ScoreConfig:
    """Settings of ``tive score``; each field carries its ``--help`` (the CLI builds its options
    from them), in the order ``--help`` lists them.

    Attributes:
        batch_size: records per forward/backward.
        max_length: tokens per record at most (longer records are truncated, as in training).
        projector: ``sparse-jl`` (default), ``trak`` (the authors') or ``none``.
        proj_dim: ``k``, features per record (default 8192; not for ``none``, whose features
            are the whole gradient).
        seed: the projection's seed (not for ``none``).
        jl_nnz: non-zeros per gradient coordinate of the sparse JL map (default 1; only for
            ``sparse-jl``).
        feature_dtype: storage type of the features.
        padding_side: where batches are padded (results do not depend on it).
        group_by_length: batch records of similar length together, within windows of
            :data:`GROUP_WINDOW` batches (less padding; results do not depend on it).
        paper: the authors' features exactly: TRAK's projector, seed 0, 8192 dims, float16
            (:data:`AUTHORS`); another value of those is refused.
        workers: processes encoding batches ahead of the model (None: from the CPU count on
            a GPU, 0 on a CPU; 0: a thread of this process).
        gradient_checkpointing: recompute each decoder layer's activations in the backward
            pass instead of keeping them (less memory, one more forward pass per layer; the
            same features up to float rounding).
        key_layers: ``last:N``, the key parameters of the last N decoder layers only (the
            backward stops there: faster; beyond the paper, never the default).
        adapter_dtype: ``float32`` (peft's default: LoRA matrices in float32 on a 16-bit
            model) or ``model`` (in the model's weight type, e.g. bfloat16 on a GPU: less
            activation memory; the features differ by that type's rounding, measured in
            benchmarks/README.md). The same on a float32 model.
    """

    batch_size: int | str | None = field(default=None, metadata=setting(
        "Records per forward/backward (results depend on it only by float rounding); auto "
        "halves a batch that does not fit in GPU memory and goes on with the size that fits.",
        "auto on a GPU, 8 on a CPU", metavar="N|auto"))
    workers: int | None = field(default=None, metadata=setting(
        "Processes encoding batches (images, tokens) ahead of the model; 0: in this process.",
        "from the CPU count on a GPU, 0 on a CPU", type=int, min=0))
    gradient_checkpointing: bool = field(default=False, metadata=setting(
        "Recompute activations in the backward pass, in warm-up and scoring: less memory, one "
        "more forward pass per layer, the same features.", is_flag=True))
    key_layers: str | None = field(default=None, metadata=setting(
        "Key parameters of the last N decoder layers only: the backward stops there (faster; "
        "beyond the paper, which uses every layer).", metavar="last:N"))
    adapter_dtype: str = field(default="float32", metadata=setting(
        "Type of the LoRA matrices while scoring: float32, or the model's weight type (on a "
        "16-bit model: less activation memory, features within that type's rounding).",
        show_default=True, choices=ADAPTER_DTYPES))
    max_length: int = field(default=2048, metadata=setting(
        "Tokens per record at most, for warm-up and scoring (longer records are truncated).",
        show_default=True, type=int))
    projector: str | None = field(default=None, metadata=setting(
        "; ".join(p.describe() for p in PROJECTORS.values()) + ".", DEFAULT,
        choices=tuple(PROJECTORS)))
    proj_dim: int | None = field(default=None, metadata=setting(
        "Features per record", str(SETTINGS["proj_dim"][1]), type=int))
    seed: int | None = field(default=None, metadata=setting(
        "Seed of the projection", str(SETTINGS["seed"][1]), type=int))
    jl_nnz: int | None = field(default=None, metadata=setting(
        "Non-zeros per gradient coordinate of the sparse JL map", str(SETTINGS["jl_nnz"][1]),
        type=int))
    feature_dtype: str | None = field(default=None, metadata=setting(
        "Storage type of the features.", "float16", choices=FEATURE_DTYPES))
    group_by_length: bool = field(default=True, metadata=setting(
        "Batch records of similar length together (less padding; the features do not depend "
        "on it beyond float rounding).", negatable=True, show_default=True))
    paper: bool = field(default=False, metadata=setting(
        "The TIVE authors' run exactly: their warm-up recipe, TRAK's projector (seed 0, 8192 "
        "dims, float16 features; its CUDA kernel on a GPU).", is_flag=True))
    optimizer_aware: bool = field(default=False, metadata=setting(
        "Score each record's Adam update direction from the warm-up's saved AdamW moments "
        "(LESS's training gradients) instead of its plain gradient; target records stay plain.",
        is_flag=True))
    padding_side: str = field(default="right", metadata=setting(
        "Where batches are padded (results do not depend on it).", cli=False))

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_size", _batch_size(self.batch_size))
        if self.workers is not None and (isinstance(self.workers, bool) or self.workers < 0):
            raise ConfigError(f"{named('workers', self.workers)}: expected 0 (encode in this "
                              f"process) or a number of worker processes")
        parse_key_layers(self.key_layers)

        if self.paper:
            for name, value in AUTHORS.items():
                if getattr(self, name) not in (None, value):
                    raise ConfigError(f"{named(name, getattr(self, name))}: {named('paper')} "
                                      f"scores with the authors' {value}; fix: leave it out, "
                                      f"or leave out {named('paper')}")
            if self.jl_nnz is not None:
                raise ConfigError(f"{named('jl_nnz')} does not apply to {named('paper')}, which "
                                  f"projects with TRAK's projector; fix: leave it out")
            if self.optimizer_aware:
                raise ConfigError(f"{named('optimizer_aware')} is LESS's, not the authors': "
                                  f"{named('paper')} scores plain gradients; fix: leave one out")
            for name, value in AUTHORS.items():
                object.__setattr__(self, name, value)
        if self.projector is None:
            object.__setattr__(self, "projector", DEFAULT)
        if self.feature_dtype is None:
            object.__setattr__(self, "feature_dtype", "float16")
        applies = projector_named(self.projector).options
        settle(self, {name: default for name, (_, default) in SETTINGS.items()}, applies,
               lambda name: f"{named(name)} does not apply to "
                            f"{named('projector', self.projector)}; fix: leave it out")
        for name in ("max_length", "proj_dim", "jl_nnz"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{named(name, getattr(self, name))}: expected ≥ 1")
        if self.seed is not None and not 0 <= self.seed < 2**31:
            raise ConfigError(f"{named('seed', self.seed)}: expected 0 ≤ seed < 2^31")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise ConfigError(f"{named('feature_dtype', repr(self.feature_dtype))}: expected one "
                              f"of {', '.join(FEATURE_DTYPES)}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ConfigError(f"{named('adapter_dtype', repr(self.adapter_dtype))}: expected "
                              f"one of {', '.join(ADAPTER_DTYPES)}")
        if self.padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side={self.padding_side!r}: expected left or right")


def parse_key_layers(text: str | None) -> int | None:
    """``last:N`` → N (the key parameters of the last N decoder layers only); None → None.

    Raises:
        ConfigError: another form, or N < 1.
    """
    if text is None:
        return None
    head, _, count = str(text).partition(":")
    if head != "last" or not count.isdigit() or int(count) < 1:
        raise ConfigError(f"{named('key_layers', repr(text))}: expected last:N with N ≥ 1 (e.g. "
                          f"last:8), the key parameters of the last N decoder layers")
    return int(count)


def paper_dtypes(dtype: str, device_type: str) -> tuple[str, str, str | None]:
    """The weights' types of ``--paper``: the warm-up's and the scoring's, and a line to say.

    The authors trained their warm-up in bfloat16 (``finetune_lora.sh``: ``--bf16 True``) and
    computed the gradients in float16 (their ``utils.py`` loads the model in float16). On a GPU,
    ``--dtype auto`` (or ``fp16``) is exactly that. On a CPU ``auto`` stays float32 and says why;
    ``--dtype fp16`` insists.

    Args:
        dtype: the ``--dtype`` given (``auto``, ``bf16``, ``fp16``, ``fp32``).
        device_type: ``cuda`` or ``cpu``.

    Raises:
        ConfigError: another type than theirs asked for.
    """
    if dtype == "fp16" or (dtype == "auto" and device_type == "cuda"):
        return "bf16", "fp16", ("--paper: the warm-up in bfloat16 weights and the gradients in "
                                "float16 weights, as the authors' (finetune_lora.sh, utils.py)")
    if dtype == "auto":
        return "auto", "auto", (
            "--paper on a CPU: the weights in float32, not the authors' float16 (bfloat16 for the "
            "warm-up): float16 matrix products are far slower than float32's on a CPU, and "
            "TRAK's CPU projector draws another matrix than their GPU's kernel, so their features "
            "cannot be reproduced here anyway; --dtype fp16 to insist")
    raise ConfigError(f"{named('dtype', dtype)}: {named('paper')} computes the gradients in the "
                      f"authors' float16 (the warm-up in bfloat16); fix: leave out "
                      f"{named('dtype')} or give fp16, or leave out {named('paper')}")
