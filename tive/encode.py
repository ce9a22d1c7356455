"""Stage 2 — encode: a record becomes model inputs with labels, in its family's training format.

Every sequence is built from *segments*: pieces of text tokenized on their own
(``add_special_tokens=False``), runs of image tokens, and single special ids, each tagged
supervised or not. Labels are the input ids on supervised segments and ``-100`` elsewhere, so
the mask is exact by construction: the assistant answers and their end-of-turn token are
supervised; system, instruction, image and padding tokens never are (DESIGN.md, method item 4).

Families (the formats their authors trained with):

* ``llava`` — LLaVA-1.5 (``vicuna_v1``): ``<s>SYSTEM USER: <image>\\nQ ASSISTANT: A</s>USER: …``
  with ``<image>`` moved to the start of its turn and expanded to ``image_tokens`` ids.
* ``bunny`` — Bunny (Phi-2): the same layout, Bunny's system prompt, ``<|endoftext|>`` closing
  each answer, no BOS.
* ``qwen2-vl`` — chatml: ``<|im_start|>user\\n<|vision_start|><|image_pad|>×n<|vision_end|>Q
  <|im_end|>\\n<|im_start|>assistant\\nA<|im_end|>\\n``, ``n`` from the image's patch grid.
* ``causal-lm`` — a text model's own chat template, applied incrementally (the tokens that
  each assistant turn adds to the rendering are its supervised tokens).

Common rules: a system turn of the record replaces the default system prompt; assistant turns
before the first user turn are dropped (as LLaVA's preprocessing does); with images but no
``<image>`` placeholder, the images go before the first user turn's text; truncation keeps the
beginning. Records that cannot be encoded come back as :class:`Skipped` with a reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import PIL.Image
import torch

from tive.data import Record, Turn
from tive.errors import ConfigError
from tive.models import bunny

IGNORE = -100  # label of tokens without loss
IMAGE = "<image>"  # image placeholder in record text
FAMILIES = ("llava", "bunny", "qwen2-vl", "causal-lm")

# reasons a record is skipped
NO_SUPERVISED_TOKEN = "no-supervised-token"
IMAGE_COUNT_MISMATCH = "image-count-mismatch"
IMAGE_OUTSIDE_USER_TURN = "image-outside-user-turn"
TOO_LONG_FOR_IMAGE = "too-long-for-image"
IMAGE_IN_TEXT_MODEL = "image-in-text-model"


@dataclass
class Encoded:
    """One record as model inputs.

    Attributes:
        input_ids: ``(tokens,)`` token ids.
        labels: ``(tokens,)`` the id where supervised, ``-100`` elsewhere.
        images: number of images the sequence holds.
        pixel_values: the images as the family's vision tower takes them, or None without
            images: ``(images, 3, H, W)`` for llava/bunny, ``(patches, 3·T·P·P)`` for qwen2-vl.
        extras: more per-image model inputs, concatenated along dim 0 by :func:`collate`
            (qwen2-vl: ``image_grid_thw`` ``(images, 3)``).
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
    """A record that cannot be encoded: its row, id, and one of the reasons above."""

    index: int
    id: str
    reason: str


class Encoder(Protocol):
    """Turns a record and its loaded images into :class:`Encoded` (or :class:`Skipped`)."""

    def encode(self, record: Record, images: list[PIL.Image.Image]) -> Encoded | Skipped: ...


# --------------------------------------------------------------------------------------------
# building a sequence


class _Sequence:
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

    def truncate(self, max_length: int) -> str | None:
        """Keep the first ``max_length`` tokens; a reason to skip, or None when it is usable."""
        if any(end > max_length for _, end in self.image_spans):
            return TOO_LONG_FOR_IMAGE
        del self.ids[max_length:], self.labels[max_length:]
        if all(label == IGNORE for label in self.labels):
            return NO_SUPERVISED_TOKEN
        return None

    def image_mask(self) -> list[int]:
        """``(tokens,)`` 1 at image tokens, 0 elsewhere."""
        mask = [0] * len(self.ids)
        for start, end in self.image_spans:
            mask[start:end] = [1] * (end - start)
        return mask


def _skip(record: Record, reason: str) -> Skipped:
    return Skipped(record.index, record.id, reason)


def _dialog(record: Record) -> tuple[str | None, list[Turn]]:
    """The record's system prompt (system turns joined; None without) and its other turns,
    assistant turns before the first user turn dropped."""
    system = [t.text for t in record.turns if t.role == "system"]
    dialog = [t for t in record.turns if t.role != "system"]
    while dialog and dialog[0].role != "user":
        dialog.pop(0)
    return ("\n".join(system) if system else None), dialog


