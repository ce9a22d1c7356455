"""Training the warm-up reference model: LoRA trained briefly on an equal-per-task sample.

The method (docs/design.md, "The method in brief"): sample 8% of the mixture with an equal
count per task (a task smaller than its share gives all it has, the rest is shared among the
others), then
train as the TIVE authors did (their ``finetune_lora.sh``): LoRA r=128, alpha=256, dropout
0.05 on every linear layer of the language model, the multimodal projector trained too,
AdamW at 2e-5 with weight decay 0, a cosine schedule after a 3% linear warm-up, one epoch, a
global batch of 128 records per optimizer step, each step all-image or all-text (their
``group_by_modality_length``); below 100 steps the batch is scaled down (:mod:`tive.warmup.plan`).
:mod:`tive.warmup.reference` saves the adapter and decides when an earlier one can be reused.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import numpy as np
import torch

from tive.data.mixture import Mixture
from tive.errors import DataError
from tive.models.encoding import collate, encode_row, pad_id
from tive.models.load import enable_checkpointing, quiet_peft, text_vocab
from tive.models.registry import family as family_named
from tive.models.segments import IGNORE, Encoded
from tive.models.skips import SkipReason
from tive.selection import quotas as sel
from tive.util.dist import Dist
from tive.warmup.lora import key_parameters, lora_config, trained_projector, warmup_targets
from tive.warmup.plan import WARMUP_RATIO, Recipe, modality_order, plan_recipe
from tive.warmup.checkpoints import Keeper, checkpoint_steps
from tive.warmup.moments import adam_moments
from tive.warmup.settings import WarmupConfig

WEIGHT_DECAY = 0.0
SCHEDULE = "cosine"


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

    Args:
        family: the model's family name.

    Raises:
        DataError: when no record is left.
    """
    text_only = family_named(family).text_only
    usable = ~missing
    if text_only:
        usable &= np.array([not r.images for r in mixture])
    if not usable.any():
        why = "all have missing images" if missing.all() else (
            "a text-only model cannot use records with images" if text_only
            else "their images are missing")
        raise DataError(f"{mixture.path}: none of the {len(mixture):,} records can be used for "
                        f"warm-up ({why}); fix: --image-root, or another --model or --data")
    return np.flatnonzero(usable)


def encoded_items(loaded: Any, mixture: Mixture, rows: np.ndarray, max_length: int,
                  image_root: Any = None, skipped: dict[str, int] | None = None,
                  used: list[int] | None = None) -> Iterator[Encoded]:
    """The records at ``rows`` encoded, in order; records that cannot be encoded are counted in
    ``skipped`` (reason → count) and left out, the others' rows appended to ``used``."""
    encoder = loaded.encoder(max_length)
    for row in rows:
        item = encode_row(encoder, mixture, int(row), image_root)
        if isinstance(item, SkipReason):
            _count(skipped, str(item))
            continue
        if used is not None:
            used.append(int(row))
        yield item


def item_batches(loaded: Any, mixture: Mixture, rows: np.ndarray, batch_size: int,
                 max_length: int, image_root: Any = None) -> Iterator[list[Encoded]]:
    """:func:`encoded_items` in lists of ``batch_size``."""
    yield from _chunks(encoded_items(loaded, mixture, rows, max_length, image_root), batch_size)


