"""Scoring throughput on a GPU, in the shapes users score: LLaVA-1.5-7B and Bunny-3B.

For each shape, a model with random weights is built directly on the device (bf16 on a GPU),
with a synthetic LLaVA mixture of realistic lengths (the LLaVA-1.5 prompts, one image of
576 or 729 tokens per record, answers of 1–40 words, a few multi-turn records), and on the
same batches, records/s of:

  (a)  a plain LoRA training step (forward + backward of the model's own loss, LoRA r=128 on
       every linear layer of the language model, no optimizer step): the floor;
  (b)  tive in-process: per-sample key-parameter gradients in one batched backward, sparse JL
       to 8192 in the hooks, rows written to a store;
  (c') the authors' way without its projection: one backward per record;
  (c)  (c') with TRAK's CUDA projector (only when ``fast_jl`` imports);
  (e)  ``tive score`` end to end, a separate process, on a model folder saved from the same
       weights, with the same adapter (encoding in worker processes, as users run it);

and the peak GPU memory of (a) and (b), tokens/s of (b), and (b)'s share of the device's
bf16 peak (model FLOPs ≈ 6 · language-model parameters · tokens, as a training step; a
table of known GPUs gives the peak). (a) and (b) alternate batch by batch; the first batch of
each warms up and is not timed.

A second table gives, per shape, variants of (b) on the same batches, each against (b): with
``--gradient-checkpointing``, with ``--adapter-dtype model`` (LoRA matrices in bf16), and
both (records/s, ×(b), peak GB); and (f) ``tive score`` with its default settings (batch size
auto, workers from the CPU count) on ``--f-records`` records in a process held to ``--cap-gb``
of GPU memory (80: the GPUs most users have), with and without ``--adapter-dtype model``:
records/s as ``tive score`` reports it (its scoring loop, out-of-memory retries included) and
the batch size auto reached. (e) and (f) run after this process has released the model and its
cached memory; the GPU memory free then is shown.

``--tiny`` runs the same code on the CPU with tiny shapes (a test runs it). The Bunny shape
is SigLIP-so400m/384 + Phi-2 in transformers' LLaVA classes (as tive loads Bunny), saved as a
LLaVA folder for (e): the prompt format differs from Bunny's, the compute does not.

    python benchmarks/gpu_throughput.py                 # on a GPU, both shapes (~8 min, H200)
    python benchmarks/gpu_throughput.py --shapes llava-7b --batch-size 4
    python benchmarks/gpu_throughput.py --tiny          # CPU, tiny shapes (< 2 min)
    python benchmarks/gpu_throughput.py --no-variants   # the first table only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # zoo.train_tokenizer: a tokenizer, no download
sys.path.insert(0, str(HERE))  # throughput.keys_only

K = 8192
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0,
                    "L4": 121.0, "4090": 165.0}  # dense bf16, from the vendors' data sheets
SHAPES = {  # vision: (kind, hidden, intermediate, layers, heads, image); text: (kind, ...)
    "llava-7b": {"vision": ("clip", 1024, 4096, 24, 16, 336),
                 "text": ("llama", 4096, 11008, 32, 32, 32064)},
    "bunny-3b": {"vision": ("siglip", 1152, 4304, 27, 16, 384),
                 "text": ("phi", 2560, 10240, 32, 32, 51200)},
}
TINY = {
    "llava-7b": {"vision": ("clip", 32, 64, 2, 4, 56), "text": ("llama", 64, 128, 2, 4, 512)},
    "bunny-3b": {"vision": ("siglip", 32, 64, 2, 4, 56), "text": ("phi", 80, 128, 2, 4, 512)},
}
PROMPTS = ("Describe the image in detail.", "Answer the question using a single word or phrase.",
           "Answer with the option's letter from the given choices directly.",
           "Please provide a short description for this region: [0.1, 0.2, 0.5, 0.7]")
WORDS = ("the a red blue cat dog sits on mat near house tree sky water boat man woman street "
         "car bus sign left right small large two three white black green").split()


def build(shape: dict, device: torch.device, dtype: torch.dtype):
    """Random-weight LLaVA-class model of ``shape`` built on ``device``, its tokenizer and
    image processor."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        PhiConfig,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )
    from zoo import train_tokenizer

    tok = train_tokenizer(("<unk>", "<s>", "</s>", "<image>"), vocab_size=400, bos_token="<s>",
                          eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vkind, vh, vi, vl, vn, img = shape["vision"]
    tkind, th, ti, tl, tn, vocab = shape["text"]
    vision_cls, processor_cls = ((CLIPVisionConfig, CLIPImageProcessor) if vkind == "clip"
                                 else (SiglipVisionConfig, SiglipImageProcessor))
    vision = vision_cls(hidden_size=vh, intermediate_size=vi, num_hidden_layers=vl,
                        num_attention_heads=vn, image_size=img, patch_size=14)
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
           "eos_token_id": tok.eos_token_id}
    text = (LlamaConfig(vocab_size=vocab, hidden_size=th, intermediate_size=ti,
                        num_hidden_layers=tl, num_attention_heads=tn, num_key_value_heads=tn,
                        max_position_embeddings=4096, **ids) if tkind == "llama" else
            PhiConfig(vocab_size=vocab, hidden_size=th, intermediate_size=ti,
                      num_hidden_layers=tl, num_attention_heads=tn, num_key_value_heads=tn,
                      partial_rotary_factor=0.4, max_position_embeddings=4096, **ids))
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2,
                         vision_feature_select_strategy="default" if vkind == "clip" else "full")
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(old)
    size = {"height": img, "width": img}
    processor = (processor_cls(size={"shortest_edge": img}, crop_size=size) if vkind == "clip"
                 else processor_cls(size=size))
    return model.eval(), tok, processor


