"""Fidelity of projected features: do they rank records as the exact gradients do?

On the example mixture and the example model (``examples/llava-smollm2``: SmolLM2-135M as its
language model), after a short warm-up (LoRA r=8 on every linear layer of the LLM, 8% equal
per task, as ``tive warmup`` trains it), the exact per-sample key-parameter gradients of all
records are computed (``--projector none``). Then for each projector and k:

* per task, Spearman's ρ between instance values from the projected features (stored as
  float16, as the store keeps them) and instance values from the exact gradients;
* the relative error task values would have if computed from projected norms ‖φ‖ instead of
  the exact ‖g‖ that tive stores (tive's own task values use ‖g‖: error 0 by construction).

Target (issue "Benchmarks"): ρ ≥ 0.98 at k = 8192.

With ``--key-layers last:8,...`` it also compares the features of the last N layers' key
parameters with those of every layer (``tive score --key-layers``), and times both.

With ``--precision`` it compares the exact gradients of the same reference in bfloat16 weights
(``--precision bfloat16,float16``: also float16, the TIVE authors'), with float32 LoRA matrices
(peft's default, ``--adapter-dtype float32``) and with LoRA matrices of the weights' type
(``--adapter-dtype model``), against float32 weights: per-record cosine and relative error,
and how the instance and task values rank.

    python examples/build_model.py          # once
    python benchmarks/fidelity.py
    python benchmarks/fidelity.py --dims "" --trak-dims "" --key-layers last:4,last:8,last:16
    python benchmarks/fidelity.py --dims "" --trak-dims "" --key-layers "" --precision
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "llava_mini" / "mix.json"
EXAMPLE_MODEL = ROOT / "examples" / "llava-smollm2"


def reference_model(r: int):
    """The example model with a freshly trained warm-up adapter, and the mixture."""
    from tive.data.mixture import load_mixture
    from tive.data.tasks import label_tasks
    from tive.models.load import load_model
    from tive.models.registry import resolve
    from tive.warmup.settings import WarmupConfig
    from tive.warmup.training import train, warmup_sample

    if not (EXAMPLE_MODEL / "config.json").exists():
        sys.exit(f"{EXAMPLE_MODEL}: missing; run `python examples/build_model.py` first")
    loaded = load_model(resolve(str(EXAMPLE_MODEL)), dtype="fp32", device="cpu")
    mixture = load_mixture(EXAMPLE)
    tasks = label_tasks(mixture).tasks
    # the example's 17-record sample: steps of 4 at LLaVA's LoRA rate (README, Quick start)
    config = WarmupConfig(r=r, alpha=2 * r, max_length=512, global_batch=4, lr=2e-4)
    rows = warmup_sample(tasks, mixture.keys, config.fraction, config.seed)
    model = train(loaded, mixture, rows, config, progress=False)["model"]
    return model, loaded, mixture, tasks


def exact_gradients(model, loaded, mixture, batch_size: int = 8,
                    dtype: torch.dtype = torch.float32
                    ) -> tuple[np.ndarray, np.ndarray, list[int], float]:
    """``(N, D)`` exact gradients (float32), ``(N,)`` norms, the block lengths and the seconds
    the extraction took (encoding excluded); images in ``dtype`` (the model's)."""
    from tive.models.encoding import collate, encode_row, pad_id
    from tive.projection.projectors import Identity
    from tive.scoring.gradients import GradientFeatures
    from tive.warmup.lora import key_parameters

    encoder = loaded.encoder(512)
    items = [encode_row(encoder, mixture, i) for i in range(len(mixture))]
    assert not any(isinstance(x, str) for x in items), "every example record encodes"
    batches = [{k: v.to(dtype) if v is not None and v.is_floating_point() else v
                for k, v in collate(items[i:i + batch_size], pad_id(loaded.tokenizer)).items()}
               for i in range(0, len(items), batch_size)]
    dims = [k.numel for k in key_parameters(model)]
    rows, norms = [], []
    start = time.perf_counter()
    with GradientFeatures(model, Identity(dims)) as gf:
        for batch in batches:
            res = gf(batch)
            rows.append(res.features.astype(np.float32))
            norms.append(res.norms)
    return np.concatenate(rows), np.concatenate(norms), dims, time.perf_counter() - start


def values(feats: np.ndarray, norms: np.ndarray, codes: np.ndarray,
           n_tasks: int) -> tuple[np.ndarray, np.ndarray]:
    """``(N,)`` instance values of ``feats`` and ``(T,)`` task values of ``norms``, every row
    valid."""
    from tive.selection.values import instance_values, task_values

    valid = np.ones(len(feats), dtype=bool)
    return (instance_values(feats, codes, n_tasks, valid)[0],
            task_values(norms, codes, n_tasks, valid))


def task_rhos(got: np.ndarray, truth: np.ndarray, codes: np.ndarray, n_tasks: int) -> list[float]:
    """Spearman ρ of ``got`` against ``truth`` within each task."""
    return [spearmanr(got[codes == t], truth[codes == t]).statistic for t in range(n_tasks)]


def project(kind: str, k: int, grads: np.ndarray, dims: list[int]) -> np.ndarray:
    """Features of ``grads`` with projector ``kind`` at ``k``, as float16 (the store's)."""
    from tive.projection.projectors import make_projector, project_rows

    out = project_rows(make_projector(kind, dims, k, seed=0), torch.from_numpy(grads),
                       dims).numpy()
    if kind == "trak":
        out = out / np.sqrt(k)  # TRAK's ±1 entries are unscaled; fp16 needs the range
    return out.astype(np.float16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", type=int, default=8, help="LoRA rank of the warm-up")
    parser.add_argument("--dims", default="1024,4096,8192,16384",
                        help="k for the sparse JL projector")
    parser.add_argument("--trak-dims", default="1024,4096,8192",
                        help="k for TRAK's CPU projector (minutes each; empty: none)")
    parser.add_argument("--key-layers", default="last:8,last:16",
                        help="--key-layers settings to compare with every layer (empty: none)")
    parser.add_argument("--precision", nargs="?", const="bfloat16", default="",
                        help="compare 16-bit weights (bfloat16, float16 or both, comma-separated; "
                             "default bfloat16) with float32 LoRA matrices or LoRA matrices of "
                             "their type (--adapter-dtype) against float32 weights; float16 "
                             "matmuls are slow on most CPUs")
    args = parser.parse_args()
    model, loaded, mixture, tasks = reference_model(args.r)
    names, codes = np.unique(tasks.astype(str), return_inverse=True)
    needed = args.precision or args.dims or args.trak_dims  # computed once for both uses
    exact = exact_gradients(model, loaded, mixture) if needed else None
    if args.precision:
        precision(model, loaded, mixture, codes, names,
                  [getattr(torch, d) for d in args.precision.split(",") if d], exact)
    if args.key_layers:
        key_layers(model, loaded, mixture, codes, names,
                   [s for s in args.key_layers.split(",") if s])
    if not (args.dims or args.trak_dims):
        return
    grads, norms, dims, _ = exact
    truth, exact_tv = values(grads, norms, codes, len(names))
    print(f"\nfidelity on {len(grads)} records, {len(names)} tasks, D = {grads.shape[1]:,} "
          f"(LoRA r = {args.r}), features stored as float16\n")
    print("per task: records, and spread (std) of the exact instance values — rankings are "
          "fragile where values nearly tie:\n")
    print("| " + " | ".join(str(n) for n in names) + " |")
    print("|" + "---|" * len(names))
    print("| " + " | ".join(f"{int((codes == t).sum())}, {truth[codes == t].std():.3f}"
                           for t in range(len(names))) + " |\n")
    print("| projector | k | ρ min over tasks | ρ median | tasks with ρ ≥ 0.98 | ρ all records | "
          "ρ per task | task values from ‖φ‖: max rel. error | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    runs = [("sparse-jl", int(k)) for k in args.dims.split(",") if k] + \
        [("trak", int(k)) for k in args.trak_dims.split(",") if k]
    for kind, k in runs:
        start = time.perf_counter()
        feats = project(kind, k, grads, dims)
        seconds = time.perf_counter() - start
        pn = np.linalg.norm(feats.astype(np.float64), axis=1)
        iv, tv = values(feats, pn, codes, len(names))
        rho = dict(zip((str(n) for n in names), task_rhos(iv, truth, codes, len(names))))
        tv_err = float(np.max(np.abs(tv - exact_tv) / exact_tv))
        per_task = ", ".join(f"{n} {v:.3f}" for n, v in rho.items())
        good = sum(v >= 0.98 for v in rho.values())
        pooled = spearmanr(iv, truth).statistic
        print(f"| {kind} | {k} | {min(rho.values()):.4f} | "
              f"{float(np.median(list(rho.values()))):.4f} | {good} of {len(rho)} | "
              f"{pooled:.4f} | {per_task} | {tv_err:.2%} | {seconds:.1f} |")


def key_layers(model, loaded, mixture, codes, names, settings) -> None:
    """``--key-layers last:N`` against every layer, both extracted as ``tive score`` does
    (sparse JL, k = 8192, float16 rows): Spearman ρ of the instance values per task and over
    all records, Spearman ρ of the task values (exact norms of each), and the speed-up of the
    extraction (one timed pass each over the same batches, after a warm-up batch)."""
    from tive.models.encoding import collate, encode_row, pad_id
    from tive.projection.projectors import SparseJL
    from tive.scoring.gradients import GradientFeatures
    from tive.scoring.settings import parse_key_layers
    from tive.warmup.lora import key_parameters

    encoder = loaded.encoder(512)
    items = [encode_row(encoder, mixture, i) for i in range(len(mixture))]
    batches = [collate(items[i:i + 8], pad_id(loaded.tokenizer)) for i in range(0, len(items), 8)]

    def run(last):
        dims = [k.numel for k in key_parameters(model, last_layers=last)]
        feats, norms = [], []
        with GradientFeatures(model, SparseJL(dims, K_KEY, seed=0), last_layers=last) as gf:
            gf(batches[0])  # warm-up, not timed
            start = time.perf_counter()
            for batch in batches:
                res = gf(batch)
                feats.append(res.features)
                norms.append(res.norms)
            seconds = time.perf_counter() - start
        return np.concatenate(feats).astype(np.float16), np.concatenate(norms), seconds, dims

    every, every_norms, every_seconds, every_dims = run(None)
    truth, exact_tv = values(every, every_norms, codes, len(names))
    layers = len({k.name.split(".self_attn.")[0] for k in key_parameters(model)})
    print(f"\n--key-layers against all {layers} layers (D = {sum(every_dims):,}), sparse JL "
          f"k = {K_KEY}, float16; one extraction pass over the {len(items)} records:\n")
    print("| key layers | D | instance values ρ: min over tasks | median | all records | "
          "task values ρ | extraction speed-up |")
    print("|---|---|---|---|---|---|---|")
    for setting in settings:
        feats, norms, seconds, dims = run(parse_key_layers(setting))
        iv, tv = values(feats, norms, codes, len(names))
        rho = task_rhos(iv, truth, codes, len(names))
        print(f"| {setting} | {sum(dims):,} | {min(rho):.4f} | {float(np.median(rho)):.4f} | "
              f"{spearmanr(iv, truth).statistic:.4f} | "
              f"{spearmanr(tv, exact_tv).statistic:.4f} | {every_seconds / seconds:.2f}× |")


def precision(model, loaded, mixture, codes, names, dtypes: list[torch.dtype],
              exact: tuple) -> None:
    """Exact gradients in 16-bit weights (``dtypes``), each with float32 LoRA matrices
    (peft's default on a 16-bit model) and with LoRA matrices of the weights' type
    (``--adapter-dtype model``), against float32 weights: cosine and relative error per
    record, Spearman ρ of the instance values per task and of the task values, and the
    extraction's seconds (on this machine's CPU, not a GPU's). ``exact``:
    :func:`exact_gradients` of the float32 model."""
    from tive.warmup.lora import adapters_to_model_dtype

    exact, exact_norms, dims, exact_seconds = exact
    truth, exact_tv = values(exact, exact_norms, codes, len(names))
    print(f"\n16-bit weights against float32 weights, exact gradients (D = {sum(dims):,}), "
          f"{len(exact)} records; seconds: one extraction pass on this CPU\n")
    print("| weights | LoRA matrices | cosine to float32: median | min | relative error: median "
          "| max | instance values ρ: min over tasks | median | all records | task values ρ | "
          "max rel. error | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| float32 | float32 | 1 | 1 | 0 | 0 | 1 | 1 | 1 | 1 | 0 | {exact_seconds:.1f} |")
    for dtype in dtypes:
        half = copy.deepcopy(model).to(dtype)
        for name, p in half.named_parameters():  # as peft loads an adapter onto the model
            if "lora_" in name:
                p.data = p.data.float()
        for adapters in ("float32", "model"):
            if adapters == "model":
                assert adapters_to_model_dtype(half) == dtype
            grads, norms, _, seconds = exact_gradients(half, loaded, mixture, dtype=dtype)
            cos = (grads * exact).sum(1) / (np.linalg.norm(grads, axis=1)
                                            * np.linalg.norm(exact, axis=1))
            err = np.linalg.norm(grads - exact, axis=1) / np.linalg.norm(exact, axis=1)
            iv, tv = values(grads, norms, codes, len(names))
            rho = task_rhos(iv, truth, codes, len(names))
            print(f"| {str(dtype)[6:]} | {str(dtype)[6:] if adapters == 'model' else adapters} "
                  f"| {np.median(cos):.6f} | {cos.min():.6f} | {np.median(err):.4f} | "
                  f"{err.max():.4f} | {min(rho):.4f} | {float(np.median(rho)):.4f} | "
                  f"{spearmanr(iv, truth).statistic:.4f} | "
                  f"{spearmanr(tv, exact_tv).statistic:.4f} | "
                  f"{float(np.max(np.abs(tv - exact_tv) / exact_tv)):.2%} | {seconds:.1f} |",
                  flush=True)


K_KEY = 8192


if __name__ == "__main__":
    main()
