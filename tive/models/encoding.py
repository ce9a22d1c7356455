"""Encoding: a record becomes model inputs with labels, in its family's training format.

Each family's encoder (in its module of :mod:`tive.models`) builds the sequence from the
segments of :mod:`tive.models.segments`: the assistant answers and their end-of-turn token are
supervised; system, instruction, image and padding tokens never are (docs/design.md,
"Model families"). This module is the front door: :func:`make_encoder` asks the family,
:func:`encode_row` loads a record's images and encodes it, :func:`collate` pads a batch.

Common rules: a system turn of the record replaces the default system prompt; assistant turns
before the first user turn are dropped (as LLaVA's preprocessing does); with images but no
``<image>`` placeholder, the images go before the first user turn's text; truncation keeps the
beginning. Records that cannot be encoded come back as :class:`Skipped` with a
:class:`~tive.models.skips.SkipReason`.
"""

from __future__ import annotations

from typing import Any

import PIL.Image
import torch

from tive.data.schemas import EMBEDDED
from tive.errors import ConfigError
from tive.models import registry
from tive.models.segments import IGNORE, Encoded, Encoder, Skipped, UnusableImage
from tive.models.skips import SkipReason


def make_encoder(family: str, tokenizer: Any, *, image_processor: Any = None,
                 image_tokens: int | None = None, max_length: int = 2048,
                 **family_options: Any) -> Encoder:
    """The encoder of a model family.

    Args:
        family: a name in :data:`tive.models.registry.FAMILIES`.
        tokenizer: the model's tokenizer (a transformers fast tokenizer).
        image_processor: llava: a transformers image processor (CLIP); bunny: a transformers
            processor or a callable ``images -> (images, 3, H, W)`` tensor; qwen2-vl: a
            ``Qwen2VLImageProcessor``. Not used by causal-lm.
        image_tokens: llava/bunny: tokens per image (576 for LLaVA-1.5 at 336 px, 729 for
            Bunny at 384 px). Qwen2-VL's count comes from each image's patch grid.
        max_length: longest sequence; longer ones keep their beginning.
        **family_options: ``image_token_id`` (default: the tokenizer's ``<image>``, or
            ``<|image_pad|>`` for qwen2-vl) and ``system`` (default system prompt).

    Raises:
        ConfigError: unknown family or option, or a missing setting the family needs.
    """
    return registry.family(family).make_encoder(tokenizer, image_processor=image_processor,
                                            image_tokens=image_tokens, max_length=max_length,
                                            **family_options)


def load_images(mixture: Any, row: int, image_root: Any = None) -> list[PIL.Image.Image]:
    """Record ``row``'s images as RGB PIL images (relative paths resolve against
    ``image_root``, default: the data file's folder).

    Raises:
        FileNotFoundError: an image is missing.
        UnusableImage: an image cannot be read or decoded, or the record embeds its image
            instead of naming a file.
    """
    from pathlib import Path

    root = mixture.image_root(image_root)
    images = []
    for ref in mixture[row].images:
        if ref == EMBEDDED:
            raise UnusableImage(f"{mixture.path}: record {row} embeds its image; warm-up and "
                                f"scoring read image files; fix: export the images to files")
        path = Path(ref) if Path(ref).is_absolute() else root / ref
        try:
            with PIL.Image.open(path) as img:
                images.append(img.convert("RGB"))
        except FileNotFoundError:
            raise
        except Exception as e:  # PIL on a user's file: unreadable, truncated, oversized, ...
            raise UnusableImage(f"{path}: {type(e).__name__}: {e}") from e
    return images


def encode_row(encoder: Encoder, mixture: Any, row: int,
               image_root: Any = None) -> Encoded | SkipReason:
    """Record ``row`` of ``mixture`` encoded with its images, or the reason it cannot be:
    ``missing-image`` (file absent), ``error`` (an image that cannot be read or processed, is
    embedded in the data instead of a file, or text no tokenizer takes: a lone surrogate), or
    an encoder reason. Any other exception is a bug, and raises."""
    record = mixture[row]
    if not _encodable(record):
        return SkipReason.ERROR
    try:
        images = load_images(mixture, row, image_root)
    except FileNotFoundError:
        return SkipReason.MISSING_IMAGE
    except UnusableImage:
        return SkipReason.ERROR
    try:
        item = encoder.encode(record, images)
    except UnusableImage:  # the image processor refusing an image (e.g. a 1×1 pixel image)
        return SkipReason.ERROR
    return SkipReason(item.reason) if isinstance(item, Skipped) else item


def _encodable(record: Any) -> bool:
    """False when a turn holds text that is not valid Unicode (a lone surrogate, which JSON
    can hold and no tokenizer takes)."""
    try:
        for turn in record.turns:
            turn.text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def pad_id(tokenizer: Any) -> int:
    """The id written at padding positions: the pad token, else end-of-sequence."""
    pad = tokenizer.pad_token_id
    return tokenizer.eos_token_id if pad is None else pad


def collate(items: list[Encoded], pad_id: int,
            padding_side: str = "right") -> dict[str, torch.Tensor | None]:
    """Pad encoded records into one batch.

    Args:
        items: encoded records (text-only and image records may mix).
        pad_id: id written at padding positions of ``input_ids``.
        padding_side: ``right`` or ``left``.

    Returns:
        ``input_ids``, ``attention_mask`` (0 at pads), ``labels`` (-100 at pads), all
        ``(batch, longest)``; ``mm_token_type_ids`` ``(batch, longest)`` when the family has
        them; ``pixel_values`` concatenated along dim 0 (None without images); each ``extras``
        key concatenated along dim 0.
    """
    if not items:
        raise ValueError("collate: no items to batch")
    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side={padding_side!r}; expected 'left' or 'right'")
    width = max(len(item.input_ids) for item in items)
    shape = (len(items), width)
    batch: dict[str, torch.Tensor | None] = {
        "input_ids": torch.full(shape, pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(shape, dtype=torch.long),
        "labels": torch.full(shape, IGNORE, dtype=torch.long)}
    with_types = any(item.mm_token_type_ids is not None for item in items)
    if with_types:
        batch["mm_token_type_ids"] = torch.zeros(shape, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        batch["input_ids"][row, cols] = torch.tensor(item.input_ids, dtype=torch.long)
        batch["attention_mask"][row, cols] = 1
        batch["labels"][row, cols] = torch.tensor(item.labels, dtype=torch.long)
        if with_types and item.mm_token_type_ids is not None:
            batch["mm_token_type_ids"][row, cols] = torch.tensor(item.mm_token_type_ids)
    pixels = [item.pixel_values for item in items if item.pixel_values is not None]
    batch["pixel_values"] = torch.cat(pixels) if pixels else None
    keys = dict.fromkeys(key for item in items for key in item.extras)
    for key in keys:
        batch[key] = torch.cat([item.extras[key] for item in items if key in item.extras])
    return batch