def train(loaded: Any, mixture: Mixture, rows: np.ndarray, config: WarmupConfig,
          image_root: Any = None, progress: bool = True, dist: Dist | None = None,
          echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train LoRA (and the multimodal projector) on ``rows``; return the peft model, the
    per-step losses, the :class:`Recipe` followed and the AdamW moments of the LoRA matrices
    after the last step (:mod:`tive.warmup.moments`).

    An optimizer step takes the next ``global_batch`` records of the order
    (:func:`tive.warmup.plan.modality_order`: all-image or all-text), less those that cannot be
    encoded (a step left with none is not taken); its loss is the token mean over all of them (as the model's own loss is over one batch). Each process takes one
    contiguous share of the step's records (under ``torchrun``, ``dist``) and runs it in
    batches of at most ``batch_size`` records, each batch's token-mean loss weighed by its
    share of the step's supervised tokens; the gradients are summed over the processes before
    the step. So the step is the same, up to float rounding and dropout draws, on one CPU or
    eight GPUs, with any ``batch_size``.
    """
    from peft import get_peft_model
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    dist = Dist() if dist is None else dist
    torch.manual_seed(config.seed)
    targets = warmup_targets(loaded.model, tuple(config.targets))
    projector = trained_projector(loaded.model, loaded.kind, config.train_projector)
    recipe = plan_recipe(config, len(rows), dist.world, projector)
    notice = recipe.notice(len(rows), config)
    if notice and echo is not None:
        echo(notice)
    if config.gradient_checkpointing:
        enable_checkpointing(loaded.model)

    with quiet_peft():
        model = get_peft_model(loaded.model, lora_config(
            loaded.model, config.r, config.alpha, config.dropout, targets,
            modules_to_save=[projector] if projector else None))
    if dist.world > 1:  # the same initial adapter everywhere, other dropout masks per rank
        torch.manual_seed(config.seed + 1 + dist.rank)
    key_parameters(model)  # the adapter must cover the key parameters: refuse before training
    groups = _param_groups(model, config)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=WEIGHT_DECAY)
    schedule = get_cosine_schedule_with_warmup(optimizer, recipe.warmup_steps, recipe.steps)
    run = _StepRunner(model, pad_id(loaded.tokenizer), config, dist)
    keeper = Keeper(checkpoint_steps(config.checkpoints, recipe.steps))
    skipped: dict[str, int] = {}
    used: list[int] = []
    model.train()
    bar = tqdm(total=len(rows) * config.epochs, unit="rec",
               disable=not progress or dist.rank != 0, desc="warm-up")
    has_image = np.array([bool(mixture[int(r)].images) for r in rows], dtype=bool)
    with _Float32Projector(model, projector):
        for epoch in range(config.epochs):
            rng = np.random.default_rng(config.seed + epoch)
            order = (modality_order(rows, has_image, recipe.global_batch, rng)
                     if config.group_by_modality else rng.permutation(rows))
            first = epoch == 0  # count skips and trained records once, not once per epoch
            for chunk in _chunks(iter(order), recipe.global_batch):
                # every rank encodes every record, so that all agree on the steps (skips included)
                step = list(encoded_items(loaded, mixture, np.array(chunk), config.max_length,
                                          image_root, skipped if first else None,
                                          used if first else None))
                bar.update(len(chunk) - len(step))  # records that could not be encoded
                if not step:
                    continue
                done = len(run.totals)
                bar.set_description(f"warm-up step {done + 1}/{recipe.steps}", refresh=True)
                run(step, bar)
                lr = schedule.get_last_lr()[0]  # the rate this step uses
                _step(optimizer, schedule, params, dist)
                keeper.after_step(model, optimizer, lr)
    bar.close()
    losses = run.losses()
    if not losses:
        reasons = ", ".join(f"{n} {r}" for r, n in skipped.items())
        raise DataError(f"{mixture.path}: none of the {len(rows):,} sampled records could be "
                        f"encoded ({reasons}); nothing was trained or saved; fix: check "
                        f"--max-length and that the model fits the data")
    model.eval()
    return {"model": model, "losses": losses, "skipped": skipped, "used": np.array(used),
            "moments": adam_moments(model, optimizer), "checkpoints": keeper,
            "processes": dist.world, "records_per_process": dist.gather(run.records),
            "recipe": recipe}


def supervised_tokens(item: Encoded) -> int:
    """Positions whose next token is supervised: the count behind the model's token mean."""
    return sum(1 for label in item.labels[1:] if label != IGNORE)


class _StepRunner:
    """Forward and backward of this rank's share of one optimizer step's records."""

    def __init__(self, model: Any, pad: int, config: WarmupConfig, dist: Dist) -> None:
        self.model, self.pad, self.config, self.dist = model, pad, config, dist
        self.device = next(model.parameters()).device
        self.vocab = text_vocab(model.get_base_model().config)
        self.records = 0  # records this rank has run
        self.mine: list[tuple[int, float]] = []  # (step number, Σ of its token losses here)
        self.totals: list[int] = []  # supervised tokens of every step

    def __call__(self, step: list[Encoded], bar: Any) -> None:
        tokens = [supervised_tokens(item) for item in step]
        total = sum(tokens)
        self.dist.same((len(step), total), "warm-up step")
        lo = self.dist.rank * len(step) // self.dist.world
        hi = (self.dist.rank + 1) * len(step) // self.dist.world
        for start in range(lo, hi, self.config.batch_size):
            end = min(start + self.config.batch_size, hi)
            loss = self._loss(step[start:end])
            mine = sum(tokens[start:end])
            # the step's token mean, of which these records hold mine / total
            (loss * (mine / max(total, 1))).backward()
            value = loss.item()
            self.mine.append((len(self.totals), value * mine))
            self.records += end - start
            bar.set_postfix(loss=f"{value:.3f}")
            bar.update(end - start)
        bar.update(len(step) - (hi - lo))  # the other ranks' records
        self.totals.append(total)

    def _loss(self, items: list[Encoded]) -> torch.Tensor:
        """Token-mean loss of one batch: the model's own, or over the text vocabulary only when
        the output head has extra columns (a Bunny port's ``<image>`` row)."""
        batch = {k: v.to(self.device) for k, v in collate(items, self.pad).items()
                 if v is not None}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            if self.vocab is None:
                return self.model(**batch).loss
            labels = batch.pop("labels")
            logits = self.model(**batch).logits[..., :self.vocab].float()
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, self.vocab), labels[:, 1:].reshape(-1),
            ignore_index=IGNORE)

    def losses(self) -> list[float]:
        """Every step's loss (its token mean), in order, gathered from all ranks."""
        sums = np.zeros(len(self.totals))
        for part in self.dist.gather(self.mine):
            for b, value in part:
                sums[b] += value
        return [float(s / max(t, 1)) for s, t in zip(sums, self.totals)]


