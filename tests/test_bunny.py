"""Bunny checkpoints in Bunny's own layout load into native LLaVA and match a direct computation.

The direct reference runs the independent modules Bunny is made of (SigLIP tower → hidden state
−2 → 2-layer GELU projector → patch embeddings spliced at the image placeholder → Phi), from
the same weights that a tiny checkpoint folder stores under Bunny's names.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import (
    PhiConfig,
    PhiForCausalLM,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from tests.conftest import TOL32
from tive.errors import ConfigError, DataError
from tive.models.bunny import SEP, SEP2, SYSTEM
from tive.models.bunny_port import (
    IMAGE_TOKEN,
    SIGLIP_SO400M_384,
    fit_vision_tower,
    is_bunny_checkpoint,
    llava_config_from_bunny,
    load_bunny,
    text_vocab_size,
    vision_config_from_bunny,
)
from tive.models.images import PAD_COLOR, bunny_pixel_values, expand2square

EOT = "<|endoftext|>"
TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
         "num_attention_heads": 4, "image_size": 28, "patch_size": 14, "vision_use_head": False}
TEXT = {"hidden_size": 40, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "partial_rotary_factor": 0.4,
        "hidden_act": "gelu_new", "layer_norm_eps": 1e-4, "rope_theta": 5000.0,
        "max_position_embeddings": 256, "qk_layernorm": True}
PATCHES = (28 // 14) ** 2
QUESTION, ANSWER = "What is in the image?", "A red square."
# Bunny-v1_0-3B's config.json, the keys the port reads
BUNNY_3B = {"model_type": "bunny-phi", "mm_vision_tower": SIGLIP_SO400M_384,
            "mm_hidden_size": 1152, "mm_projector_type": "mlp2x_gelu", "hidden_size": 2560,
            "intermediate_size": 10240, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "hidden_act": "gelu_new", "layer_norm_eps": 1e-5,
            "partial_rotary_factor": 0.4, "rope_theta": 10000.0, "max_position_embeddings": 2048,
            "qk_layernorm": False, "vocab_size": 51200, "bos_token_id": 50256,
            "eos_token_id": 50256, "rope_scaling": None, "tie_word_embeddings": False}


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer like Phi-2's: bos = eos = unk = pad = <|endoftext|>."""
    corpus = [SYSTEM, f"USER: {QUESTION} ASSISTANT: {ANSWER}",
              "The quick brown fox jumps over the lazy dog."] * 20
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=EOT, eos_token=EOT,
                                   unk_token=EOT, pad_token=EOT)


def _perturb(module: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere (biases and norms too), so every weight changes the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module.eval()


def write_bunny(folder: Path, vocab_pad: int = 0, drop_last_vision_layer: bool = False,
                extra: dict | None = None, drop: str | None = None) -> dict:
    """A tiny checkpoint in Bunny's own layout, and the independent modules it was saved from.

    Args:
        vocab_pad: extra (unused) vocabulary rows beyond the tokenizer, as Phi-2 has.
        drop_last_vision_layer: delete the tower's last layer (Bunny/Imp style).
        extra: additional weights written to the file under these names.
        drop: a weight name to leave out of the file.
    """
    tokenizer = make_tokenizer()
    vocab = len(tokenizer) + vocab_pad
    eot = tokenizer.convert_tokens_to_ids(EOT)
    tower_dir = folder.parent / f"{folder.name}-siglip"
    SiglipVisionConfig(**TOWER).save_pretrained(tower_dir)
    torch.manual_seed(0)
    vision = _perturb(SiglipVisionModel(SiglipVisionConfig(**TOWER)), 1)
    projector = _perturb(nn.Sequential(nn.Linear(32, 40), nn.GELU(), nn.Linear(40, 40)), 2)
    phi = _perturb(PhiForCausalLM(PhiConfig(vocab_size=vocab, bos_token_id=eot, eos_token_id=eot,
                                            tie_word_embeddings=False, **TEXT)), 3)
    state = {"model.vision_tower.vision_tower.vision_model." + k.removeprefix("vision_model."): v
             for k, v in vision.state_dict().items()}
    state["model.vision_tower.vision_tower.vision_model.head.probe"] = torch.ones(32, 32)
    state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    state.update(phi.state_dict())
    if drop_last_vision_layer:
        last = f".encoder.layers.{TOWER['num_hidden_layers'] - 1}."
        state = {k: v for k, v in state.items() if last not in k}
    state.update(extra or {})
    state.pop(drop, None)
    folder.mkdir(parents=True)
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()},
              folder / "model.safetensors")
    config = dict(model_type="bunny-phi", architectures=["BunnyPhiForCausalLM"],
                  mm_vision_tower=f"../{tower_dir.name}", mm_projector_type="mlp2x_gelu",
                  mm_hidden_size=32, image_aspect_ratio="pad", use_mm_proj=True, vocab_size=vocab,
                  bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=False,
                  rope_scaling=None, resid_pdrop=0.1, **TEXT)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    tokenizer.save_pretrained(folder)
    return {"folder": folder, "vision": vision, "projector": projector, "phi": phi,
            "tokenizer": tokenizer, "vocab": vocab}