def _image_problem(record: Record, n_images: int) -> str | None:
    """Why the placeholders do not fit ``n_images`` images, or None when they do."""
    placed = sum(t.text.count(IMAGE) for t in record.turns)
    if placed and any(IMAGE in t.text for t in record.turns if t.role != "user"):
        return IMAGE_OUTSIDE_USER_TURN
    if placed != n_images and placed:
        return IMAGE_COUNT_MISMATCH
    if n_images and not any(t.role == "user" for t in record.turns):
        return IMAGE_COUNT_MISMATCH  # nowhere to put them
    return None


def has_placeholder(record: Record) -> bool:
    """True when some turn of ``record`` holds ``<image>``."""
    return any(IMAGE in t.text for t in record.turns)


def _place_images(dialog: list[Turn], n_images: int) -> list[Turn]:
    """With images but no placeholder, put them before the first user turn's text."""
    if not n_images or any(IMAGE in t.text for t in dialog):
        return dialog
    first = next(i for i, t in enumerate(dialog) if t.role == "user")
    placed = dialog[first]._replace(text=IMAGE * n_images + dialog[first].text)
    return dialog[:first] + [placed] + dialog[first + 1:]


def _pixel_values(image_processor: Any, images: list[PIL.Image.Image]) -> Any:
    """Run a transformers image processor (``return_tensors="pt"``) or a plain callable."""
    from transformers.image_processing_base import ImageProcessingMixin

    if isinstance(image_processor, ImageProcessingMixin):
        return image_processor(images, return_tensors="pt")
    return image_processor(images)


