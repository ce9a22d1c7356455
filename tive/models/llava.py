"""The LLaVA-1.5 family (``vicuna_v1``): ``<s>SYSTEM USER: <image>\\nQ ASSISTANT: A</s>USER: …``
with ``<image>`` moved to the start of its turn and expanded to ``image_tokens`` ids.

:class:`VicunaEncoder` also serves Bunny (:mod:`tive.models.bunny`), whose format is the same
layout with other words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from tive.errors import ConfigError
from tive.models.family import Family, Parts
from tive.models.segments import (
    IMAGE,
    Encoded,
    Skipped,
    TokenSequence,
    dialog,
    has_placeholder,
    image_problem,
    pixel_values,
    require_image_processor,
    skip,
    token_id,
)

if TYPE_CHECKING:
    import PIL.Image
    import torch

    from tive.data.schemas import Record, Turn
    from tive.models.family import ModelSource


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
        problem = image_problem(record, len(images))
        if problem:
            return skip(record, problem)
        system, turns = dialog(record)
        seq = self._sequence(system, turns)
        reason = seq.truncate(self.max_length)
        if reason:
            return skip(record, reason)
        pixels = _tensor(pixel_values(self.image_processor, images)) if images else None
        return Encoded(seq.ids, seq.labels, len(images), pixels)

    def _sequence(self, system: str | None, turns: list[Turn]) -> TokenSequence:
        fmt, seq = self.fmt, TokenSequence(self.tokenizer)
        if fmt.bos and self.tokenizer.bos_token_id is not None:
            seq.add([self.tokenizer.bos_token_id], supervised=False)

        def add_image() -> None:
            seq.image(self.image_token_id, self.image_tokens)

        prompt = (self.system if system is None else system) + fmt.sep
        for turn in turns:
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


def _tensor(output: Any) -> torch.Tensor:
    import torch

    return output if isinstance(output, torch.Tensor) else output["pixel_values"]


def vicuna_encoder(family: str, fmt: VicunaFormat) -> Callable[..., VicunaEncoder]:
    """The encoder factory of a family in ``fmt`` (a :attr:`Family.encoder`)."""

    def make(tokenizer: Any, image_processor: Any, image_tokens: int | None, max_length: int,
             image_token_id: int | None = None, system: str | None = None) -> VicunaEncoder:
        require_image_processor(family, image_processor)
        if image_tokens is None or image_tokens < 1:
            raise ConfigError(f"{family}: image_tokens={image_tokens}; expected the number of "
                              f"tokens per image (576 for LLaVA-1.5 at 336 px, 729 for Bunny at "
                              f"384 px)")
        if image_token_id is None:
            image_token_id = token_id(tokenizer, IMAGE, family, "image_token_id")
        return VicunaEncoder(family, fmt, tokenizer, image_processor, image_tokens,
                             int(image_token_id), max_length, system)

    return make


def pad_to_square(processor: Any) -> Callable:
    """LLaVA-1.5's ``image_aspect_ratio=pad``: pad to square with the mean colour, then process.

    Returns:
        images → ``(n, 3, H, W)`` pixel values.
    """
    from tive.models.images import expand2square

    colour = tuple(int(x * 255) for x in processor.image_mean)

    def process(images: list) -> torch.Tensor:
        squared = [expand2square(img.convert("RGB"), colour) for img in images]
        return processor(squared, return_tensors="pt").pixel_values

    return process


def _load(source: ModelSource, dtype: Any) -> Parts:
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(source.path, dtype=dtype)
    processor = AutoImageProcessor.from_pretrained(source.path)
    vision = model.config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2
    if model.config.vision_feature_select_strategy == "full" and "clip" in vision.model_type:
        tokens += 1  # CLIP's class token is kept
    return Parts(model, AutoTokenizer.from_pretrained(source.path), pad_to_square(processor),
                 tokens)


FAMILY = Family(
    name="llava", load=_load, encoder=vicuna_encoder("llava", LLAVA),
    model_types=("llava", "llava_llama"), options=frozenset({"image_token_id", "system"}),
    aliases={"llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
             "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf"},
    projector="multi_modal_projector", trains_projector=True, ignores_unplaced_images=True)
