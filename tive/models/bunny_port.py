"""Bunny (BAAI/Bunny-v1_0-3B) checkpoints ported into transformers' native LLaVA classes.

Bunny is SigLIP-so400m-patch14-384 + Phi-2 + a 2-layer GELU ``mm_projector``. Its own remote
code does not run on transformers 5, so its weights are renamed into
``LlavaForConditionalGeneration`` with a ``SiglipVisionConfig`` tower and a ``PhiConfig`` text
model: features from vision layer −2, all 729 patches (SigLIP has no CLS token), exact-erf GELU
projector with biases.

Differences from Bunny's own code, all invisible in its outputs:

* **Image token.** Bunny splices a placeholder id (−200) into ``input_ids``; LLaVA needs an
  in-vocabulary id, repeated once per patch. ``<image>`` is added to the tokenizer as a special
  token (id = the tokenizer's old length). When that id is beyond Bunny's vocabulary ``V``
  (``config.json``'s ``vocab_size``) the embedding and ``lm_head`` grow by the missing rows
  (embedding rows: zeros, replaced by image features anyway; ``lm_head`` rows: zeros).
  The model's logits then have extra columns from ``V`` on: **drop them**,
  ``logits[..., :text_vocab_size(model)]``, to get Bunny's distribution (the losses of
  :mod:`tive.scoring.gradients` and :mod:`tive.warmup.training` do). For Phi-2 itself (``V`` = 51200,
  tokenizer length 50295) ``<image>`` takes an unused padding row and nothing grows; the
  slice is then a no-op.
* **Output head bias.** Phi-2's weights hold an ``lm_head.bias``, but Bunny's
  ``BunnyPhiForCausalLM`` builds its head without one, so Bunny never uses it; nor does the
  port (it says so when the checkpoint has one).
* **Image preprocessing** is read from the tower folder's ``preprocessor_config.json`` when
  ``mm_vision_tower`` is a local folder that has one, as Bunny's
  ``SiglipImageProcessor.from_pretrained`` does; SigLIP's defaults (0.5, 0.5, bicubic) else.
* **Truncated towers.** Bunny/Imp-style checkpoints may have deleted the tower's last layer.
  Then the tower gets ``L−1`` layers and features from layer −1, which is numerically the full
  tower's layer −2. The SigLIP pooling ``head`` is dropped (Bunny never uses it).

The prompt format and the family's declaration are in :mod:`tive.models.bunny`; the image
preprocessing in :mod:`tive.models.images`.
"""

from __future__ import annotations

import json
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PhiConfig,
    PreTrainedTokenizerBase,
    SiglipVisionConfig,
)

from tive.errors import ConfigError
from tive.models.images import tower_folder

IMAGE_TOKEN = "<image>"  # placed as "<image>\n" at the start of the first user message
IMAGE_TOKEN_INDEX = -200  # Bunny's own placeholder id; the port uses the tokenizer's <image> id

# --- vision towers known without download: hub id -> SiglipVisionConfig fields ---
SIGLIP_SO400M_384 = "google/siglip-so400m-patch14-384"
KNOWN_VISION_TOWERS = {
    SIGLIP_SO400M_384: {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                        "num_attention_heads": 16, "image_size": 384, "patch_size": 14,
                        "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"},
}