def _tensor(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output["pixel_values"]


def _token_id(tokenizer: Any, token: str, family: str, option: str) -> int:
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        raise ConfigError(f"{family}: the tokenizer has no {token!r} token; fix: add it to the "
                          f"tokenizer or pass {option}=<id> (the model config's id)")
    return int(vocab[token])


# --------------------------------------------------------------------------------------------
# families


@dataclass(frozen=True)
class VicunaFormat:
    """LLaVA's ``SeparatorStyle.TWO`` conversation: ``SYSTEM USER: Q ASSISTANT: A<end>``.

    Attributes:
        system: default system prompt.
        user, assistant: role names.
        sep: after the system prompt and after each user turn.
        end: closes each answer (supervised); None means the tokenizer's EOS.
        bos: start with the tokenizer's BOS (when it has one).
    """

    system: str
    user: str = "USER"
    assistant: str = "ASSISTANT"
    sep: str = " "
    end: str | None = None
    bos: bool = True


LLAVA = VicunaFormat(
    system="A chat between a curious human and an artificial intelligence assistant. The "
           "assistant gives helpful, detailed, and polite answers to the human's questions.")
BUNNY = VicunaFormat(system=bunny.SYSTEM, user=bunny.ROLES[0], assistant=bunny.ROLES[1],
                     sep=bunny.SEP, end=bunny.SEP2, bos=False)  # Phi-2 has no BOS


class VicunaEncoder:
    """LLaVA-1.5 and Bunny: ``image_tokens`` copies of ``image_token_id`` per image.

    Each ``<image>`` is moved to the start of its turn followed by a newline (LLaVA's
    ``preprocess_multimodal``). An answer is supervised with its leading space, as the
    tokenizer splits ``ASSISTANT: answer`` into ``ASSISTANT``, ``:``, `` answer``.
    """

    def __init__(self, family: str, fmt: VicunaFormat, tokenizer: Any, image_processor: Any,
                 image_tokens: int, image_token_id: int, max_length: int,
                 system: str | None = None) -> None:
        self.family, self.fmt, self.tokenizer = family, fmt, tokenizer
        self.image_processor, self.image_tokens = image_processor, image_tokens
        self.image_token_id, self.max_length = image_token_id, max_length
        self.system = fmt.system if system is None else system
        self.end = fmt.end if fmt.end is not None else tokenizer.eos_token
        if self.end is None:
            raise ConfigError(f"{family}: the tokenizer has no EOS token to end answers with; "
                              f"fix: set tokenizer.eos_token")

    def encode(self, record: Record, images: list[PIL.Image.Image]) -> Encoded | Skipped:
        if not has_placeholder(record):
            images = []  # LLaVA's and Bunny's trainers load such an image and never use it
        problem = _image_problem(record, len(images))
        if problem:
            return _skip(record, problem)
        system, dialog = _dialog(record)
        seq = self._sequence(system, dialog)
        reason = seq.truncate(self.max_length)
        if reason:
            return _skip(record, reason)
        pixels = _tensor(_pixel_values(self.image_processor, images)) if images else None
        return Encoded(seq.ids, seq.labels, len(images), pixels)

    def _sequence(self, system: str | None, dialog: list[Turn]) -> _Sequence:
        fmt, seq = self.fmt, _Sequence(self.tokenizer)
        if fmt.bos and self.tokenizer.bos_token_id is not None:
            seq.add([self.tokenizer.bos_token_id], supervised=False)

        def add_image() -> None:
            seq.image(self.image_token_id, self.image_tokens)

        prompt = (self.system if system is None else system) + fmt.sep
        for turn in dialog:
            if turn.role == "user":
                prompt += f"{fmt.user}: {_images_first(turn.text)}{fmt.sep}"
                continue
            seq.prompt(prompt + f"{fmt.assistant}:", add_image)
            seq.text(" " + turn.text, supervised=True)
            seq.text(self.end, supervised=True)
            prompt = ""
        seq.prompt(prompt, add_image)
        return seq


def _images_first(text: str) -> str:
    """LLaVA's placement: the turn's placeholders removed, then ``<image>\\n`` each in front."""
    count = text.count(IMAGE)
    if not count:
        return text
    return (IMAGE + "\n") * count + text.replace(IMAGE, "").strip()


class QwenVLEncoder:
    """Qwen2-VL (chatml): each ``<image>`` becomes ``<|vision_start|><|image_pad|>×n
    <|vision_end|>`` in place, ``n = t·h·w / merge_size²`` from the processor's
    ``image_grid_thw``. Answers and ``<|im_end|>`` are supervised; the ``\\n`` after is not."""

    family = "qwen2-vl"

    def __init__(self, tokenizer: Any, image_processor: Any, max_length: int,
                 system: str = "You are a helpful assistant.",
                 image_token_id: int | None = None) -> None:
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.max_length, self.system = max_length, system
        self.merge = int(getattr(image_processor, "merge_size", 2))
        self.pad = image_token_id if image_token_id is not None else _token_id(
            tokenizer, "<|image_pad|>", self.family, "image_token_id")
        self.start = _token_id(tokenizer, "<|vision_start|>", self.family, "vision_start_token_id")
        self.stop = _token_id(tokenizer, "<|vision_end|>", self.family, "vision_end_token_id")

    def encode(self, record: Record, images: list[PIL.Image.Image]) -> Encoded | Skipped:
        problem = _image_problem(record, len(images))
        if problem:
            return _skip(record, problem)
        pixels, extras, counts = None, {}, []
        if images:
            out = _pixel_values(self.image_processor, images)
            pixels, grid = out["pixel_values"], out["image_grid_thw"]  # grid: (images, 3)
            extras = {"image_grid_thw": grid}
            counts = [int(n) // self.merge ** 2 for n in grid.prod(dim=-1)]
        system, dialog = _dialog(record)
        seq = self._sequence(system, _place_images(dialog, len(images)), counts)
        reason = seq.truncate(self.max_length)
        if reason:
            return _skip(record, reason)
        return Encoded(seq.ids, seq.labels, len(images), pixels, extras, seq.image_mask())

    def _sequence(self, system: str | None, dialog: list[Turn], counts: list[int]) -> _Sequence:
        seq = _Sequence(self.tokenizer)

        def add_image() -> None:
            seq.add([self.start], supervised=False)
            seq.image(self.pad, counts[len(seq.image_spans)])
            seq.add([self.stop], supervised=False)

        system = self.system if system is None else system
        prompt = f"<|im_start|>system\n{system}<|im_end|>\n"
        for turn in dialog:
            if turn.role == "user":
                prompt += f"<|im_start|>user\n{turn.text}<|im_end|>\n"
                continue
            seq.prompt(prompt + "<|im_start|>assistant\n", add_image)
            seq.text(turn.text + "<|im_end|>", supervised=True)
            prompt = "\n"
        seq.prompt(prompt, add_image)
        return seq


class ChatTemplateEncoder:
    """A text model with its own chat template, applied incrementally.

    The supervised tokens of assistant turn k are the tokens of the rendering up to and
    including it, minus those of the rendering before it with the generation prompt. Each
    rendering must extend the previous one token for token, or the template is refused.
    """

    family = "causal-lm"

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("causal-lm: the tokenizer has no chat template; fix: use an "
                              "instruct model's tokenizer or set tokenizer.chat_template")
        self.tokenizer, self.max_length = tokenizer, max_length

    def encode(self, record: Record, images: list[PIL.Image.Image]) -> Encoded | Skipped:
        if images or record.images:
            return _skip(record, IMAGE_IN_TEXT_MODEL)
        system, dialog = _dialog(record)
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": t.role, "content": t.text} for t in dialog]
        seq = _Sequence(self.tokenizer)
        for k, message in enumerate(messages):
            if message["role"] == "assistant":
                self._extend(seq, self._render(messages[:k], True), False, record)
                self._extend(seq, self._render(messages[:k + 1], False), True, record)
        reason = seq.truncate(self.max_length)
        if reason:
            return _skip(record, reason)
        return Encoded(seq.ids, seq.labels, 0, None)

    def _render(self, messages: list[dict], generation_prompt: bool) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _extend(self, seq: _Sequence, ids: list[int], supervised: bool, record: Record) -> None:
        """Append what ``ids`` (a longer rendering) adds to ``seq``."""
        if ids[:len(seq.ids)] != seq.ids:
            raise ConfigError(f"causal-lm: the chat template is not incremental (record "
                              f"{record.id}: a rendering with one more turn changes the tokens "
                              f"before it); fix: use a template whose earlier turns render the "
                              f"same whatever follows")
        seq.add(ids[len(seq.ids):], supervised)


# --------------------------------------------------------------------------------------------
# front door


_OPTIONS = {"llava": {"image_token_id", "system"}, "bunny": {"image_token_id", "system"},
            "qwen2-vl": {"image_token_id", "system"}, "causal-lm": set()}


def make_encoder(family: str, tokenizer: Any, *, image_processor: Any = None,
                 image_tokens: int | None = None, max_length: int = 2048,
                 **family_options: Any) -> Encoder:
    """The encoder of a model family.

    Args:
        family: one of :data:`FAMILIES`.
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
    if family not in _OPTIONS:
        raise ConfigError(f"unknown model family {family!r}; expected one of {list(FAMILIES)}")
    unknown = sorted(set(family_options) - _OPTIONS[family])
    if unknown:
        raise ConfigError(f"{family}: unknown option(s) {unknown}; valid: "
                          f"{sorted(_OPTIONS[family]) or 'none'}")
    if max_length < 1:
        raise ConfigError(f"max_length={max_length}; expected a positive number of tokens")
    if family == "causal-lm":
        return ChatTemplateEncoder(tokenizer, max_length)
    if image_processor is None:
        raise ConfigError(f"{family}: no image_processor; fix: pass the model's image processor")
    if family == "qwen2-vl":
        return QwenVLEncoder(tokenizer, image_processor, max_length, **family_options)
    if image_tokens is None or image_tokens < 1:
        raise ConfigError(f"{family}: image_tokens={image_tokens}; expected the number of tokens "
                          f"per image (576 for LLaVA-1.5 at 336 px, 729 for Bunny at 384 px)")
    token_id = family_options.pop("image_token_id", None)
    if token_id is None:
        token_id = _token_id(tokenizer, IMAGE, family, "image_token_id")
    fmt = LLAVA if family == "llava" else BUNNY
    return VicunaEncoder(family, fmt, tokenizer, image_processor, image_tokens, int(token_id),
                         max_length, **family_options)


def load_images(mixture: Any, row: int, image_root: Any = None) -> list[PIL.Image.Image]:
    """Record ``row``'s images as RGB PIL images (relative paths resolve against
    ``image_root``, default: the data file's folder).

    Raises:
        OSError: an image is missing or unreadable.
        ConfigError: the record embeds its image instead of naming a file.
    """
    from pathlib import Path

    from tive.data import EMBEDDED

    root = mixture.image_root(image_root)
    images = []
    for ref in mixture[row].images:
        if ref == EMBEDDED:
            raise ConfigError(f"{mixture.path}: record {row} embeds its image; warm-up and "
                              f"scoring read image files; fix: export the images to files")
        path = Path(ref) if Path(ref).is_absolute() else root / ref
        with PIL.Image.open(path) as img:
            images.append(img.convert("RGB"))
    return images


def encode_row(encoder: Encoder, mixture: Any, row: int, image_root: Any = None) -> Encoded | str:
    """Record ``row`` of ``mixture`` encoded with its images, or the reason it cannot be:
    ``missing-image`` (file absent), ``error`` (an image that cannot be read or processed, or
    is embedded in the data instead of a file), or an encoder reason."""
    try:
        images = load_images(mixture, row, image_root)
    except FileNotFoundError:
        return "missing-image"
    except Exception:  # unreadable, truncated, oversized or embedded images
        return "error"
    try:
        item = encoder.encode(mixture[row], images)
    except Exception:  # the image processor refusing an image (e.g. a 1×1 pixel image)
        return "error"
    return item.reason if isinstance(item, Skipped) else item


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