@pytest.fixture(scope="module")
def bunnies(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("bunny")
    return {"full": write_bunny(root / "full"),
            "imp": write_bunny(root / "imp", drop_last_vision_layer=True),
            "padded": write_bunny(root / "padded", vocab_pad=20)}


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _chunks(tokenizer) -> tuple[list[int], list[int]]:
    """Bunny's tokenizer_image_token: the prompt's ids before and after the image placeholder."""
    prompt = f"{SYSTEM}{SEP}USER: {IMAGE_TOKEN}\n{QUESTION}{SEP}ASSISTANT: {ANSWER}{SEP2}"
    pre, post = prompt.split(IMAGE_TOKEN)
    return tokenizer(pre).input_ids, tokenizer(post).input_ids


def direct_logits(parts: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    """Bunny's computation from its modules: (1, tokens, vocab) logits. Its
    ``BunnyPhiForCausalLM`` head has no bias, so Phi's head bias is left out."""
    pre, post = _chunks(parts["tokenizer"])
    embed = parts["phi"].get_input_embeddings()
    with torch.no_grad():
        hidden = parts["vision"](pixel_values, output_hidden_states=True).hidden_states[-2]
        patches = parts["projector"](hidden)  # (1, PATCHES, 40)
        embeds = torch.cat([embed(torch.tensor([pre])), patches, embed(torch.tensor([post]))], 1)
        return parts["phi"](inputs_embeds=embeds).logits - parts["phi"].lm_head.bias


@pytest.mark.parametrize("variant", ["full", "imp", "padded"])
def test_port_matches_direct_reference(bunnies, variant):
    parts = bunnies[variant]
    model, _tokenizer = load_bunny(parts["folder"])
    pixel_values = bunny_pixel_values([_image(36, 20)], 28)
    pre, post = _chunks(parts["tokenizer"])
    image_id = model.config.image_token_id
    ids = torch.tensor([pre + [image_id] * PATCHES + post])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixel_values).logits
    vocab = text_vocab_size(model)
    reference = direct_logits(parts, pixel_values)
    assert vocab == parts["vocab"]
    tokens = len(pre) + PATCHES + len(post)
    assert logits[..., :vocab].shape == reference.shape == (1, tokens, vocab)
    assert (logits[..., :vocab] - reference).abs().max().item() <= TOL32
    # the image changes the answer: the patches really go through
    with torch.no_grad():
        other_pixels = bunny_pixel_values([_image(36, 20, 1)], 28)
        other = model(input_ids=ids, pixel_values=other_pixels).logits
    assert (other - logits).abs().max().item() > 1e-3


def test_truncated_tower_uses_last_remaining_layer(bunnies):
    full, _ = load_bunny(bunnies["full"]["folder"])
    imp, _ = load_bunny(bunnies["imp"]["folder"])
    for model, expected in ((full, (3, -2)), (imp, (2, -1))):
        config = model.config
        assert (config.vision_config.num_hidden_layers, config.vision_feature_layer) == expected
    assert full.config.image_seq_length == imp.config.image_seq_length == PATCHES


def test_image_token_grows_vocabulary_by_one_zero_row(bunnies):
    model, tokenizer = load_bunny(bunnies["full"]["folder"])
    vocab = bunnies["full"]["vocab"]
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == vocab
    assert len(tokenizer) == vocab + 1
    assert model.lm_head.weight.shape == (vocab + 1, 40)
    assert torch.equal(model.lm_head.weight[vocab], torch.zeros(40))
    assert model.lm_head.bias is None  # Bunny's head has none; the checkpoint's is ignored
    assert model.get_input_embeddings().weight.shape == (vocab + 1, 40)


def test_lm_head_bias_is_ignored_as_bunny_does_and_said(bunnies):
    with pytest.warns(UserWarning, match="lm_head.bias, which Bunny's own BunnyPhiForCausalLM "
                                         "does not use"):
        load_bunny(bunnies["padded"]["folder"])


def test_losses_take_the_softmax_over_bunnys_own_vocabulary(bunnies):
    """With the vocabulary equal to the tokenizer length, <image> adds a zero head row; the
    per-sample and warm-up losses must not give it softmax mass."""
    from unittest import mock

    import torch.nn.functional as F
    from peft import get_peft_model

    from tive.projection.projectors import make_projector
    from tive.models.load import text_vocab
    from tive.scoring.gradients import GradientFeatures
    from tive.util.dist import Dist
    from tive.warmup.lora import key_parameters, lora_config
    from tive.warmup.settings import WarmupConfig
    from tive.warmup.training import _StepRunner

    model, tokenizer = load_bunny(bunnies["full"]["folder"])
    vocab = bunnies["full"]["vocab"]
    assert text_vocab(model.config) == vocab
    assert text_vocab(load_bunny(bunnies["padded"]["folder"])[0].config) is None
    pre, post = _chunks(bunnies["full"]["tokenizer"])
    ids = torch.tensor([pre + [model.config.image_token_id] * PATCHES + post])
    labels = torch.full_like(ids, -100)
    answer = len(tokenizer(ANSWER + SEP2).input_ids)
    labels[0, -answer:] = ids[0, -answer:]
    pixels = bunny_pixel_values([_image(36, 20)], 28)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits[0, :-1]
    own = F.cross_entropy(logits[:, :vocab], labels[0, 1:], ignore_index=-100).item()
    wider = F.cross_entropy(logits, labels[0, 1:], ignore_index=-100).item()
    assert abs(own - wider) > 1e-4  # the extra column would change the loss
    peft = get_peft_model(model, lora_config(model, 2, 4, 0.0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "pixel_values": pixels}
    dims = [k.numel for k in key_parameters(peft)]
    with GradientFeatures(peft, make_projector("sparse-jl", dims, 8)) as features:
        assert features(batch).loss[0] == pytest.approx(own, rel=1e-5)
    runner = _StepRunner(peft, 0, WarmupConfig(batch_size=1), Dist())
    with mock.patch("tive.warmup.training.collate", return_value=batch), torch.no_grad():
        assert runner._loss([object()]).item() == pytest.approx(own, rel=1e-5)


def test_padded_vocabulary_takes_an_unused_row(bunnies):
    model, tokenizer = load_bunny(bunnies["padded"]["folder"])
    vocab = bunnies["padded"]["vocab"]
    assert model.config.image_token_id == len(tokenizer) - 1 < vocab
    assert model.lm_head.weight.shape == (vocab, 40) and text_vocab_size(model) == vocab


def test_tokenizer_splits_prompt_at_image_token(bunnies):
    model, tokenizer = load_bunny(bunnies["full"]["folder"])
    pre, post = _chunks(bunnies["full"]["tokenizer"])
    prompt = f"{SYSTEM}{SEP}USER: {IMAGE_TOKEN}\n{QUESTION}{SEP}ASSISTANT: {ANSWER}{SEP2}"
    assert tokenizer(prompt).input_ids == pre + [model.config.image_token_id] + post
    assert tokenizer.pad_token == tokenizer.eos_token == tokenizer.unk_token == EOT
    assert IMAGE_TOKEN in tokenizer.all_special_tokens


def test_bfloat16_load(bunnies):
    model, _ = load_bunny(bunnies["full"]["folder"], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = bunnies["full"]["projector"][0].weight.to(torch.bfloat16)
    assert torch.equal(model.model.multi_modal_projector.linear_1.weight, reference)


@pytest.mark.parametrize("change, name, word", [
    ("extra", "model.mm_projector.4.weight", "unexpected"),
    ("drop", "model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc1.bias",
     "missing"),
    ("shape", "model.mm_projector.2.bias", "shape"),
])
def test_weight_mismatch_is_one_line_config_error(tmp_path, change, name, word):
    kwargs = {"extra": {"extra": {name: torch.zeros(40, 40)}}, "drop": {"drop": name},
              "shape": {"extra": {name: torch.zeros(3)}}}[change]
    folder = write_bunny(tmp_path / "ckpt", **kwargs)["folder"]
    with pytest.raises(ConfigError) as info:
        load_bunny(folder)
    message = str(info.value)
    assert repr(name) in message and str(folder) in message and word in message
    assert "\n" not in message


def test_is_bunny_checkpoint(bunnies, tmp_path):
    assert is_bunny_checkpoint(bunnies["full"]["folder"])
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text('{"model_type": "llava"}')
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": ')
    assert not is_bunny_checkpoint(tmp_path / "llava")
    assert not is_bunny_checkpoint(tmp_path / "broken")
    assert not is_bunny_checkpoint(tmp_path / "missing")
    with pytest.raises(ConfigError, match="not a Bunny checkpoint"):
        load_bunny(tmp_path / "llava")


def test_bunny_3b_config_without_download(tmp_path):
    vision = vision_config_from_bunny(BUNNY_3B, tmp_path)
    assert (vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers,
            vision.num_attention_heads, vision.image_size, vision.patch_size,
            vision.layer_norm_eps, vision.hidden_act, vision.vision_use_head) == (
        1152, 4304, 27, 16, 384, 14, 1e-6, "gelu_pytorch_tanh", False)
    config = llava_config_from_bunny(BUNNY_3B, vision, image_token_id=50295)
    text = config.text_config
    assert (text.vocab_size, config.bunny_text_vocab_size, config.image_token_id) == (
        51200, 51200, 50295)
    assert (text.hidden_size, text.num_hidden_layers, text.rope_parameters["partial_rotary_factor"],
            text.hidden_act, text.tie_word_embeddings) == (2560, 32, 0.4, "gelu_new", False)
    assert (config.image_seq_length, config.vision_feature_layer,
            config.vision_feature_select_strategy, config.projector_hidden_act,
            config.multimodal_projector_bias) == (729, -2, "full", "gelu", True)
    assert llava_config_from_bunny(BUNNY_3B, vision, 51200).text_config.vocab_size == 51201


@pytest.mark.parametrize("change, match", [
    ({"mm_vision_tower": "google/siglip-base-patch16-224"}, "mm_vision_tower"),
    ({"mm_projector_type": "linear"}, "mm_projector_type"),
    ({"model_type": "bunny-llama"}, "model_type"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"mm_hidden_size": 1024}, "mm_hidden_size"),
])
def test_unsupported_config_is_config_error(tmp_path, change, match):
    config = {**BUNNY_3B, **change}
    with pytest.raises(ConfigError, match=match):
        llava_config_from_bunny(config, vision_config_from_bunny(config, tmp_path), 50295)


def test_vision_layer_count_must_fit(tmp_path):
    state = {"model.vision_tower.encoder.layers.0.mlp.fc1.bias": torch.zeros(1)}  # 1 of 3
    with pytest.raises(ConfigError, match="1 vision layers"):
        fit_vision_tower(SiglipVisionConfig(**TOWER), state)


def test_expand2square_pads_with_background_centred():
    wide, tall, square = _image(10, 4), _image(3, 8, 1), _image(5, 5, 2)
    out = np.asarray(expand2square(wide, PAD_COLOR))  # (10, 10, 3), image at rows 3..6
    assert out.shape == (10, 10, 3)
    assert np.array_equal(out[3:7], np.asarray(wide))
    assert (out[:3] == 127).all() and (out[7:] == 127).all()
    out = np.asarray(expand2square(tall, (1, 2, 3)))  # (8, 8, 3), image at columns 2..4
    assert out.shape == (8, 8, 3)
    assert np.array_equal(out[:, 2:5], np.asarray(tall))
    assert (out[:, :2] == [1, 2, 3]).all() and (out[:, 5:] == [1, 2, 3]).all()
    assert expand2square(square, PAD_COLOR) is square


def test_bunny_pixel_values_match_manual_pil_bicubic():
    images = [_image(50, 30), _image(20, 44, 1).convert("L"), _image(16, 16, 2)]
    pixels = bunny_pixel_values(images, 28)
    assert pixels.shape == (3, 3, 28, 28) and pixels.dtype == torch.float32
    assert pixels.min().item() >= -1.0 and pixels.max().item() <= 1.0
    for image, got in zip(images, pixels):
        square = expand2square(image.convert("RGB"), (127, 127, 127))
        square = square.resize((28, 28), Image.BICUBIC)
        manual = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255).permute(2, 0, 1)
        assert (got - (manual - 0.5) / 0.5).abs().max().item() <= 1e-6
    with pytest.raises(DataError):
        bunny_pixel_values([], 28)


def test_the_towers_own_preprocessor_config_is_read(tmp_path):
    import json

    from tive.models.images import ImageSettings, image_settings

    parts = write_bunny(tmp_path / "b")
    assert image_settings(parts["folder"], 28) == ImageSettings(28)  # none shipped: defaults
    tower = tmp_path / "b-siglip"
    (tower / "preprocessor_config.json").write_text(json.dumps({
        "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.4], "resample": 2,
        "size": {"height": 28, "width": 28}, "image_processor_type": "SiglipImageProcessor"}))
    settings = image_settings(parts["folder"], 384)
    assert settings == ImageSettings(28, (0.4, 0.5, 0.6), (0.2, 0.3, 0.4), 2)
    image = _image(50, 30)
    got = bunny_pixel_values([image], settings)[0]
    square = expand2square(image, (102, 127, 153)).resize((28, 28), Image.BILINEAR)
    manual = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255).permute(2, 0, 1)
    mean, std = torch.tensor([0.4, 0.5, 0.6])[:, None, None], torch.tensor([0.2, 0.3, 0.4])[
        :, None, None]
    assert (got - (manual - mean) / std).abs().max().item() <= 1e-5
