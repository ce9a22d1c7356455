"""The selection-quality benchmark's fine-tune and evaluation: one fixed LoRA recipe for every
subset, then, on held-out records, per item and per task: exact match of the greedy answer and
the mean answer-token loss, both from one teacher-forced forward pass.

Exact match is teacher-forced: an item is correct iff at every target position (the answer's
tokens and its end-of-turn token) the argmax of the logits given the gold prefix is the target
token — exactly when greedy decoding reproduces the answer token for token and then ends the
turn (:func:`greedy_ids` decodes, for the test that checks this), at the cost of one forward
pass instead of one per generated token.

Records are encoded by tive's own encoder for the model's family (the format tive scored them
in); an evaluation record's target is its last assistant turn, its prompt everything before.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from tive.models.load import quiet_peft
from tive.models.segments import IGNORE, Encoded


@dataclass(frozen=True)
class Recipe:
    """The fine-tune every subset gets (the same epochs for every subset)."""

    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target: str = "all-linear"  # every linear layer of the language model
    epochs: int = 1
    lr: float = 5e-4
    warmup_ratio: float = 0.1  # linear warm-up, then cosine decay to 0
    batch_size: int = 4
    weight_decay: float = 0.0
    max_length: int = 256

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


@dataclass
class EvalItem:
    """A held-out record: its task, the prompt ids, the target ids (the last answer with its
    end-of-turn token), and the target text (for reading; exact match compares token ids)."""

    task: str
    prompt: list[int]
    target: list[int]
    answer: str


def last_answer(item: Encoded) -> tuple[int, int]:
    """``(start, stop)`` token positions of the last supervised run (the last answer)."""
    sup = np.flatnonzero(np.asarray(item.labels) != IGNORE)
    if not len(sup):
        raise ValueError("record has no supervised token")
    breaks = np.flatnonzero(np.diff(sup) > 1)
    start = sup[breaks[-1] + 1] if len(breaks) else sup[0]
    return int(start), int(sup[-1]) + 1


def eval_items(encoded: list[Encoded], tasks: list[str], answers: list[str]) -> list[EvalItem]:
    """Split each encoded held-out record into prompt and target."""
    out = []
    for item, task, answer in zip(encoded, tasks, answers):
        start, stop = last_answer(item)
        out.append(EvalItem(task, list(item.input_ids[:start]), list(item.input_ids[start:stop]),
                            answer))
    return out


def token_losses(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every supervised token, and the batch row it belongs to; the output
    head is applied only at positions whose next token is supervised.

    Args:
        input_ids, attention_mask, labels: ``(batch, tokens)``.

    Returns:
        ``(supervised,)`` losses and ``(supervised,)`` row indices.
    """
    body = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    head = model.get_output_embeddings()
    hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE  # (batch, tokens - 1)
    logits = head(hidden[:, :-1][keep]).float()  # (supervised, vocab)
    losses = torch.nn.functional.cross_entropy(logits, targets[keep], reduction="none")
    rows = torch.arange(len(labels)).to(labels.device)[:, None].expand_as(targets)[keep]
    return losses, rows


def pad_batch(seqs: list[list[int]], labels: list[list[int]] | None, pad: int,
              left: bool = False) -> dict[str, torch.Tensor]:
    """``(batch, longest)`` input ids, attention mask and labels (IGNORE at pads)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    lab = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(s)
        mask[i, cols] = 1
        if labels is not None:
            lab[i, cols] = torch.tensor(labels[i])
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def with_lora(base: Any, recipe: Recipe, seed: int) -> Any:
    """A fresh copy of ``base`` with a new LoRA adapter (initialised from ``seed``)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha,
                        lora_dropout=recipe.lora_dropout, target_modules=recipe.target,
                        task_type="CAUSAL_LM")
    with quiet_peft():
        return get_peft_model(copy.deepcopy(base), config)


def train(base: Any, records: list[Encoded], recipe: Recipe, seed: int, pad: int,
          device: str = "cpu", log: Any = None) -> tuple[Any, dict[str, float]]:
    """Fine-tune a fresh LoRA adapter on ``records`` (repeats allowed) with ``recipe``.

    Returns:
        the trained model (eval mode) and ``{"steps", "first_loss", "last_loss", "seconds"}``.
    """
    model = with_lora(base, recipe, seed).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    per_epoch = math.ceil(len(records) / recipe.batch_size)
    total = per_epoch * recipe.epochs
    warm = max(1, round(recipe.warmup_ratio * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.5 * (1 + math.cos(math.pi * (s - warm)
                                                                  / max(1, total - warm))))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses, t0 = [], time.perf_counter()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(records), generator=gen).tolist()
        for b in range(per_epoch):
            batch = [records[i] for i in order[b * recipe.batch_size:(b + 1) * recipe.batch_size]]
            t = pad_batch([r.input_ids for r in batch], [r.labels for r in batch], pad)
            t = {k: v.to(device) for k, v in t.items()}
            token, _ = token_losses(model, t["input_ids"], t["attention_mask"], t["labels"])
            loss = token.mean()  # the batch's supervised tokens weigh alike
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    model.eval()
    stats = {"steps": total, "first_loss": losses[0] if losses else math.nan,
             "last_loss": float(np.mean(losses[-per_epoch:])) if losses else math.nan,
             "seconds": time.perf_counter() - t0}
    if log:
        log(f"    trained {len(records)} records × {recipe.epochs} epochs = {total} steps in "
            f"{stats['seconds']:.0f} s; loss {stats['first_loss']:.3f} → {stats['last_loss']:.3f}")
    return model, stats


