"""Stage 3 — the warm-up reference model: LoRA trained briefly on an equal-per-task sample.

DESIGN.md, method item 2: sample 8% of the mixture with an equal count per task (a task smaller
than its share gives all it has, the rest is shared among the others), then train LoRA
(r=128, alpha=256, one epoch; every linear layer of the language model, never the vision
tower) and save the adapter in standard peft format to ``RUN/reference/``, with
``reference.json`` saying what it was trained on. The folder appears only when complete.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from tive import selection as sel
from tive.data import Mixture
from tive.dist import Dist
from tive.encode import IGNORE, Encoded
from tive.errors import ConfigError, DataError
from tive.fileio import atomic_path

REFERENCE_DIR = "reference"


@dataclass(frozen=True)
class WarmupConfig:
    """Warm-up settings (defaults: the authors')."""

    fraction: float = 0.08
    seed: int = 0
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    lr: float = 2e-4
    epochs: int = 1
    batch_size: int = 4
    grad_accum: int = 1
    bf16: bool = False
    max_length: int = 2048
    targets: tuple[str, ...] = ()  # LoRA layers by name (empty: every linear layer of the LLM)

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"--fraction {self.fraction}: expected a fraction in (0, 1]")
        for name in ("epochs", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected ≥ 1")
        if not self.lr > 0:
            raise ConfigError(f"--lr {self.lr}: expected a positive learning rate")


def warmup_sample(tasks: np.ndarray, keys: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Rows of the warm-up sample: ``round(fraction·N)`` records, an equal count per task.

    A task with fewer records than its share gives all it has and the others share the rest
    (equal water-filling); within a task records are drawn uniformly, seeded, from their keys.

    Returns:
        sorted ``(n,)`` int64 rows.
    """
    names, codes = np.unique(tasks.astype(str), return_inverse=True)
    sizes = np.bincount(codes, minlength=len(names))
    total = max(1, int(math.floor(fraction * len(tasks) + 0.5)))
    quotas = sel.quotas(np.ones(len(names)), sizes, min(total, int(sizes.sum())), oversample=False)
    noise = sel.uniforms(keys, seed)
    rows = []
    for t, q in enumerate(quotas):
        members = np.flatnonzero(codes == t)
        rows.append(members[sel.top_n(noise[members], int(q), noise[members])])
    return np.sort(np.concatenate(rows))


def usable_rows(mixture: Mixture, missing: np.ndarray, family: str) -> np.ndarray:
    """Rows the warm-up can sample: images present, and no images for a text-only model.

    Raises:
        DataError: when no record is left.
    """
    usable = ~missing
    if family == "causal-lm":
        usable &= np.array([not r.images for r in mixture])
    if not usable.any():
        why = "all have missing images" if missing.all() else (
            "a text-only model cannot use records with images" if family == "causal-lm"
            else "their images are missing")
        raise DataError(f"{mixture.path}: none of the {len(mixture):,} records can be used for "
                        f"warm-up ({why}); fix: --image-root, or another --model or --data")
    return np.flatnonzero(usable)


def item_batches(loaded: Any, mixture: Mixture, rows: np.ndarray, batch_size: int,
                 max_length: int, image_root: Any = None,
                 skipped: dict[str, int] | None = None,
                 used: list[int] | None = None) -> Iterator[list[Encoded]]:
    """The records at ``rows`` encoded, ``batch_size`` a list; records that cannot be encoded
    are counted in ``skipped`` (reason → count) and left out, the others appended to ``used``."""
    from tive.encode import encode_row

    encoder = loaded.encoder(max_length)
    batch: list[Encoded] = []
    for row in rows:
        item = encode_row(encoder, mixture, int(row), image_root)
        if isinstance(item, str):
            _count(skipped, item)
            continue
        batch.append(item)
        if used is not None:
            used.append(int(row))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def train(loaded: Any, mixture: Mixture, rows: np.ndarray, config: WarmupConfig,
          image_root: Any = None, progress: bool = True, dist: Dist | None = None
          ) -> dict[str, Any]:
    """Train LoRA on ``rows``; return the peft model and the per-batch losses.

    The loss is the model's own (token mean over the batch), as LLaVA and Bunny train; an
    optimizer step takes ``grad_accum`` batches of ``batch_size`` records (each batch's loss
    divided by ``grad_accum``). Under ``torchrun`` (``dist``) the records of a step are cut
    into one contiguous share per rank; a rank's part of a batch weighs its token-mean loss by
    its share of the batch's supervised tokens, and the gradients are summed over the ranks
    before the step — so N processes compute the gradient one does (up to float rounding; LoRA
    dropout draws other masks).
    """
    from peft import get_peft_model
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from tive.encode import pad_id
    from tive.lora import key_parameters, lora_config, warmup_targets

    dist = Dist() if dist is None else dist
    torch.manual_seed(config.seed)
    targets = warmup_targets(loaded.model, tuple(config.targets))
    model = get_peft_model(loaded.model, lora_config(loaded.model, config.r, config.alpha,
                                                     config.dropout, targets))
    if dist.world > 1:  # the same initial adapter everywhere, other dropout masks per rank
        torch.manual_seed(config.seed + 1 + dist.rank)
    key_parameters(model)  # the adapter must cover the key parameters: refuse before training
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    steps = config.epochs * math.ceil(len(rows) / (config.batch_size * config.grad_accum))
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(0.03 * steps), steps)
    run = _StepRunner(model, pad_id(loaded.tokenizer), config, dist)
    skipped: dict[str, int] = {}
    used: list[int] = []
    model.train()
    bar = tqdm(total=len(rows) * config.epochs, unit="rec",
               disable=not progress or dist.rank != 0, desc="warm-up")
    for epoch in range(config.epochs):
        order = np.random.default_rng(config.seed + epoch).permutation(rows)
        first = epoch == 0  # count skips and trained records once, not once per epoch
        # every rank encodes every record, so that all agree on the batches (skips included)
        batches = item_batches(loaded, mixture, order, config.batch_size, config.max_length,
                               image_root, skipped if first else None, used if first else None)
        step: list[list[Encoded]] = []
        for items in batches:
            step.append(items)
            if len(step) == config.grad_accum:
                run(step, bar)
                _step(optimizer, schedule, params, dist)
                step = []
        if step:  # the last, partial accumulation
            run(step, bar)
            _step(optimizer, schedule, params, dist)
    bar.close()
    losses = run.losses()
    if not losses:
        reasons = ", ".join(f"{n} {r}" for r, n in skipped.items())
        raise DataError(f"{mixture.path}: none of the {len(rows):,} sampled records could be "
                        f"encoded ({reasons}); nothing was trained or saved; fix: check "
                        f"--max-length and that the model fits the data")
    model.eval()
    return {"model": model, "losses": losses, "skipped": skipped, "used": np.array(used),
            "processes": dist.world, "records_per_process": dist.gather(run.records)}


def supervised_tokens(item: Encoded) -> int:
    """Positions whose next token is supervised: the count behind the model's token mean."""
    return sum(1 for label in item.labels[1:] if label != IGNORE)


class _StepRunner:
    """Forward and backward of this rank's share of one optimizer step's batches."""

    def __init__(self, model: Any, pad: int, config: WarmupConfig, dist: Dist) -> None:
        self.model, self.pad, self.config, self.dist = model, pad, config, dist
        self.device = next(model.parameters()).device
        self.records = 0  # records this rank has run
        self.batches = 0  # batches of all ranks so far
        self.mine: list[tuple[int, float]] = []  # (batch number, Σ of its token losses here)
        self.totals: list[int] = []  # supervised tokens of every batch

    def __call__(self, step: list[list[Encoded]], bar: Any) -> None:
        from tive.encode import collate

        flat = [(b, item, supervised_tokens(item)) for b, items in enumerate(step)
                for item in items]
        totals = [0] * len(step)
        for b, _, n in flat:
            totals[b] += n
        self.dist.same((len(flat), sum(totals)), "warm-up step")
        share = flat[self.dist.rank * len(flat) // self.dist.world:
                     (self.dist.rank + 1) * len(flat) // self.dist.world]
        for b in sorted({b for b, _, _ in share}):
            mine = [(item, n) for c, item, n in share if c == b]
            tokens = sum(n for _, n in mine)
            batch = {k: v.to(self.device)
                     for k, v in collate([item for item, _ in mine], self.pad).items()
                     if v is not None}
            with torch.autocast(self.device.type, dtype=torch.bfloat16,
                                enabled=self.config.bf16):
                loss = self.model(**batch).loss
            # the whole batch's token mean, of which these records hold tokens / total
            (loss * (tokens / max(totals[b], 1)) / self.config.grad_accum).backward()
            value = loss.item()
            self.mine.append((self.batches + b, value * tokens))
            self.records += len(mine)
            bar.set_postfix(loss=f"{value:.3f}")
        self.batches += len(step)
        self.totals.extend(totals)
        bar.update(len(flat))

    def losses(self) -> list[float]:
        """Every batch's loss (its token mean), in order, gathered from all ranks."""
        sums = np.zeros(self.batches)
        for part in self.dist.gather(self.mine):
            for b, value in part:
                sums[b] += value
        return [float(s / max(t, 1)) for s, t in zip(sums, self.totals)]


def save_reference(run: str | Path, model: Any, info: dict[str, Any]) -> Path:
    """Save the adapter (peft format) and ``reference.json`` to ``run/reference`` atomically."""
    target = Path(run) / REFERENCE_DIR
    with atomic_path(target, directory=True) as tmp:
        model.save_pretrained(str(tmp))
        (tmp / "reference.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return target


def reference_info(mixture: Mixture, tasks: np.ndarray, rows: np.ndarray,
                   config: WarmupConfig, source: dict[str, Any],
                   result: dict[str, Any]) -> dict[str, Any]:
    """What the adapter was trained on, for ``reference.json``."""
    from tive.lora import gradient_dim, key_parameters

    names, counts = np.unique(tasks[result["used"]].astype(str), return_counts=True)
    losses = result["losses"]
    keys = key_parameters(result["model"])
    return {
        "model": source,
        "data": {"path": str(mixture.path.resolve()), "fingerprint": mixture.fingerprint,
                 "records": len(mixture)},
        "settings": asdict(config),
        "sample": {"rows": [int(r) for r in rows], "trained": len(result["used"]),
                   "per_task": {str(n): int(c) for n, c in zip(names, counts)}},
        "loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None,
                 "steps": len(losses)},
        "skipped": result["skipped"],
        "processes": result["processes"],
        "records_per_process": result["records_per_process"],  # forward passes, all epochs
        "key_parameters": {"gradient_dim": gradient_dim(keys),
                           "matrices": [{"name": k.name, "shape": list(k.shape)} for k in keys]},
    }


@dataclass
class Reference:
    """The warm-up reference of a run.

    Attributes:
        path: the adapter folder (``RUN/reference``).
        info: its ``reference.json``.
        model: the peft model when trained just now (None when an earlier one was reused).
        loaded: the loaded base model and its encoding pieces, with ``model``.
        message: one line saying what happened.
    """

    path: Path
    info: dict[str, Any]
    model: Any = None
    loaded: Any = None
    message: str = ""


def ensure_reference(run: str | Path, source: Any, mixture: Mixture, labels: Any,
                     config: WarmupConfig, *, dtype: str = "auto", device: str = "auto",
                     image_root: Any = None, missing: np.ndarray | None = None,
                     retrain: bool = False, replace: bool = False,
                     progress: bool = True, dist: Dist | None = None) -> Reference:
    """Reuse ``run/reference`` when it was trained with these settings, else train it (under
    ``torchrun``, on every rank of ``dist`` together; rank 0 saves it).

    Args:
        source: the resolved model (:func:`tive.models.registry.resolve`).
        labels: the mixture's task labels.
        missing: ``(N,)`` records whose images are missing (left out of the sample).
        retrain: train again even when the settings match.
        replace: replace a reference trained with other settings instead of refusing.

    Raises:
        ConfigError: a reference with other settings is there (and neither flag is given).
    """
    from tive.models.load import load_model

    missing = np.zeros(len(mixture), dtype=bool) if missing is None else missing
    usable = usable_rows(mixture, missing, source.family)
    rows = usable[warmup_sample(labels.tasks[usable], mixture.keys[usable], config.fraction,
                                config.seed)]
    identity = {"model": source.spec, "dtype": dtype, "data": mixture.fingerprint,
                "settings": json.loads(json.dumps(asdict(config))),
                "rows": [int(r) for r in rows], "tasks": sorted(set(labels.tasks[rows]))}
    existing = Path(run) / REFERENCE_DIR / "reference.json"
    if existing.exists() and not retrain:
        done = json.loads(existing.read_text(encoding="utf-8"))
        if done.get("identity") == identity:
            return Reference(existing.parent, done, message=(
                f"{existing.parent}: reference already trained with these settings "
                f"({done['sample']['trained']:,} records, loss {done['loss']['first']:.4g} "
                f"→ {done['loss']['last']:.4g})"))
        if not replace:
            raise ConfigError(f"{existing.parent}: a reference trained on "
                              f"{done['data']['path']} with model {done['model']['spec']} and "
                              f"other settings or sample is there; fix: --force to replace "
                              f"it, or another --run")
    loaded = load_model(source, dtype=dtype, device=device)
    dist = Dist() if dist is None else dist
    result = train(loaded, mixture, rows, config, image_root, progress=progress, dist=dist)
    info = reference_info(mixture, labels.tasks, rows, config, source.describe(), result)
    path = Path(run) / REFERENCE_DIR
    if dist.rank == 0:
        path = save_reference(run, result["model"], {**info, "identity": identity})
    dist.barrier()
    loss, per_task = info["loss"], info["sample"]["per_task"]
    skipped = ", ".join(f"{n:,} {r}" for r, n in result["skipped"].items())
    message = (f"trained on {info['sample']['trained']:,} records "
               f"({', '.join(f'{t} {n}' for t, n in per_task.items())}); "
               f"loss {loss['first']:.4g} → {loss['last']:.4g}; adapter in {path}"
               + (f"; skipped {skipped}" if skipped else ""))
    return Reference(path, info, result["model"], loaded, message)


def _step(optimizer: torch.optim.Optimizer, schedule: Any, params: list, dist: Dist) -> None:
    dist.sum_grads(params)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad()


def _count(counter: dict[str, int] | None, reason: str) -> None:
    if counter is not None:
        counter[reason] = counter.get(reason, 0) + 1
