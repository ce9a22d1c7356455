"""The Qwen2-VL family (chatml): ``<|im_start|>user\\n<|vision_start|><|image_pad|>×n
<|vision_end|>Q<|im_end|>\\n<|im_start|>assistant\\nA<|im_end|>\\n``, ``n`` from the image's
patch grid. Its model derives the position ids itself (multimodal RoPE)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tive.models.family import Family, Parts
from tive.models.segments import (
    Encoded,
    Skipped,
    TokenSequence,
    dialog,
    image_problem,
    pixel_values,
    place_images,
    require_image_processor,
    skip,
    token_id,
)

if TYPE_CHECKING:
    import PIL.Image

    from tive.data.schemas import Record, Turn
    from tive.models.family import ModelSource


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
        self.pad = image_token_id if image_token_id is not None else token_id(
            tokenizer, "<|image_pad|>", self.family, "image_token_id")
        self.start = token_id(tokenizer, "<|vision_start|>", self.family, "vision_start_token_id")
        self.stop = token_id(tokenizer, "<|vision_end|>", self.family, "vision_end_token_id")

    def encode(self, record: Record, images: list[PIL.Image.Image]) -> Encoded | Skipped:
        problem = image_problem(record, len(images))
        if problem:
            return skip(record, problem)
        pixels, extras, counts = None, {}, []
        if images:
            out = pixel_values(self.image_processor, images)
            pixels, grid = out["pixel_values"], out["image_grid_thw"]  # grid: (images, 3)
            extras = {"image_grid_thw": grid}
            counts = [int(n) // self.merge ** 2 for n in grid.prod(dim=-1)]
        system, turns = dialog(record)
        seq = self._sequence(system, place_images(turns, len(images)), counts)
        reason = seq.truncate(self.max_length)
        if reason:
            return skip(record, reason)
        return Encoded(seq.ids, seq.labels, len(images), pixels, extras, seq.image_mask())

    def _sequence(self, system: str | None, turns: list[Turn],
                  counts: list[int]) -> TokenSequence:
        seq = TokenSequence(self.tokenizer)

        def add_image() -> None:
            seq.add([self.start], supervised=False)
            seq.image(self.pad, counts[len(seq.image_spans)])
            seq.add([self.stop], supervised=False)

        system = self.system if system is None else system
        prompt = f"<|im_start|>system\n{system}<|im_end|>\n"
        for turn in turns:
            if turn.role == "user":
                prompt += f"<|im_start|>user\n{turn.text}<|im_end|>\n"
                continue
            seq.prompt(prompt + "<|im_start|>assistant\n", add_image)
            seq.text(turn.text + "<|im_end|>", supervised=True)
            prompt = "\n"
        seq.prompt(prompt, add_image)
        return seq


def _encoder(tokenizer: Any, image_processor: Any, image_tokens: int | None, max_length: int,
             **options: Any) -> QwenVLEncoder:
    require_image_processor("qwen2-vl", image_processor)
    return QwenVLEncoder(tokenizer, image_processor, max_length, **options)


def _load(source: ModelSource, dtype: Any) -> Parts:
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(source.path, dtype=dtype)
    return Parts(model, AutoTokenizer.from_pretrained(source.path),
                 AutoImageProcessor.from_pretrained(source.path))


FAMILY = Family(
    name="qwen2-vl", load=_load, encoder=_encoder, model_types=("qwen2_vl",),
    options=frozenset({"image_token_id", "system"}),
    aliases={"qwen2-vl-2b": "Qwen/Qwen2-VL-2B-Instruct",
             "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct"},
    own_positions=("qwen2_vl", "qwen2_5_vl"), projector="visual.merger", trains_projector=False)