@torch.no_grad()
def evaluate(model: Any, items: list[EvalItem], pad: int, eos: Sequence[int] = (),
             device: str = "cpu", batch_size: int = 16) -> tuple[dict[str, dict[str, float]],
                                                                  dict[str, dict[str, list]]]:
    """Per task: exact-match accuracy (teacher-forced, see the module) and mean answer-token loss.

    Args:
        eos: end-of-turn token ids; a target is compared up to its first one (inclusive).

    Returns:
        ``{task: {"accuracy", "loss", "n"}}`` and, per task in the items' order, every item's
        ``{"correct": [0 or 1, …], "loss": [float, …]}`` (what the paired bootstrap resamples).
    """
    model.eval()
    order = sorted(range(len(items)), key=lambda i: len(items[i].prompt) + len(items[i].target))
    correct, losses = [0] * len(items), [0.0] * len(items)
    for b in range(0, len(items), batch_size):  # batches of similar lengths: little padding
        at = order[b:b + batch_size]
        c, loss = teacher_forced(model, [items[i] for i in at], pad, eos, device)
        for i, ci, li in zip(at, c, loss):
            correct[i], losses[i] = int(ci), float(li)
    per_item: dict[str, dict[str, list]] = {}
    for item, c, loss in zip(items, correct, losses):  # in the items' order
        got = per_item.setdefault(item.task, {"correct": [], "loss": []})
        got["correct"].append(c)
        got["loss"].append(loss)
    return task_scores(per_item), per_item


def task_scores(per_item: dict[str, dict[str, list]]) -> dict[str, dict[str, float]]:
    """Per task, ``{"accuracy", "loss", "n"}`` from its items' ``{"correct", "loss"}``."""
    return {t: {"accuracy": float(np.mean(v["correct"])), "loss": float(np.mean(v["loss"])),
                "n": len(v["correct"])} for t, v in per_item.items()}


def compared(target: list[int], eos: Sequence[int]) -> int:
    """How many of ``target``'s tokens exact match compares: up to its first end token."""
    return next((j + 1 for j, t in enumerate(target) if t in eos), len(target))


def teacher_forced(model: Any, batch: list[EvalItem], pad: int, eos: Sequence[int] = (),
                   device: str = "cpu") -> tuple[list[bool], list[float]]:
    """One forward pass over prompt + target (right-padded): per item, whether the argmax at
    every compared target position is the target token, and the mean cross-entropy of the
    target tokens."""
    seqs = [i.prompt + i.target for i in batch]
    labels = [[IGNORE] * len(i.prompt) + i.target for i in batch]
    t = {k: v.to(device) for k, v in pad_batch(seqs, labels, pad).items()}
    body = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    head = model.get_output_embeddings()
    hidden = body(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).last_hidden_state
    targets = t["labels"][:, 1:]
    keep = targets != IGNORE  # row-major: each item's target tokens, in order
    logits = head(hidden[:, :-1][keep]).float()
    gold = targets[keep]
    token = torch.nn.functional.cross_entropy(logits, gold, reduction="none").cpu()
    miss = (logits.argmax(-1) != gold).cpu()
    rows = torch.arange(len(batch))[:, None].expand_as(targets)[keep.cpu()]
    scored = torch.tensor([j < compared(i.target, eos) for i in batch
                           for j in range(len(i.target))])
    n = len(batch)
    wrong = torch.zeros(n).index_add_(0, rows, (miss & scored).float())
    sums = torch.zeros(n).index_add_(0, rows, token)
    counts = torch.bincount(rows, minlength=n).clamp(min=1)
    return (wrong == 0).tolist(), (sums / counts).tolist()


def greedy_ids(model: Any, batch: list[EvalItem], pad: int, eos: Sequence[int],
               device: str = "cpu") -> list[list[int]]:
    """Greedy continuations (token ids) of the prompts, one at a time, cut after the first end
    token; for checking :func:`teacher_forced` against ``generate``."""
    out = []
    for item in batch:
        ids = torch.tensor([item.prompt], device=device)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=len(item.target) + 4, do_sample=False,
                             eos_token_id=list(eos), pad_token_id=pad)
        row = gen[0, ids.shape[1]:].tolist()
        out.append(row[:compared(row, eos)])
    return out
