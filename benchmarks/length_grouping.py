"""Length-grouped batches against consecutive ones: padding and records/s of `tive score`'s
extraction on the same model and records.

`tive score` batches the records of each window of 64 batches longest first
(``--group-by-length``, the default) instead of in file order (``--no-group-by-length``). The
features do not depend on the batching beyond float rounding (tests/test_score.py); this
script measures what it saves. Per model, the example mixture is encoded once; then, in
alternating passes over all its records, (g) length-grouped batches and (f) batches in file
order go through the same extraction as ``throughput.py``'s (b) — per-sample gradients, sparse
JL to k = 8192 in the hooks, rows written to a store. Reported: tokens computed per real token
(padding included), records/s, and their ratios.

    python examples/build_model.py                       # once: examples/llava-smollm2
    python benchmarks/length_grouping.py                 # tiny-llava, llava-smollm2, smollm2-135m
    python benchmarks/length_grouping.py --spread 6          # lengths spread like a real mix
    python benchmarks/length_grouping.py --models tiny-llava --batch-size 16 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import EXAMPLE, K, example_model, lora, smollm2, tiny_llava  # noqa: E402


def _no_image(text: str) -> str:
    return text.replace("<image>\n", "").replace("<image>", "")


def mixture_and_items(encoder, text_only: bool, spread: int) -> tuple:
    """The example mixture (images dropped for a text model; with ``spread`` > 1, each
    record's conversation repeated a seeded 1..spread times) and its records encoded once,
    row for row."""
    from tive.data.mixture import load_mixture
    from tive.models.encoding import encode_row

    records = json.loads(EXAMPLE.read_text())
    rng = np.random.default_rng(0)
    for r in records:
        if text_only:
            r.pop("image", None)
            for t in r["conversations"]:
                t["value"] = _no_image(t["value"])
        turns = r["conversations"]
        again = [{**t, "value": _no_image(t["value"])} for t in turns]
        r["conversations"] = turns + again * int(rng.integers(0, spread))
    path = Path(tempfile.mkdtemp()) / "mix.json"
    path.write_text(json.dumps(records))
    mixture = load_mixture(path)
    items = [encode_row(encoder, mixture, i, EXAMPLE.parent) for i in range(len(mixture))]
    if any(isinstance(x, str) for x in items):
        sys.exit("a record of the example could not be encoded")
    return mixture, items


def one_pass(gf, writer, items: list, plan: list, pad: int) -> tuple[float, int]:
    """Extract and write every batch of ``plan``; seconds, and tokens computed (padded)."""
    from tive.models.encoding import collate

    seconds, padded = 0.0, 0
    for rows in plan:
        batch = collate([items[i] for i in rows.tolist()], pad)
        start = time.perf_counter()
        res = gf(batch)
        writer.write(rows, res.features, res.norms, res.loss, res.ntokens,
                     np.zeros(len(rows), dtype=np.int8))
        seconds += time.perf_counter() - start
        padded += int(batch["input_ids"].numel())
    return seconds, padded


def measure(name: str, model, encoder, pad: int, text_only: bool, batch_size: int,
            rounds: int, spread: int) -> dict:
    from tive.projection.projectors import SparseJL
    from tive.scoring.gradients import GradientFeatures
    from tive.scoring.plan import plan_batches, record_lengths
    from tive.store.format import IndexEntry
    from tive.store.writers import RowWriter, create_store
    from tive.warmup.lora import key_parameters

    mixture, items = mixture_and_items(encoder, text_only, spread)
    n = len(items)
    plans = {"f": plan_batches(n, batch_size),
             "g": plan_batches(n, batch_size, record_lengths(mixture, encoder))}
    model = lora(model)
    dims = [k.numel for k in key_parameters(model)]
    meta = {"projector": {"type": "sparse-jl"}, "data": {"path": "-", "fingerprint": "-"}}
    store = create_store(Path(tempfile.mkdtemp()) / "store", n=n, k=K, meta=meta,
                         index=[IndexEntry(str(i), "t", i) for i in range(n)])
    writer = RowWriter(store.root)
    seconds = {"f": [], "g": []}
    padded = {}
    with GradientFeatures(model, SparseJL(dims, K, seed=0)) as gf:
        one_pass(gf, writer, items, plans["f"][:1], pad)  # warm-up, not timed
        for _ in range(rounds):
            for kind in ("g", "f"):
                s, padded[kind] = one_pass(gf, writer, items, plans[kind], pad)
                seconds[kind].append(s)
    writer.close()
    real = sum(len(x.input_ids) for x in items)
    med = {k: float(np.median(v)) for k, v in seconds.items()}
    return {"model": name, "records": n, "tokens/record": real / n,
            "pad_f": padded["f"] / real, "pad_g": padded["g"] / real,
            "f": n / med["f"], "g": n / med["g"], "rounds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-llava,llava-smollm2,smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="alternating passes of each")
    parser.add_argument("--spread", type=int, default=1,
                        help="repeat each record's conversation a seeded 1..SPREAD times, "
                             "for lengths that spread more (default 1: as is)")
    args = parser.parse_args()
    names = args.models.split(",")
    example = example_model() if {"tiny-llava", "llava-smollm2"} & set(names) else None
    rows = []
    for name in names:
        if name == "smollm2-135m":
            model, encoder, pad = smollm2()
        elif name == "llava-smollm2":
            model, encoder, pad = example
        elif name == "tiny-llava":
            model, encoder, pad = tiny_llava(example)
        else:
            sys.exit(f"unknown model {name}")
        rows.append(measure(name, model, encoder, pad, name == "smollm2-135m",
                            args.batch_size, args.rounds, args.spread))
    print(f"\nlength-grouped (g) against file-order (f) batches; CPU, "
          f"{torch.get_num_threads()} threads, batch {args.batch_size}, k = {K}, LoRA r = 128, "
          f"conversations repeated 1..{args.spread}x, median of {args.rounds} alternating "
          "passes\n")
    print("| model | records | tokens/record | tokens computed per real token, (f) | (g) | "
          "records/s (f) | (g) | (g)/(f) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['records']} | {r['tokens/record']:.0f} | {r['pad_f']:.2f} | "
              f"{r['pad_g']:.2f} | {r['f']:.2f} | {r['g']:.2f} | {r['g'] / r['f']:.2f} |")
    for r in rows:
        n = r["records"]
        per = "; ".join(f"({k}) " + ", ".join(f"{n / s:.2f}" for s in v)
                        for k, v in r["rounds"].items())
        print(f"{r['model']}: records/s per pass: {per}")


if __name__ == "__main__":
    main()
