"""Load a resolved model with its tokenizer and image preprocessing, ready to encode records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from tive.errors import ConfigError, TiveError
from tive.models.registry import ModelSource

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model and what encoding its inputs needs.

    Attributes:
        model: the transformers model, in eval mode.
        tokenizer: its tokenizer.
        image_processor: images → pixel values (``None`` for text-only models).
        family: ``llava``, ``bunny``, ``qwen2-vl`` or ``causal-lm``.
        image_tokens: tokens per image for llava/bunny (Qwen2-VL's depend on the image).
        source: where it came from.
    """

    model: Any
    tokenizer: Any
    image_processor: Callable | None
    family: str
    image_tokens: int | None
    source: ModelSource

    def encoder(self, max_length: int = 2048) -> Any:
        """The record encoder of this model's family (:func:`tive.encode.make_encoder`)."""
        from tive.encode import make_encoder

        return make_encoder(self.family, self.tokenizer, image_processor=self.image_processor,
                            image_tokens=self.image_tokens, max_length=max_length)


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU; ``cuda`` without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA "
                          f"device; fix: --device cpu, or install a CUDA build of torch")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"--device {device!r}: expected auto, cpu or cuda[:N]")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that supports it, else fp32."""
    if dtype == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(source: ModelSource, dtype: str = "auto", device: str = "auto") -> LoadedModel:
    """Load ``source`` in eval mode on ``device``."""
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    loader = {"llava": _llava, "bunny": _bunny, "qwen2-vl": _qwen2_vl,
              "causal-lm": _causal_lm}[source.family]
    try:
        loaded = loader(source, dt)
    except TiveError:
        raise
    except Exception as e:  # transformers, safetensors, gguf: many types for a damaged folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"{source.path}: cannot load the {source.family} model "
                          f"({type(e).__name__}: {first}); fix: check the folder is a complete, "
                          f"matching model") from None
    loaded.model.to(dev).eval()
    return loaded


def _llava(source: ModelSource, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(source.path, dtype=dtype)
    processor = AutoImageProcessor.from_pretrained(source.path)
    vision = model.config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2
    if model.config.vision_feature_select_strategy == "full" and "clip" in vision.model_type:
        tokens += 1  # CLIP's class token is kept
    return LoadedModel(model, AutoTokenizer.from_pretrained(source.path),
                       pad_to_square(processor), "llava", tokens, source)


def _bunny(source: ModelSource, dtype: torch.dtype) -> LoadedModel:
    from tive.models import bunny

    model, tokenizer = bunny.load_bunny(source.path, dtype=dtype)
    vision = model.config.vision_config
    settings = bunny.image_settings(source.path, vision.image_size)
    return LoadedModel(model, tokenizer,
                       lambda images: bunny.bunny_pixel_values(images, settings),
                       "bunny", (vision.image_size // vision.patch_size) ** 2, source)


def _qwen2_vl(source: ModelSource, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(source.path, dtype=dtype)
    return LoadedModel(model, AutoTokenizer.from_pretrained(source.path),
                       AutoImageProcessor.from_pretrained(source.path), "qwen2-vl", None, source)


def _causal_lm(source: ModelSource, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    return LoadedModel(model, tokenizer, None, "causal-lm", None, source)


def pad_to_square(processor: Any) -> Callable:
    """LLaVA-1.5's ``image_aspect_ratio=pad``: pad to square with the mean colour, then process.

    Returns:
        images → ``(n, 3, H, W)`` pixel values.
    """
    from tive.models.bunny import expand2square

    colour = tuple(int(x * 255) for x in processor.image_mean)

    def process(images: list) -> torch.Tensor:
        squared = [expand2square(img.convert("RGB"), colour) for img in images]
        return processor(squared, return_tensors="pt").pixel_values

    return process
