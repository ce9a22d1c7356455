"""The selection-quality benchmark's fine-tune and evaluation: one fixed LoRA recipe for every
subset, then exact-match accuracy after greedy decoding and mean answer-token loss on held-out
records, per task.

Records are encoded by tive's own encoder for the model's family (the format tive scored them
in); an evaluation record's target is its last assistant turn, its prompt everything before.
"""

from __future__ import annotations

import copy
import math
import time
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
    batch_size: int = 8
    weight_decay: float = 0.0
    max_length: int = 256

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


@dataclass
class EvalItem:
    """A held-out record: its task, the prompt ids, the target ids (the last answer with its
    end-of-turn token), and the target text."""

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


def normalise(text: str) -> str:
    """Exact match after trimming spaces and a final full stop, ignoring case."""
    return text.strip().rstrip(".").strip().lower()


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
def evaluate(model: Any, items: list[EvalItem], tokenizer: Any, pad: int, eos: list[int],
             device: str = "cpu", batch_size: int = 16) -> dict[str, dict[str, float]]:
    """Per task: exact-match accuracy of the greedy answer, and mean answer-token loss.

    Returns:
        ``{task: {"accuracy", "loss", "n"}}``.
    """
    model.eval()
    correct: dict[str, list[float]] = {}
    token_loss: dict[str, list[float]] = {}
    for b in range(0, len(items), batch_size):
        batch = items[b:b + batch_size]
        for item, text in zip(batch, _greedy(model, batch, tokenizer, pad, eos, device)):
            correct.setdefault(item.task, []).append(
                float(normalise(text) == normalise(item.answer)))
        for item, loss in zip(batch, _answer_loss(model, batch, pad, device)):
            token_loss.setdefault(item.task, []).append(loss)
    return {t: {"accuracy": float(np.mean(correct[t])), "loss": float(np.mean(token_loss[t])),
                "n": len(correct[t])} for t in correct}


def _greedy(model: Any, batch: list[EvalItem], tokenizer: Any, pad: int, eos: list[int],
            device: str) -> list[str]:
    """Greedy continuations of the prompts (left-padded), cut at the first end token."""
    t = pad_batch([i.prompt for i in batch], None, pad, left=True)
    new = max(len(i.target) for i in batch) + 4
    out = model.generate(input_ids=t["input_ids"].to(device),
                         attention_mask=t["attention_mask"].to(device), max_new_tokens=new,
                         do_sample=False, eos_token_id=eos, pad_token_id=pad)
    texts = []
    for row in out[:, t["input_ids"].shape[1]:].tolist():
        cut = next((j for j, tok in enumerate(row) if tok in eos), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts


def _answer_loss(model: Any, batch: list[EvalItem], pad: int, device: str) -> list[float]:
    """Mean cross-entropy of each target given its prompt (teacher forcing)."""
    seqs = [i.prompt + i.target for i in batch]
    labels = [[IGNORE] * len(i.prompt) + i.target for i in batch]
    t = {k: v.to(device) for k, v in pad_batch(seqs, labels, pad).items()}
    token, rows = token_losses(model, t["input_ids"], t["attention_mask"], t["labels"])
    sums = torch.zeros(len(batch)).index_add_(0, rows.cpu(), token.cpu())
    counts = torch.bincount(rows.cpu(), minlength=len(batch)).clamp(min=1)
    return (sums / counts).tolist()
