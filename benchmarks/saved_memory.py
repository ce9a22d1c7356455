"""What the backward pass keeps, per token and decoder layer, in the language models users score.

The memory a batch needs on a GPU beyond the weights is mostly the tensors autograd saves
for the backward pass. Their count does not depend on the device, so it is measured here on a
CPU: decoder layers at the real widths of LLaVA-1.5-7B's Llama (4096 / 11008, 32 heads) and
Bunny-3B's Phi-2 (2560 / 10240, 32 heads), in bfloat16, LoRA r = 128 on every linear layer (the
warm-up's), and one record of ``--tokens`` tokens (``--answer`` of them supervised) through
tive's own extraction (:class:`tive.scoring.gradients.GradientFeatures`, only the key LoRA matrices
requiring gradients, as ``tive score`` runs). Every tensor saved for the backward pass is
counted once (by its storage; weights excluded), with 3 and with 2 decoder layers: the
difference is one layer's share.

Rows: LoRA matrices in float32 (peft's default on a 16-bit model, ``--adapter-dtype float32``)
and in bfloat16 (``--adapter-dtype model``). With ``--gradient-checkpointing`` a layer keeps
only its input (``tokens × hidden`` bf16) and recomputes the rest in the backward pass, one
layer at a time; that column is computed from the widths, not counted (the checkpoint's own
hooks hold the tensors).

Attention: a record alone, without padding, runs PyTorch's flash kernel on a CPU as on a GPU
(it keeps its output and log-sum-exp only). Batches with padding pass a mask, and the kernel
a GPU picks then may keep more; transient buffers (the backward's own gradients, the
per-sample einsums) are not in these counts: the GPU's peak is measured by
``gpu_throughput.py``.

    python benchmarks/saved_memory.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = {  # (family, hidden, intermediate, heads, layers of the real model)
    "llava-1.5-7b (Llama)": ("llama", 4096, 11008, 32, 32),
    "bunny-3b (Phi-2)": ("phi", 2560, 10240, 32, 32),
}


def build(family: str, hidden: int, inter: int, heads: int, layers: int):
    """A bfloat16 causal LM of these widths with LoRA r = 128 on every linear layer, peft's
    float32 adapters."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM

    from tive.warmup.lora import lora_config, warmup_targets

    common = {"hidden_size": hidden, "intermediate_size": inter, "num_attention_heads": heads,
              "num_hidden_layers": layers, "vocab_size": 512, "max_position_embeddings": 4096}
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        if family == "llama":
            model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=heads, **common))
        else:
            model = PhiForCausalLM(PhiConfig(**common))
    finally:
        torch.set_default_dtype(torch.float32)
    model.config._attn_implementation = "sdpa"
    peft_model = get_peft_model(model, lora_config(model, r=128, alpha=256, dropout=0.0,
                                                   targets=warmup_targets(model)))
    for name, p in peft_model.named_parameters():  # B ≠ 0, as after a warm-up
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=1e-3)
    return peft_model.eval()


def saved_bytes(peft_model, tokens: int, answer: int) -> int:
    """Bytes of the tensors saved for the backward pass of one record's extraction."""
    from tive.projection.projectors import SparseJL
    from tive.scoring.gradients import GradientFeatures
    from tive.warmup.lora import key_parameters

    weights = {p.untyped_storage().data_ptr() for p in peft_model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(3, 500, (1, tokens))
    labels = torch.full_like(ids, -100)
    labels[:, -answer:] = ids[:, -answer:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    keys = key_parameters(peft_model)
    with GradientFeatures(peft_model, SparseJL([k.numel for k in keys], 64, seed=0)) as gf:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            gf(batch)
    return sum(seen.values())


def main() -> None:
    from tive.warmup.lora import adapters_to_model_dtype

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=890,
                        help="tokens per record (LLaVA-1.5: 576 image tokens + text)")
    parser.add_argument("--answer", type=int, default=200, help="supervised tokens")
    args = parser.parse_args()
    print(f"one record of {args.tokens} tokens ({args.answer} supervised), bfloat16 weights, "
          f"LoRA r = 128 on every linear layer; KB saved per token and decoder layer, and GB per "
          f"record for all the model's layers\n")
    print("| language model | LoRA matrices | KB / token / layer | GB / record | × float32 "
          "adapters | with --gradient-checkpointing: KB / token / layer kept |")
    print("|---|---|---|---|---|---|")
    for label, (family, hidden, inter, heads, layers) in SHAPES.items():
        base = None
        for adapters in ("float32", "model"):
            counts = {}
            for n in (2, 3):
                model = build(family, hidden, inter, heads, n)
                if adapters == "model":
                    adapters_to_model_dtype(model)
                counts[n] = saved_bytes(model, args.tokens, args.answer)
                del model
            per_layer = (counts[3] - counts[2]) / args.tokens / 1e3
            base = base or per_layer
            record = per_layer * 1e3 * args.tokens * layers / 2**30
            kept = hidden * 2 / 1e3
            print(f"| {label} | {'bfloat16' if adapters == 'model' else 'float32'} | "
                  f"{per_layer:.1f} | {record:.2f} | {per_layer / base:.2f} | {kept:.1f} "
                  f"(+ one layer's {per_layer:.0f} while it is recomputed) |", flush=True)


if __name__ == "__main__":
    main()
