"""The pieces every family's encoder builds a sequence from (docs/design.md, "Model families").

A sequence is grown from *segments*: pieces of text tokenized on their own
(``add_special_tokens=False``), runs of image tokens, and single special ids, each tagged
supervised or not. Labels are the input ids on supervised segments and ``-100`` elsewhere, so
the mask is exact by construction: the assistant answers and their end-of-turn token are
supervised; system, instruction, image and padding tokens never are.

Light on purpose (no torch, numpy or PIL at import): the family modules that build on it are
read by ``tive --help``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from tive.errors import ConfigError, DataError
from tive.models.skips import SkipReason

if TYPE_CHECKING:
    import PIL.Image
    import torch

    from tive.data.schemas import Record, Turn

IGNORE = -100  # label of tokens without loss
IMAGE = "<image>"  # image placeholder in record text


@dataclass
class Encoded:
    """One record as model inputs.

    Attributes:
        input_ids: ``(tokens,)`` token ids.
        labels: ``(tokens,)`` the id where supervised, ``-100`` elsewhere.
        images: number of images the sequence holds.
        pixel_values: the images as the family's vision tower takes them, or None without
            images: ``(images, 3, H, W)`` for llava/bunny, ``(patches, 3·T·P·P)`` for qwen2-vl.
        extras: more per-image model inputs, concatenated along dim 0 by
            :func:`tive.models.encoding.collate` (qwen2-vl: ``image_grid_thw`` ``(images, 3)``).
        mm_token_type_ids: ``(tokens,)`` 1 at image tokens, 0 elsewhere (qwen2-vl only, whose
            multimodal RoPE needs it), else None.
    """

    input_ids: list[int]
    labels: list[int]
    images: int
    pixel_values: torch.Tensor | None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    mm_token_type_ids: list[int] | None = None


class Skipped(NamedTuple):
    """A record that cannot be encoded: its row, id, and why (a :class:`SkipReason`)."""

    index: int
    id: str
    reason: SkipReason


class Encoder(Protocol):
    """Turns a record and its loaded images into :class:`Encoded` (or :class:`Skipped`).

    Attributes:
        tokenizer: the model's tokenizer.
        max_length: longest sequence it makes.
        image_tokens: tokens per image where fixed, else None (Qwen2-VL: from each image).
    """

    tokenizer: Any
    max_length: int

    def encode(self, record: Record, images: list[PIL.Image.Image]) -> Encoded | Skipped: ...


class TokenSequence:
    """Token ids and labels grown segment by segment; remembers where each image's tokens lie."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.image_spans: list[tuple[int, int]] = []  # [start, end) of each image's tokens

    def add(self, ids: Sequence[int], supervised: bool) -> None:
        self.ids.extend(ids)
        self.labels.extend(ids if supervised else [IGNORE] * len(ids))

    def text(self, text: str, supervised: bool) -> None:
        if text:
            self.add(self.tokenizer.encode(text, add_special_tokens=False), supervised)

    def image(self, token_id: int, count: int) -> None:
        start = len(self.ids)
        self.add([token_id] * count, supervised=False)
        self.image_spans.append((start, len(self.ids)))

    def prompt(self, text: str, add_image: Callable[[], None]) -> None:
        """Unsupervised ``text``; each ``<image>`` in it becomes ``add_image()``'s tokens."""
        first, *rest = text.split(IMAGE)
        self.text(first, supervised=False)
        for chunk in rest:
            add_image()
            self.text(chunk, supervised=False)

    def truncate(self, max_length: int) -> SkipReason | None:
        """Keep the first ``max_length`` tokens; a reason to skip, or None when it is usable."""
        if any(end > max_length for _, end in self.image_spans):
            return SkipReason.TOO_LONG_FOR_IMAGE
        del self.ids[max_length:], self.labels[max_length:]
        if all(label == IGNORE for label in self.labels):
            return SkipReason.NO_SUPERVISED_TOKEN
        return None

    def image_mask(self) -> list[int]:
        """``(tokens,)`` 1 at image tokens, 0 elsewhere."""
        mask = [0] * len(self.ids)
        for start, end in self.image_spans:
            mask[start:end] = [1] * (end - start)
        return mask


def skip(record: Record, reason: SkipReason) -> Skipped:
    return Skipped(record.index, record.id, reason)


def dialog(record: Record) -> tuple[str | None, list[Turn]]:
    """The record's system prompt (system turns joined; None without) and its other turns,
    assistant turns before the first user turn dropped."""
    system = [t.text for t in record.turns if t.role == "system"]
    turns = [t for t in record.turns if t.role != "system"]
    while turns and turns[0].role != "user":
        turns.pop(0)
    return ("\n".join(system) if system else None), turns


def image_problem(record: Record, n_images: int) -> SkipReason | None:
    """Why the placeholders do not fit ``n_images`` images, or None when they do."""
    placed = sum(t.text.count(IMAGE) for t in record.turns)
    if placed and any(IMAGE in t.text for t in record.turns if t.role != "user"):
        return SkipReason.IMAGE_OUTSIDE_USER_TURN
    if placed != n_images and placed:
        return SkipReason.IMAGE_COUNT_MISMATCH
    if n_images and not any(t.role == "user" for t in record.turns):
        return SkipReason.IMAGE_COUNT_MISMATCH  # nowhere to put them
    return None


def has_placeholder(record: Record) -> bool:
    """True when some turn of ``record`` holds ``<image>``."""
    return any(IMAGE in t.text for t in record.turns)


def place_images(turns: list[Turn], n_images: int) -> list[Turn]:
    """With images but no placeholder, put them before the first user turn's text."""
    if not n_images or any(IMAGE in t.text for t in turns):
        return turns
    first = next(i for i, t in enumerate(turns) if t.role == "user")
    placed = turns[first]._replace(text=IMAGE * n_images + turns[first].text)
    return turns[:first] + [placed] + turns[first + 1:]


class UnusableImage(DataError):
    """A record's image that cannot be read, decoded or processed (the record is skipped as
    ``error``; :func:`tive.models.encoding.encode_row` catches this and nothing else)."""


def pixel_values(image_processor: Any, images: list[PIL.Image.Image]) -> Any:
    """Run a transformers image processor (``return_tensors="pt"``) or a plain callable.

    Raises:
        UnusableImage: the processor refused the images (e.g. one of 1×1 pixel).
    """
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        if isinstance(image_processor, ImageProcessingMixin):
            return image_processor(images, return_tensors="pt")
        return image_processor(images)
    except Exception as e:  # the processor's own checks on a user's image, of many types
        raise UnusableImage(f"the image processor refused an image ({type(e).__name__}: "
                            f"{e})") from e


def token_id(tokenizer: Any, token: str, family: str, option: str) -> int:
    """The id of ``token`` in the tokenizer's vocabulary (an error naming ``option`` else)."""
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        raise ConfigError(f"{family}: the tokenizer has no {token!r} token; fix: add it to the "
                          f"tokenizer or pass {option}=<id> (the model config's id)")
    return int(vocab[token])


def require_image_processor(family: str, image_processor: Any) -> None:
    if image_processor is None:
        raise ConfigError(f"{family}: no image_processor; fix: pass the model's image processor")
