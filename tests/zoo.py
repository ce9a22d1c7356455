"""Tiny models of each family, built offline from configs (random weights, no download).

Shared by the model tests. Sizes are the smallest that each architecture accepts (Phi needs an
even rotary dimension: head_dim · partial_rotary_factor).
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Phi3Config,
    Phi3ForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
)

VOCAB = 128


def _seeded(build):
    torch.manual_seed(0)
    return build().eval()


def text_llama(layers: int = 2, kv_heads: int = 2) -> LlamaForCausalLM:
    """Llama with grouped-query attention (k/v narrower than q/o)."""
    return _seeded(lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv_heads)))


def text_phi() -> PhiForCausalLM:
    return _seeded(lambda: PhiForCausalLM(PhiConfig(
        vocab_size=VOCAB, hidden_size=40, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, partial_rotary_factor=0.4)))


def text_phi3() -> Phi3ForCausalLM:
    return _seeded(lambda: Phi3ForCausalLM(Phi3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)))


def llava_clip_llama() -> LlavaForConditionalGeneration:
    """LLaVA-1.5 layout: CLIP vision tower, Llama language model."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, image_size=28, patch_size=14)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    return _seeded(lambda: LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=VOCAB - 1)))


def llava_siglip_phi() -> LlavaForConditionalGeneration:
    """Bunny's architecture in native classes: SigLIP vision tower, Phi language model."""
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=4, image_size=28, patch_size=14,
                                vision_use_head=False)
    text = PhiConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, partial_rotary_factor=0.4)
    return _seeded(lambda: LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=VOCAB - 1,
        vision_feature_layer=-2, vision_feature_select_strategy="full")))


def qwen2_vl() -> Qwen2VLForConditionalGeneration:
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
                bos_token_id=0, eos_token_id=1)
    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    return _seeded(lambda: Qwen2VLForConditionalGeneration(Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=VOCAB - 1,
        video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3,
        vision_end_token_id=VOCAB - 4)))


FAMILIES = {
    "llama": text_llama,
    "phi": text_phi,
    "phi3": text_phi3,
    "llava": llava_clip_llama,
    "bunny": llava_siglip_phi,
    "qwen2-vl": qwen2_vl,
}
# self-attention projection names of each family (transformers 5)
ATTENTION = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "phi": {"q_proj", "k_proj", "v_proj", "dense"},
    "phi3": {"qkv_proj", "o_proj"},
    "llava": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "bunny": {"q_proj", "k_proj", "v_proj", "dense"},
    "qwen2-vl": {"q_proj", "k_proj", "v_proj", "o_proj"},
}


CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "USER: What is in the image? ASSISTANT: A red square on a white background.",
    "The quick brown fox jumps over the lazy dog. Answer the question using a single word.",
    "Is there a flower in the image? Yes. No. What colour dominates? Red. Blue.",
] * 20


def train_tokenizer(special: tuple[str, ...], vocab_size: int = 200, **kwargs):
    """A byte-level BPE tokenizer trained on the fly (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs)


def save_llava_folder(folder) -> None:
    """A complete tiny LLaVA-1.5-style model folder (weights, tokenizer, image processor), as
    ``llava-hf`` publishes them, for loading through ``tive.models``."""
    from transformers import CLIPImageProcessor

    tok = train_tokenizer(("<unk>", "<s>", "</s>", "<image>"), bos_token="<s>", eos_token="</s>",
                          unk_token="<unk>", pad_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, image_size=28, patch_size=14)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id,
                       initializer_range=0.3)  # logits wide enough to learn from in a few steps
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tok.convert_tokens_to_ids("<image>"))
    model = _seeded(lambda: LlavaForConditionalGeneration(config))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 28},
                       crop_size={"height": 28, "width": 28}).save_pretrained(folder)