def _param_groups(model: Any, config: WarmupConfig) -> list[dict[str, Any]]:
    """AdamW groups: the LoRA matrices at ``lr``, the projector's copy at ``projector_lr``."""
    lora, projector = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (projector if "modules_to_save" in name else lora).append(p)
    groups = [{"params": lora, "lr": config.lr}]
    if projector:
        groups.append({"params": projector, "lr": config.projector_lr})
    return groups


class _Float32Projector:
    """Train a half-precision projector's copy in float32 (AdamW steps of 2e-5 would round
    away in bfloat16), cast back to the model's type afterwards, so the model scored now and
    the one reloaded from the saved adapter are the same."""

    def __init__(self, model: Any, projector: str | None) -> None:
        from peft.utils import ModulesToSaveWrapper

        wrapper = dict(model.named_modules()).get(f"base_model.model.{projector}")
        copy = wrapper.modules_to_save["default"] if isinstance(
            wrapper, ModulesToSaveWrapper) else None
        dtype = next(copy.parameters()).dtype if copy is not None else None
        self.copy = copy if dtype in (torch.bfloat16, torch.float16) else None
        self.dtype, self.hooks = dtype, []

    def __enter__(self) -> _Float32Projector:
        if self.copy is not None:
            self.copy.float()
            self.hooks = [
                self.copy.register_forward_pre_hook(
                    lambda m, args: tuple(a.float() if torch.is_tensor(a) else a for a in args)),
                self.copy.register_forward_hook(lambda m, args, out: out.to(self.dtype))]
        return self

    def __exit__(self, *exc: Any) -> None:
        for hook in self.hooks:
            hook.remove()
        if self.copy is not None:
            self.copy.to(self.dtype)


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _step(optimizer: torch.optim.Optimizer, schedule: Any, params: list, dist: Dist) -> None:
    dist.sum_grads(params)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad()


def _count(counter: dict[str, int] | None, reason: str) -> None:
    if counter is not None:
        counter[reason] = counter.get(reason, 0) + 1