# Bunny config.json keys passed on to PhiConfig when present (absent: PhiConfig's defaults,
# which Bunny's own config class inherits too).
_PHI_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "hidden_act", "layer_norm_eps", "partial_rotary_factor",
             "rope_theta", "max_position_embeddings", "qk_layernorm", "resid_pdrop",
             "embd_pdrop", "attention_dropout", "initializer_range", "bos_token_id",
             "eos_token_id", "pad_token_id")
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")
_TOWER = "model.vision_tower.vision_tower.vision_model."
_RENAMES = (  # (Bunny prefix, transformers-5 LLaVA prefix), first match wins
    (_TOWER, "model.vision_tower."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.final_layernorm.", "model.language_model.final_layernorm."),
)
_STALE_BUFFERS = re.compile(r"(rotary_emb\.inv_freq|position_ids)$")  # old persistent buffers
_EMBED = "model.language_model.embed_tokens.weight"


def is_bunny_checkpoint(folder: Path) -> bool:
    """True when ``folder/config.json`` has a ``model_type`` starting with ``bunny``."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and str(config.get("model_type", "")).startswith("bunny")


def vision_config_from_bunny(bunny_config: dict, folder: Path) -> SiglipVisionConfig:
    """The vision tower's config named by ``mm_vision_tower``; never downloads.

    A local folder with a ``config.json`` (absolute, or relative to the working directory as
    Bunny resolves it, else to the checkpoint ``folder``) is read, whether a full SigLIP config
    or a vision-only one; a hub id in :data:`KNOWN_VISION_TOWERS` uses its known config. The
    pooling head is always off.
    """
    name = bunny_config.get("mm_vision_tower")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{folder}/config.json: no mm_vision_tower; expected a SigLIP hub id "
                          f"or folder, as in Bunny's config")
    local = tower_folder(name, Path(folder))
    if local is not None:
        config = SiglipVisionConfig.from_pretrained(local)
    else:
        if name not in KNOWN_VISION_TOWERS:
            raise ConfigError(f"{folder}/config.json: mm_vision_tower {name!r} is neither a local "
                              f"folder with config.json nor a known hub id "
                              f"({', '.join(KNOWN_VISION_TOWERS)}); fix: put the tower's "
                              f"config.json in a folder and point mm_vision_tower at it")
        config = SiglipVisionConfig(**KNOWN_VISION_TOWERS[name])
    config.vision_use_head = False
    return config


def llava_config_from_bunny(bunny_config: dict, vision_config: SiglipVisionConfig,
                            image_token_id: int, vision_feature_layer: int = -2) -> LlavaConfig:
    """A LLaVA config equivalent to Bunny's ``config.json``.

    Args:
        bunny_config: Bunny's ``config.json`` as a dict.
        vision_config: the tower's config (see :func:`vision_config_from_bunny`).
        image_token_id: the tokenizer's ``<image>`` id; the text vocabulary becomes
            ``max(V, image_token_id + 1)`` with ``V`` = Bunny's ``vocab_size``.
        vision_feature_layer: −2 for a full tower, −1 for one whose last layer was deleted.

    Returns:
        The config, with ``bunny_text_vocab_size`` = ``V`` (see :func:`text_vocab_size`).
    """
    missing = [k for k in _REQUIRED if k not in bunny_config]
    if missing:
        raise ConfigError(f"Bunny config.json lacks {', '.join(missing)}; expected Phi text "
                          f"model keys ({', '.join(_REQUIRED)})")
    model_type = bunny_config.get("model_type", "bunny-phi")
    if model_type != "bunny-phi":
        raise ConfigError(f"Bunny model_type {model_type!r}: only 'bunny-phi' (Phi-2 language "
                          f"model, e.g. BAAI/Bunny-v1_0-3B) is supported")
    projector = bunny_config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ConfigError(f"Bunny mm_projector_type {projector!r}: only 'mlp2x_gelu' is "
                          f"supported (Bunny-v1.0's 2-layer GELU projector)")
    if bunny_config.get("rope_scaling") is not None:
        raise ConfigError(f"Bunny rope_scaling {bunny_config['rope_scaling']!r}: only "
                          f"rope_scaling null (plain RoPE, as in Bunny-v1.0) is supported")
    if bunny_config.get("mm_hidden_size", vision_config.hidden_size) != vision_config.hidden_size:
        raise ConfigError(f"Bunny mm_hidden_size {bunny_config['mm_hidden_size']} differs from "
                          f"the vision tower's hidden_size {vision_config.hidden_size}; fix: "
                          f"point mm_vision_tower at the tower the checkpoint was trained with")
    vocab = int(bunny_config["vocab_size"])
    text = PhiConfig(vocab_size=max(vocab, image_token_id + 1), tie_word_embeddings=False,
                     **{k: bunny_config[k] for k in _PHI_KEYS if k in bunny_config})
    config = LlavaConfig(
        vision_config=vision_config, text_config=text, image_token_id=image_token_id,
        projector_hidden_act="gelu", vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="full", multimodal_projector_bias=True,
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        tie_word_embeddings=False)
    config.bunny_text_vocab_size = vocab
    return config


def text_vocab_size(model: nn.Module) -> int:
    """``V``, Bunny's own vocabulary size: keep ``logits[..., :V]`` to get Bunny's distribution."""
    size = getattr(model.config, "bunny_text_vocab_size", None)
    if size is None:
        raise ConfigError(f"{type(model).__name__}: config has no bunny_text_vocab_size; "
                          f"expected a model from tive.models.bunny.load_bunny")
    return int(size)


def rename_bunny_key(key: str) -> str:
    """Bunny's weight name → transformers-5 LLaVA name (``lm_head.*`` and unknown names kept)."""
    for old, new in _RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def read_bunny_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Bunny's weights under LLaVA names, without the SigLIP ``head`` and stale buffers.

    Reads ``*.safetensors`` (the shards an index names, else every such file), else
    ``pytorch_model*.bin``.
    """
    raw: dict[str, torch.Tensor] = {}
    for path in _weight_files(Path(folder)):
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            raw.update(load_file(path))
        else:
            raw.update(torch.load(path, map_location="cpu", weights_only=True))
    return {rename_bunny_key(k): v for k, v in raw.items()
            if not k.startswith(_TOWER + "head.") and not _STALE_BUFFERS.search(k)}


def fit_vision_tower(vision_config: SiglipVisionConfig,
                     state: dict[str, torch.Tensor]) -> tuple[SiglipVisionConfig, int]:
    """The tower's config cut to the layers present in ``state``, and the feature layer.

    Returns:
        ``(config, -2)`` for a full tower; ``(config with L−1 layers, -1)`` when the last layer
        ``L−1`` was deleted (the same features).
    """
    pattern = re.compile(r"model\.vision_tower\.encoder\.layers\.(\d+)\.")
    present = 1 + max((int(m.group(1)) for k in state if (m := pattern.match(k))), default=-1)
    layers = vision_config.num_hidden_layers
    if present == layers:
        return vision_config, -2
    if present == layers - 1:
        return SiglipVisionConfig.from_dict({**vision_config.to_dict(),
                                             "num_hidden_layers": present}), -1
    raise ConfigError(f"Bunny checkpoint has {present} vision layers, its vision tower config "
                      f"{layers}; expected {layers} or {layers - 1} (last layer deleted); fix: "
                      f"point mm_vision_tower at the tower the checkpoint was trained with")


def load_bunny(folder: Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
               ) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerBase]:
    """Load a Bunny checkpoint folder (Bunny's own layout) as a native LLaVA model.

    Args:
        folder: holds Bunny's ``config.json``, tokenizer files and weights.
        dtype: parameter dtype (float32 for exact comparisons, bfloat16 on GPUs).
        device: where the model goes.

    Returns:
        ``(model, tokenizer)``: the model in eval mode; the tokenizer with ``<image>`` added as a
        special token (its id is ``model.config.image_token_id``) and pad = unk when unset.
        Slice the model's logits to ``[..., :text_vocab_size(model)]``.

    Raises:
        ConfigError: not a Bunny checkpoint, or a weight missing, unexpected or misshapen.
    """
    folder = Path(folder)
    if not is_bunny_checkpoint(folder):
        raise ConfigError(f"{folder}: not a Bunny checkpoint; expected config.json with a "
                          f"model_type starting with 'bunny' (e.g. 'bunny-phi')")
    bunny_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tokenizer = _bunny_tokenizer(folder)
    state = read_bunny_weights(folder)
    vision, feature_layer = fit_vision_tower(vision_config_from_bunny(bunny_config, folder), state)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = llava_config_from_bunny(bunny_config, vision, image_token_id,
                                     vision_feature_layer=feature_layer)
    if state.pop("lm_head.bias", None) is not None:
        warnings.warn(f"{folder}: the checkpoint has lm_head.bias, which Bunny's own "
                      f"BunnyPhiForCausalLM does not use (its head has no bias); ignored here "
                      f"too", stacklevel=2)
    state = _complete(state, config)
    model = _build(config, dtype)
    _check_weights(model, state, folder)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), tokenizer


def _weight_files(folder: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            shards = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
            return [folder / name for name in sorted(set(shards.values()))]
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise ConfigError(f"{folder}: no weights; expected *.safetensors or pytorch_model*.bin")
    return files


def _bunny_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    # config=: keeps AutoTokenizer from parsing Bunny's config.json as a generic config (it
    # warns about rope_scaling and the unknown model type); Phi-2's tokenizer is CodeGen's.
    tokenizer = AutoTokenizer.from_pretrained(folder, config=PhiConfig())
    if tokenizer.pad_token is None:  # Bunny's training sets pad = unk for Phi-2
        tokenizer.pad_token = tokenizer.unk_token
    tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]},
                                 replace_extra_special_tokens=False)
    return tokenizer


def _complete(state: dict[str, torch.Tensor], config: LlavaConfig) -> dict[str, torch.Tensor]:
    """Grow the vocabulary rows to the text config's size; fill an absent (unused) post-LN."""
    state = dict(state)
    rows = config.text_config.vocab_size
    for key in (_EMBED, "lm_head.weight"):
        if key in state and state[key].shape[0] == config.bunny_text_vocab_size < rows:
            pad = state[key].new_zeros((rows - state[key].shape[0], *state[key].shape[1:]))
            state[key] = torch.cat([state[key], pad])
    width = config.vision_config.hidden_size
    state.setdefault("model.vision_tower.post_layernorm.weight", torch.ones(width))
    state.setdefault("model.vision_tower.post_layernorm.bias", torch.zeros(width))
    return state


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _build(config: LlavaConfig, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    """An uninitialised model in ``dtype`` (every weight is loaded afterwards)."""
    from transformers.initialization import no_init_weights

    with no_init_weights(), _default_dtype(dtype):
        return LlavaForConditionalGeneration(config)


def _bunny_name(key: str) -> str:
    for old, new in _RENAMES:
        if key.startswith(new):
            return old + key[len(new):]
    return key


def _check_weights(model: nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unexpected or missing:
        what = "unexpected" if unexpected else "missing"
        keys = [_bunny_name(k) for k in (unexpected or missing)]
        more = f" (+{len(keys) - 1} more)" if len(keys) > 1 else ""
        raise ConfigError(f"{folder}: {what} weight {keys[0]!r}{more}; expected Bunny-v1.0's "
                          f"layout (SigLIP tower, mlp2x_gelu mm_projector, Phi model, lm_head)")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ConfigError(f"{folder}: weight {_bunny_name(key)!r} has shape "
                              f"{tuple(value.shape)}, config.json implies "
                              f"{tuple(expected[key].shape)}; fix: use the config saved with "
                              f"these weights")
