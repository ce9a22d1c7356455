"""Column (d) of throughput.py: EleutherAI's bergson on the same work, side by side with tive.

On smollm2-135m with LoRA as throughput.py sets it up (r=128, alpha=256, every linear layer of
the language model), the same records (the example mixture, text-only, encoded once) and the
same batches of 8, records/s of

  (b) tive's extraction exactly as throughput.py measures it (``throughput.tive_step``: per-
      sample gradients of the key LoRA matrices — A and B of every self-attention projection —
      in one batched backward, sparse JL to k = 8192 inside the hooks, rows to a tive store);
  (d) bergson's ``collect_gradients`` over the same records and batches, hooked on the same
      key LoRA matrices (the peft ``lora_A``/``lora_B`` Linear modules of q, k, v, o), with its
      default per-module projection: each module's [out, in] gradient G_i = Σ_t g_t a_tᵀ is
      sketched to L G_i Rᵀ, a p × p matrix (L: p × out, R: p × in, Rademacher / √p, Philox-
      seeded by module name), so the store holds p² numbers per module, 240 modules here
      (p = 6: 8,640 in all, the closest to tive's 8192); written to bergson's on-disk index
      (a memory-mapped ``gradients.bin``) as its ``build`` does; the whole call is timed
      (its collation from a ``datasets.Dataset``, hooks, index file, and the teardown that
      saves ``data.hf`` and the processor). The per-record loss is the
      token mean (``loss_reduction="mean"``, tive's loss; bergson's default is the token sum,
      which only scales each record's gradient by its supervised-token count). The model's
      gradient settings are bergson's own (as ``bergson build`` sets them: nothing requires
      grad but the input embeddings, so activation gradients flow to the hooks — in SmolLM2
      the embeddings are tied to the output head, so every backward also forms the dense
      49152 × 576 gradient of that matrix); tive re-arms its own on every call;
  (d') the same as (d), but with tive's gradient settings (only the key LoRA weights require
      grad), which spares bergson that dense gradient.

Each timed pass covers every record; the first batch of each is run once beforehand as a
warm-up. Passes of (b), (d) and (d') alternate for ``--rounds`` rounds and the medians are reported.
Before timing, a check that the two compute the same per-sample gradients: on the first batch,
bergson without projection (``InMemoryCollector``) against tive's full per-sample key
gradients and exact norms, with the token-mean loss and with bergson's default token-sum loss
divided by each record's supervised-token count.

bergson's other scheme, ``projection_target="global"`` (each module's flattened gradient
times its own dense p × d_i matrix, summed: one p-vector, p = 8192 possible), regenerates those
matrices block by block on every batch (8192 × 14.7M Philox draws here), as TRAK's CPU
projector does in (c); it is not run.

Runs in an environment with both bergson (2.5.1) and tive installed:

    python benchmarks/bergson_throughput.py
    python benchmarks/bergson_throughput.py --rounds 5 --projection-dim 16
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from tive.store.format import Store

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402

K = throughput.K


class FullBlocks:
    """A tive projector that keeps every per-sample gradient block (for the check only)."""

    kind = "identity"

    def __init__(self, dims: list[int]) -> None:
        self.dims = dims
        self.dim = sum(dims)

    def start(self, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        self.blocks: dict[int, torch.Tensor] = {}

    def add(self, block: int, grads: torch.Tensor) -> None:
        self.blocks[block] = grads.detach().clone()

    def finish(self) -> torch.Tensor:
        return torch.cat([self.blocks[i] for i in range(len(self.dims))], dim=1)

    def describe(self) -> dict:
        return {"type": self.kind, "dim": self.dim}


def bergson_data(items: list):
    """The encoded records as the Hugging Face dataset bergson reads (input_ids, labels)."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [list(x.input_ids) for x in items],
                              "labels": [list(x.labels) for x in items]})


def bergson_targets(peft_model, keys: list) -> list[str]:
    """tive's key parameters as bergson module names (relative to ``peft_model.base_model``,
    the module ``collect_gradients`` hooks), in the same order."""
    names = [k.name.removeprefix("base_model.").removesuffix(".weight") for k in keys]
    for name in names:
        if not isinstance(peft_model.base_model.get_submodule(name), torch.nn.Linear):
            sys.exit(f"{name}: not an nn.Linear; bergson cannot hook it")
    return names


