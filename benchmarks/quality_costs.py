"""CPU cost of the selection-quality benchmark's pieces, to size its mixtures: seconds per
training record (the recipe's fine-tune), the fixed cost of a run (a fresh LoRA copy of the
model), and seconds per held-out item (the teacher-forced evaluation).

    python benchmarks/quality_costs.py --threads 1 --shape a

Trains on 4 records (first-call costs, not counted), then on 16 and on 64 records of the
shape's mixture (the difference over 48 records is the per-record cost, without the fixed
cost), and evaluates 96 held-out items; prints wall and
process CPU seconds (CPU time is what two shards on two cores each get, whatever else runs).
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
import quality_mixture  # noqa: E402
from quality_train import Recipe, eval_items, evaluate, train  # noqa: E402


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--shape", default="a", choices=list(quality_mixture.SHAPES))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from tive.data.mixture import load_mixture
    from tive.models.encoding import encode_row, pad_id
    from tive.models.load import load_model
    from tive.models.registry import resolve

    mix, ev = quality_mixture.build(Path(tempfile.mkdtemp()), shape=args.shape)
    loaded = load_model(resolve(args.model), dtype="fp32", device="cpu")
    base, pad = loaded.model, pad_id(loaded.tokenizer)
    enc = loaded.encoder(Recipe.max_length)
    m = load_mixture(mix)
    pick = np.random.default_rng(0).permutation(len(m))[:64]
    records = [encode_row(enc, m, int(i)) for i in pick]
    train(base, records[:4], Recipe(), 0, pad)  # first-call costs (allocations, threads)
    t0 = clock()
    train(base, records[:16], Recipe(), 0, pad)
    t1 = clock()
    model, _ = train(base, records, Recipe(), 0, pad)
    t2 = clock()
    e = load_mixture(ev)
    held_enc = [encode_row(enc, e, int(i))
                for i in np.random.default_rng(1).permutation(len(e))[:96]]
    items = eval_items(held_enc, ["t"] * len(held_enc), [""] * len(held_enc))
    eos = [int(loaded.tokenizer.eos_token_id)]
    t3 = clock()
    evaluate(model, items, pad, eos)
    t4 = clock()
    per_record = [((t2[k] - t1[k]) - (t1[k] - t0[k])) / 48 for k in (0, 1)]
    fixed = [(t1[k] - t0[k]) - 16 * per_record[k] for k in (0, 1)]
    per_item = [(t4[k] - t3[k]) / len(items) for k in (0, 1)]
    out = {"shape": args.shape, "threads": args.threads,
           "train_tokens_per_record": float(np.mean([len(r.input_ids) for r in records])),
           "eval_tokens_per_item": float(np.mean([len(i.prompt) + len(i.target)
                                                  for i in items])),
           "train_s_per_record": {"wall": per_record[0], "cpu": per_record[1]},
           "run_fixed_s": {"wall": fixed[0], "cpu": fixed[1]},
           "eval_s_per_item": {"wall": per_item[0], "cpu": per_item[1]}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