def mixture(folder: Path, n: int, image: int, seed: int = 0) -> Path:
    """``n`` LLaVA records with images: LLaVA-1.5's prompts, answers of 1–40 words."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    words = lambda k: " ".join(rng.choice(WORDS, size=k))  # noqa: E731
    records = []
    for i in range(n):
        turns = [{"from": "human", "value": f"<image>\n{words(int(rng.integers(6, 20)))}?\n"
                                             f"{PROMPTS[i % len(PROMPTS)]}"},
                 {"from": "gpt", "value": words(int(rng.integers(1, 41)))}]
        for _ in range(int(rng.integers(0, 4)) if i % 3 == 0 else 0):  # multi-turn records
            turns += [{"from": "human", "value": f"{words(8)}?"},
                      {"from": "gpt", "value": words(int(rng.integers(1, 12)))}]
        rel = f"images/{i:05d}.png"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        w, h = (int(x) for x in rng.integers(image // 2, image * 2, size=2))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / rel)
        records.append({"id": str(i), "conversations": turns, "image": rel})
    (folder / "mix.json").write_text(json.dumps(records))
    return folder / "mix.json"


def lora(model):
    from peft import LoraConfig, get_peft_model

    from tive.warmup.lora import warmup_targets

    torch.manual_seed(0)  # B ≠ 0, as after a warm-up: every gradient is non-zero
    return get_peft_model(model, LoraConfig(r=128, lora_alpha=256, lora_dropout=0.05,
                                            init_lora_weights=False,
                                            target_modules=warmup_targets(model)))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def to(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
            for k, v in batch.items() if v is not None}


def phase_peak(device: torch.device, fn) -> tuple[float, float]:
    """(seconds, peak GB) of ``fn()``; peak on a GPU only (NaN on a CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def measure(name: str, shape: dict, device: torch.device, dtype: torch.dtype, records: int,
            batch_size: int, authors_records: int, work: Path,
            variants: list | None = None, cap_gb: float = 80.0, f_records: int = 256) -> dict:
    """The first table's row for shape ``name``; with ``variants`` (a list), the second
    table's rows are appended to it."""
    from tive.models.encoding import collate, encode_row, make_encoder
    from tive.models.llava import pad_to_square
    from tive.projection.projectors import SparseJL
    from tive.scoring.gradients import GradientFeatures
    from tive.store.format import IndexEntry
    from tive.store.writers import RowWriter, create_store
    from tive.warmup.lora import key_parameters

    model, tok, processor = build(shape, device, dtype)
    folder = work / name
    data = mixture(folder / "data", records, shape["vision"][5])
    image = shape["vision"][5]
    encoder = make_encoder("llava", tok, image_processor=pad_to_square(processor),
                           image_tokens=(image // 14) ** 2, max_length=2048)
    from tive.data.mixture import load_mixture

    mix = load_mixture(data)
    items = [encode_row(encoder, mix, i) for i in range(len(mix))]
    items = [x for x in items if not isinstance(x, str)]
    pad = tok.pad_token_id
    batches = [to(collate(items[i:i + batch_size], pad), device, dtype)
               for i in range(0, len(items), batch_size)]
    model.save_pretrained(folder / "model")  # for (e), before LoRA wraps it
    tok.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    lm_params = sum(p.numel() for n, p in model.named_parameters() if "language_model" in n)
    model = lora(model)
    model.save_pretrained(folder / "adapter")
    keys = key_parameters(model)
    n = len(items)
    store = create_store(folder / "store", n=n, k=K, index=[IndexEntry(str(i), "t", i)
                                                            for i in range(n)],
                         meta={"projector": {}, "data": {"path": "-", "fingerprint": "-"}})
    writer = RowWriter(store.root)
    gf = GradientFeatures(model, SparseJL([k.numel for k in keys], K, seed=0))

    def plain(batch):
        for pname, p in model.named_parameters():
            p.requires_grad_("lora_" in pname)
        model.train()
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    def tive_b(batch, row):
        res = gf(batch)
        m = len(res.norms)
        writer.write(np.arange(row, row + m), res.features, res.norms, res.loss, res.ntokens,
                     np.zeros(m, dtype=np.int8))

    ta, tb, pa, pb, row = [], [], [], [], 0
    for i, batch in enumerate(batches):
        a, peak_a = phase_peak(device, lambda: plain(batch))
        b, peak_b = phase_peak(device, lambda: tive_b(batch, row))
        row += len(batch["input_ids"])
        pa.append(peak_a)
        pb.append(peak_b)
        if i > 0:
            ta.append(a)
            tb.append(b)
    writer.close()
    gf.close()
    timed = n - len(batches[0]["input_ids"])
    b_rate = timed / sum(tb)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[1:])
    c_prime, c = authors(model, items[:authors_records], pad, keys, device, dtype)
    if variants is not None:  # after (c'), (c): this casts the model's adapters
        variants += [{"shape": name, "setting": setting, "records/s": rate,
                      "×(b)": rate / b_rate, "peak GB": peak_gb}
                     for setting, rate, peak_gb in b_variants(model, keys, batches, device)]
    del model, gf, batches
    release(device)  # what this process holds is not the child's to use
    e = end_to_end(folder, data, ["--batch-size", str(batch_size)])[0]
    if variants is not None:
        cap = f"{cap_gb:g} GB" if device.type == "cuda" else "a CPU"
        free = (f", {torch.cuda.mem_get_info(device)[0] / 2**30:.0f} GB free"
                if device.type == "cuda" else "")
        more = mixture(folder / "data-f", f_records, shape["vision"][5])
        for extra in ([], ["--adapter-dtype", "model"]):
            rate, batch = end_to_end(folder, more, extra, cap_gb if device.type == "cuda"
                                     else None)
            variants.append({"shape": name, "records/s": rate, "×(b)": rate / b_rate,
                             "peak GB": float("nan"), "setting": f"(f) tive score, defaults"
                             f"{' --adapter-dtype model' if extra else ''}, {f_records} "
                             f"records, within {cap}{free}: batch size {batch}"})
    b_rate = timed / sum(tb)
    peak = device_peak(device)
    flops = 6.0 * lm_params * tokens / sum(tb)
    return {"shape": name, "records": n, "tokens/record": tokens / max(timed, 1),
            "batch": batch_size, "a": timed / sum(ta), "b": b_rate, "c'": c_prime, "c": c,
            "e": e, "e/b": e / b_rate if e == e else float("nan"),
            "peak a": max(pa), "peak b": max(pb), "tokens/s": tokens / sum(tb),
            "share of bf16 peak": flops / (peak * 1e12) if peak else float("nan")}


VARIANTS = ("--gradient-checkpointing", "--adapter-dtype model",
            "--adapter-dtype model --gradient-checkpointing")


def release(device: torch.device) -> None:
    """Return this process's cached GPU memory to the device."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def b_variants(model, keys: list, batches: list, device: torch.device,
               settings: tuple[str, ...] = VARIANTS) -> list[tuple]:
    """(setting, records/s, peak GB) of (b) with gradient checkpointing, with the LoRA
    matrices cast to the model's type, and both (``settings``); one pass each over
    ``batches``, the first batch not timed. Casts ``model``'s adapters in place (the last use
    of the model)."""
    from tive.projection.projectors import SparseJL
    from tive.models.load import disable_checkpointing
    from tive.scoring.gradients import GradientFeatures
    from tive.warmup.lora import adapters_to_model_dtype

    hf = model.get_base_model()
    out = []
    for setting in settings:
        if "model" in setting:
            adapters_to_model_dtype(model)
        checkpointing = "checkpointing" in setting
        seconds, peaks, timed = 0.0, [], 0
        with GradientFeatures(model, SparseJL([k.numel for k in keys], K, seed=0),
                              checkpointing=checkpointing) as gf:
            for i, batch in enumerate(batches):
                took, peak = phase_peak(device, lambda: gf(batch))
                peaks.append(peak)
                if i > 0:
                    seconds += took
                    timed += len(batch["input_ids"])
        if checkpointing:
            disable_checkpointing(hf)
        out.append((setting, timed / seconds, max(peaks)))
    return out


def authors(model, items: list, pad: int, keys: list, device: torch.device,
            dtype: torch.dtype) -> tuple[float, float]:
    """(c'), (c): records/s of one backward per record, without and with TRAK's CUDA
    projection (NaN when fast_jl does not import or on a CPU)."""
    from tive.models.encoding import collate
    from tive.projection.projectors import _fast_jl

    from throughput import keys_only

    params = keys_only(model, keys)
    singles = [to(collate([item], pad), device, dtype) for item in items]
    projector = None
    if device.type == "cuda" and _fast_jl():
        from trak.projectors import CudaProjector, ProjectionType

        dim = sum(k.numel for k in keys)
        projector = CudaProjector(dim, K, 0, ProjectionType.rademacher, device, 16)
    backward = project = 0.0
    pending = []
    for i, one in enumerate(singles):
        sync(device)
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(**one).loss.backward()
        pending.append(torch.cat([params[k.name].grad.flatten() for k in keys]))
        sync(device)
        backward += time.perf_counter() - start
        if projector is not None and (len(pending) == 16 or i == len(singles) - 1):
            start = time.perf_counter()
            projector.project(torch.stack(pending).to(torch.float16), model_id=0)
            sync(device)
            project += time.perf_counter() - start
        if len(pending) == 16:
            pending = []
    n = len(singles)
    return n / backward, (n / (backward + project) if projector is not None else float("nan"))


def end_to_end(folder: Path, data: Path, extra: list[str],
               cap_gb: float | None = None) -> tuple[float, str]:
    """(e), (f): records/s that ``tive score`` reports, run as a user runs it (its own
    process), and the batch size it reports; with ``cap_gb``, the process may allocate at most
    that much GPU memory (``torch.cuda.set_per_process_memory_fraction``)."""
    args = ["score", "--model", str(folder / "model"), "--data", str(data),
            "--reference", str(folder / "adapter"), "--run",
            str(folder / "-".join(["run", *(x.strip("-") for x in extra)])), *extra]
    cap = (f"t.cuda.set_per_process_memory_fraction(min(1.0, {cap_gb} * 2**30 / "
           f"t.cuda.get_device_properties(0).total_memory)); " if cap_gb else "")
    code = f"import sys, torch as t; {cap}from tive.cli.commands import main; main(sys.argv[1:])"
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         timeout=1800, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if res.returncode != 0:
        print(f"tive score failed: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return float("nan"), "—"
    found = re.search(r"([\d.]+) records/s", res.stdout)
    batch = re.search(r"batch size: (auto → \d+|\d+)", res.stdout)
    return (float(found.group(1)) if found else float("nan"),
            batch.group(1) if batch else "?")


def device_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, on the CPU")
    parser.add_argument("--shapes", default="llava-7b,bunny-3b")
    parser.add_argument("--records", type=int, default=None,
                        help="records per shape (default: 96 on a GPU, 12 with --tiny)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="records per batch (default: 4 on a GPU, 4 with --tiny)")
    parser.add_argument("--authors-records", type=int, default=16)
    parser.add_argument("--no-variants", action="store_true",
                        help="leave out the second table (variants of (b), and (f))")
    parser.add_argument("--cap-gb", type=float, default=80.0,
                        help="GPU memory (f)'s process may use [default: 80]")
    parser.add_argument("--f-records", type=int, default=None,
                        help="records for (f) (default: 256 on a GPU, 4 batches of auto's "
                             "first 64; as --records with --tiny)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = TINY if args.tiny else SHAPES
    records = args.records or (12 if args.tiny else 96)
    batch = args.batch_size or 4
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {where}; torch {torch.__version__}; {records} records per shape, "
          f"batch {batch}, {dtype}".replace("torch.", ""))
    cols = ["shape", "records", "tokens/record", "batch", "a", "b", "c'", "c", "e", "e/b",
            "peak a", "peak b", "tokens/s", "share of bf16 peak"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    variants: list | None = None if args.no_variants else []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes.split(","):
            row = measure(name, shapes[name], device, dtype, records, batch,
                          min(args.authors_records, records), Path(tmp), variants, args.cap_gb,
                          args.f_records or (records if args.tiny else 256))
            print("| " + " | ".join(_fmt(c, row[c]) for c in cols) + " |", flush=True)
    if variants:
        cols = ["shape", "setting", "records/s", "×(b)", "peak GB"]
        print("\n| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for row in variants:
            print("| " + " | ".join(_fmt(c, row[c]) for c in cols) + " |", flush=True)


def _fmt(column: str, value) -> str:
    if not isinstance(value, float):
        return str(value)
    if value != value:
        return "—"
    return f"{value:.1%}" if column == "share of bf16 peak" else f"{value:.3g}"


if __name__ == "__main__":
    main()