def bergson_grad_settings(model, keys: list | None = None) -> None:
    """As ``bergson.utils.worker_utils.setup_model_and_peft``: no parameter requires grad but
    the input embeddings (tied to the output head in SmolLM2); with ``keys``, the key LoRA
    weights instead (tive's settings). Eval mode (no dropout)."""
    model.requires_grad_(False)
    if keys is None:
        model.get_input_embeddings().requires_grad_(True)
    else:
        params = dict(model.named_parameters())
        for k in keys:
            params[k.name].requires_grad_(True)
    model.eval()


def bergson_config(root: Path, p: int, reduction: str = "mean"):
    from bergson import IndexConfig

    return IndexConfig(run_path=str(root / "index"), projection_dim=p,
                       projection_type="rademacher", projection_scale="jl",
                       projection_target="per_module", loss_reduction=reduction)


def bergson_step(model, data, processor, targets: list[str], batches: list[list[int]],
                 p: int, keys: list | None = None) -> tuple[float, Path]:
    """(d), or (d') with ``keys``: bergson's collect_gradients over ``batches``; seconds and
    the index folder."""
    from bergson import collect_gradients

    root = Path(tempfile.mkdtemp())
    cfg = bergson_config(root, p)
    bergson_grad_settings(model, keys)
    start = time.perf_counter()
    collect_gradients(model, data, processor, cfg, batches=batches, target_modules=set(targets))
    return time.perf_counter() - start, cfg.partial_run_path


def tive_pass(gf, batch_list: list[dict], n: int) -> tuple[float, Store]:
    """(b) over every batch, into a fresh store, as throughput.measure times it; seconds and
    the store."""
    from tive.store.format import IndexEntry, Store
    from tive.store.writers import RowWriter, create_store

    meta = {"projector": {"type": "sparse-jl"}, "data": {"path": "-", "fingerprint": "-"}}
    store = create_store(Path(tempfile.mkdtemp()) / "store", n=n, k=K, meta=meta,
                         index=[IndexEntry(str(i), "t", i) for i in range(n)])
    writer = RowWriter(store.root)
    seconds, row = 0.0, 0
    for batch in batch_list:
        seconds += throughput.tive_step(gf, writer, batch, row)
        row += int(batch["input_ids"].shape[0])
    writer.close()
    return seconds, Store.open(store.root)


