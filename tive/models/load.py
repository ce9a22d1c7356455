"""Load a resolved model with its tokenizer and image preprocessing, ready to encode records
(the family's loader does the family's part; docs/design.md, "Model families")."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch

from tive.errors import ConfigError, TiveError
from tive.models.family import LoadedModel, ModelSource
from tive.models.registry import family
from tive.settings import named

PEFT_NOISE = "`is_gradient_checkpointing` is deprecated"


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Around peft's wrapping of a loaded model: peft asks transformers a deprecated question
    (a FutureWarning about ``is_gradient_checkpointing``), nothing for a user to do, from the
    CLI or a notebook. Local, so that it holds whatever warning filters the caller set."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_NOISE)
        yield

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU; ``cuda`` without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{named('device', device)}: this torch ({torch.__version__}) sees no "
                          f"CUDA device; fix: --device cpu, or install a CUDA build of torch")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"{named('device', repr(device))}: expected auto, cpu or cuda[:N]")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that supports it, else fp32."""
    if dtype == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"{named('dtype', repr(dtype))}: expected one of auto, "
                          f"{', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(source: ModelSource, dtype: str = "auto", device: str = "auto") -> LoadedModel:
    """Load ``source`` in eval mode on ``device``."""
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    kind = family(source.family)
    try:
        with _quiet_transformers():
            parts = kind.load(source, dt)
    except TiveError:
        raise
    except Exception as e:  # transformers, safetensors, gguf: many types for a damaged folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"{source.path}: cannot load the {source.family} model "
                          f"({type(e).__name__}: {first}); fix: check the folder is a complete, "
                          f"matching model") from None
    parts.model.to(dev).eval()
    return LoadedModel(parts.model, parts.tokenizer, parts.image_processor, kind.name,
                       parts.image_tokens, source, kind)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Without transformers' own "Loading weights" progress bar (tive shows its own)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing of a transformers model's layers (the name of
    the call changed in transformers 5)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})


def disable_checkpointing(model: torch.nn.Module) -> None:
    """Undo :func:`enable_checkpointing` (the name of the call changed in transformers 5)."""
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def text_vocab(config: Any) -> int | None:
    """Columns of the output head that are the model's real vocabulary, when the head has more
    (a Bunny port whose ``<image>`` row was added past the checkpoint's vocabulary: the
    softmax must not see it); None when every column is real."""
    vocab = getattr(config, "bunny_text_vocab_size", None)
    text = getattr(config, "text_config", config)
    return int(vocab) if vocab is not None and vocab < text.vocab_size else None
