"""The Bunny family (BAAI/Bunny-v1_0-3B: SigLIP + Phi-2), loaded into transformers' native
LLaVA classes by :mod:`tive.models.bunny_port`.

Prompt format (Bunny's ``bunny`` conversation template, ``SeparatorStyle.TWO``)::

    SYSTEM + " " + "USER: <image>\\n" + question + " " + "ASSISTANT: " + answer + "<|endoftext|>"
    + "USER: " + question2 + " " + "ASSISTANT: " + answer2 + "<|endoftext|>" ...

LLaVA's layout (:class:`tive.models.llava.VicunaEncoder`) with Bunny's system prompt,
``<|endoftext|>`` closing each answer, and no BOS (Phi-2 has none). A generation prompt ends
with ``"ASSISTANT:"``; ``<image>`` opens the first user turn only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tive.models.family import Parts, PrefixFamily
from tive.models.llava import VicunaFormat, vicuna_encoder

if TYPE_CHECKING:
    from tive.models.family import ModelSource

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")
ROLES = ("USER", "ASSISTANT")  # (human, gpt); a turn is ROLE + ": " + message + separator
SEP = " "  # after the system prompt and after each user message
SEP2 = "<|endoftext|>"  # after each assistant message (supervised, like the answer)

BUNNY = VicunaFormat(system=SYSTEM, user=ROLES[0], assistant=ROLES[1], sep=SEP, end=SEP2,
                     bos=False)  # Phi-2 has no BOS


def _load(source: ModelSource, dtype: Any) -> Parts:
    from tive.models import images
    from tive.models.bunny_port import load_bunny

    model, tokenizer = load_bunny(source.path, dtype=dtype)
    vision = model.config.vision_config
    settings = images.image_settings(source.path, vision.image_size)
    return Parts(model, tokenizer, lambda batch: images.bunny_pixel_values(batch, settings),
                 (vision.image_size // vision.patch_size) ** 2)


FAMILY = PrefixFamily(
    name="bunny", load=_load, encoder=vicuna_encoder("bunny", BUNNY), model_types=("bunny",),
    options=frozenset({"image_token_id", "system"}), aliases={"bunny-3b": "BAAI/Bunny-v1_0-3B"},
    projector="multi_modal_projector", trains_projector=True, ignores_unplaced_images=True)