def check_same_gradients(model, items: list, pad: int, batch_size: int, keys: list,
                         targets: list[str]) -> list[str]:
    """bergson's unprojected per-sample gradients against tive's, on the first batch."""
    from bergson import CollectorComputer, GradientProcessor, InMemoryCollector

    from tive.models.encoding import collate
    from tive.scoring.gradients import GradientFeatures

    first = items[:batch_size]
    with GradientFeatures(model, FullBlocks([k.numel for k in keys])) as gf:
        res = gf(collate(first, pad))
        full = torch.from_numpy(res.features)  # (B, D): tive's exact per-sample gradients
    norms = torch.from_numpy(res.norms)
    ntokens = torch.from_numpy(res.ntokens).double()
    data = bergson_data(first)
    lines = []
    for reduction in ("mean", "sum"):
        root = Path(tempfile.mkdtemp())
        cfg = bergson_config(root, 0, reduction)
        cfg.partial_run_path.mkdir(parents=True)
        bergson_grad_settings(model)
        collector = InMemoryCollector(model=model.base_model, processor=GradientProcessor(),
                                      data=data, cfg=cfg, target_modules=set(targets))
        CollectorComputer(model, data, collector=collector, batches=[list(range(len(first)))],
                          cfg=cfg).run_with_collector_hooks(desc="check")
        grads = torch.cat([collector.gradients[t].double() for t in targets], dim=1)
        if reduction == "sum":
            grads /= ntokens[:, None]
        ours = full.double()
        rel_vec = ((grads - ours).norm(dim=1) / ours.norm(dim=1)).max().item()
        rel_norm = ((grads.norm(dim=1) - norms).abs() / norms).max().item()
        scaled = "" if reduction == "mean" else ", divided by supervised tokens"
        lines.append(f"bergson loss_reduction={reduction!r}{scaled}, first {len(first)} "
                     f"records, {grads.shape[1]:,} dims: max relative ‖g_bergson − g_tive‖ "
                     f"= {rel_vec:.1e}; max relative error of ‖g‖ against tive's exact "
                     f"norms = {rel_norm:.1e}")
        del collector, grads
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating timed passes of (b) and (d) over every record")
    parser.add_argument("--projection-dim", type=int, default=6,
                        help="bergson's per-module projection p (p × p per module)")
    parser.add_argument("--records", type=int, default=0,
                        help="only the first N records (0: all; for a quick try)")
    parser.add_argument("--skip-check", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    import bergson
    from bergson import GradientProcessor

    from tive.models.encoding import collate
    from tive.projection.projectors import SparseJL
    from tive.scoring.gradients import GradientFeatures
    from tive.warmup.lora import key_parameters

    logging.disable(logging.INFO)  # bergson logs its 240 module names on every call
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # layer 0's A
    import datasets

    datasets.disable_progress_bars()  # bergson saves its data.hf on every call
    model, encoder, pad = throughput.smollm2()
    items = throughput.encoded(encoder, text_only=True)
    items = items[:args.records] if args.records else items
    model = throughput.lora(model)
    keys = key_parameters(model)
    targets = bergson_targets(model, keys)
    n, bs, p = len(items), args.batch_size, args.projection_dim
    batch_list = [collate(items[i:i + bs], pad) for i in range(0, n, bs)]
    batches = [list(range(i, min(n, i + bs))) for i in range(0, n, bs)]
    data = bergson_data(items)

    check = [] if args.skip_check else check_same_gradients(model, items, pad, bs, keys,
                                                            targets)

    gf = GradientFeatures(model, SparseJL([k.numel for k in keys], K, seed=0))
    processor = GradientProcessor(projection_dim=p, projection_type="rademacher",
                                  projection_scale="jl", projection_target="per_module")
    # warm-up: the first batch once each, not timed
    tive_pass(gf, batch_list[:1], len(batches[0]))
    bergson_step(model, data.select(batches[0]), processor, targets, [batches[0]], p)
    times = {"b": [], "d": [], "d'": []}
    for r in range(args.rounds):
        b, store = tive_pass(gf, batch_list, n)
        d, index = bergson_step(model, data, processor, targets, batches, p)
        d2, _ = bergson_step(model, data, processor, targets, batches, p, keys)
        for name, t in (("b", b), ("d", d), ("d'", d2)):
            times[name].append(t)
        print(f"round {r + 1}: (b) tive {n / b:.2f}, (d) bergson {n / d:.2f}, (d') bergson "
              f"with tive's gradient settings {n / d2:.2f} rec/s", flush=True)
    gf.close()

    norms = np.array(store.array("norms"), dtype=np.float64)
    ours = np.linalg.norm(np.array(store.features, dtype=np.float64), axis=1) / norms
    theirs = np.linalg.norm(np.array(bergson.load_gradients(index), dtype=np.float64),
                            axis=1) / norms
    tokens = sum(len(x.input_ids) for x in items) / n
    rate = {name: n / statistics.median(t) for name, t in times.items()}
    rate_d2 = rate["d'"]
    print(f"\nthroughput, records/s (CPU, {torch.get_num_threads()} threads, batch {bs}, "
          f"LoRA r = 128; median of {args.rounds} alternating passes over every record)\n")
    print("| model | records | tokens/record | key-gradient dim D | bergson settings | "
          "(b) tive | (d) bergson | (d') bergson, tive's grad settings | (b)/(d) | (b)/(d') |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| smollm2-135m | {n} | {tokens:.0f} | {sum(k.numel for k in keys):,} | "
          f"{bergson.__version__}, per-module p = {p}: {p}×{p} × {len(targets)} modules = "
          f"{p * p * len(targets):,} dims, Rademacher, loss mean, on-disk index | "
          f"{rate['b']:.2f} | {rate['d']:.2f} | {rate_d2:.2f} | "
          f"{rate['b'] / rate['d']:.2f} | {rate['b'] / rate_d2:.2f} |")
    print("\nper round, records/s: " + "; ".join(
        f"({name}) " + ", ".join(f"{n / t:.2f}" for t in ts) for name, ts in times.items()))
    for name, ratio in ((f"tive's k = {K} sparse JL", ours),
                        (f"bergson's {p * p * len(targets):,} dims", theirs)):
        print(f"stored rows, {name}: ‖features‖ / exact ‖g‖ = {np.median(ratio):.3f} median, "
              f"{ratio.min():.3f}–{ratio.max():.3f} range over {n} records")
    for line in check:
        print(line)


if __name__ == "__main__":
    main()
