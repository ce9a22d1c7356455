"""Image preprocessing of the families that pad images to squares: LLaVA-1.5's
``image_aspect_ratio=pad`` and Bunny's SigLIP processor (mean-colour padding, resize,
normalise), read from the vision tower's ``preprocessor_config.json`` when there is one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image

from tive.errors import ConfigError, DataError

IMAGE_MEAN = (0.5, 0.5, 0.5)  # SigLIP's defaults (Bunny's SigLipImageProcessor)
IMAGE_STD = (0.5, 0.5, 0.5)
PAD_COLOR = tuple(int(x * 255) for x in IMAGE_MEAN)  # (127, 127, 127): expand2square fill


def tower_folder(name: str | None, folder: Path) -> Path | None:
    """The local folder ``mm_vision_tower`` names (absolute, or relative to the working
    directory as Bunny resolves it, else to the checkpoint ``folder``), or None."""
    if not isinstance(name, str) or not name:
        return None
    for base in (Path.cwd(), folder):
        local = base / Path(name).expanduser()  # an absolute path ignores base
        if (local / "config.json").is_file():
            return local
    return None


def expand2square(img: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Pad ``img`` to a ``max(w, h)`` square filled with ``background``, centred as Bunny does."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), background)
    result.paste(img, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return result


@dataclass(frozen=True)
class ImageSettings:
    """The tower's image preprocessing: SigLIP's defaults, or its ``preprocessor_config.json``.

    Attributes:
        size: square side in pixels.
        mean, std: per-channel normalisation (the mean is also expand2square's fill colour).
        resample: PIL resampling filter (3: bicubic).
    """

    size: int
    mean: tuple[float, ...] = IMAGE_MEAN
    std: tuple[float, ...] = IMAGE_STD
    resample: int = 3

    @property
    def pad_color(self) -> tuple[int, ...]:
        return tuple(int(x * 255) for x in self.mean)


def image_settings(folder: Path, image_size: int) -> ImageSettings:
    """The preprocessing of the tower a Bunny checkpoint names, as Bunny's
    ``SiglipImageProcessor.from_pretrained(mm_vision_tower)`` reads it: the tower folder's
    ``preprocessor_config.json`` when it has one (mean, std, size, resample), else SigLIP's
    defaults at ``image_size``."""
    bunny_config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    tower = tower_folder(bunny_config.get("mm_vision_tower"), Path(folder))
    path = tower / "preprocessor_config.json" if tower is not None else None
    if path is None or not path.is_file():
        return ImageSettings(image_size)
    try:
        pre = json.loads(path.read_text(encoding="utf-8"))
        size = pre.get("size", {})
        side = size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size
        return ImageSettings(int(side or image_size),
                             tuple(float(x) for x in pre.get("image_mean", IMAGE_MEAN)),
                             tuple(float(x) for x in pre.get("image_std", IMAGE_STD)),
                             int(pre.get("resample", 3)))
    except (ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path}: not a readable image processor config ({e}); expected "
                          f"SigLIP's preprocessor_config.json") from None


def bunny_pixel_values(images: list[Image.Image],
                       settings: int | ImageSettings) -> torch.Tensor:
    """Bunny's preprocessing: RGB, pad to square with the mean colour, resize, normalise.

    Args:
        images: PIL images of any mode and size.
        settings: the tower's :class:`ImageSettings`, or its ``image_size`` alone (384 for
            Bunny-v1.0) for SigLIP's defaults (mean = std = 0.5, bicubic).

    Returns:
        ``(n, 3, size, size)`` float32.
    """
    if not images:
        raise DataError("bunny_pixel_values: no images given; expected at least one")
    if isinstance(settings, int):
        settings = ImageSettings(settings)
    squares = [expand2square(img.convert("RGB"), settings.pad_color) for img in images]
    return _image_processor(settings)(images=squares, return_tensors="pt").pixel_values


@lru_cache(maxsize=4)
def _image_processor(settings: ImageSettings):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    return SiglipImageProcessorPil(
        size={"height": settings.size, "width": settings.size}, resample=settings.resample,
        do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(settings.mean), image_std=list(settings.std))
