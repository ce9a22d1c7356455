"""What one warm-up does, worked out before it starts: the global batch (the authors' 128 where
it trains enough, smaller below), the steps, the learning rate summed over them, and the order
of the records, each step all-image or all-text (docs/design.md, "The warm-up's steps").

No torch here: the plan is arithmetic on the sample's size and its records' modality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tive.warmup.settings import AUTHORS, WarmupConfig

WARMUP_RATIO = 0.03  # share of the optimizer steps in the linear warm-up (HF's ceil rule)
MIN_STEPS = 100  # optimizer steps a warm-up should take; fewer: the global batch is scaled down
MIN_BATCH = 8  # the smallest global batch the scaling goes to (one record per GPU of a node)
AUTHORS_RUN = {"records": 665_298, "steps": 416, "lr_sum": 208}  # their LLaVA-665K warm-up


@dataclass(frozen=True)
class Recipe:
    """What one warm-up does (recorded in ``reference.json``).

    Attributes:
        global_batch: records per optimizer step actually used.
        steps: optimizer steps in all (``epochs · ⌈sample / global_batch⌉``).
        warmup_steps: steps of the linear warm-up, ``⌈0.03 · steps⌉`` (Hugging Face's rule);
            the first step's learning rate is 0.
        accumulation: forward/backward passes per step on one process, at most
            (``⌈⌈global_batch / processes⌉ / batch_size⌉``).
        projector: qualified name of the multimodal projector trained with the adapter, or None.
        scaled: the global batch was scaled down from the authors' 128 (no ``global_batch``
            given, the authors' batch would train fewer than :data:`MIN_STEPS` steps).
    """

    global_batch: int
    steps: int
    warmup_steps: int
    accumulation: int
    projector: str | None
    scaled: bool = False

    @property
    def lr_sum(self) -> float:
        """The learning rate summed over the steps, in units of the peak rate: a measure of how
        far the adapter can move (:func:`lr_sum`)."""
        return lr_sum(self.steps, self.warmup_steps)

    def notice(self, sample: int, config: WarmupConfig) -> str | None:
        """One line saying how much this warm-up trains when it is not the authors' recipe
        training enough: scaled down, under ``--paper``, or a given batch with few steps."""
        trains = (f"{self.steps} optimizer step{'s' * (self.steps != 1)} of "
                  f"{min(self.global_batch, sample)} records, learning rate summed over them {self.lr_sum:.3g} × the peak "
                  f"(the authors' {AUTHORS_RUN['records']:,}-record run: "
                  f"{AUTHORS_RUN['steps']} steps, {AUTHORS_RUN['lr_sum']})")
        if self.scaled:
            few = (f" (fewer than {MIN_STEPS}: the sample is too small for {MIN_STEPS} steps "
                   f"of {MIN_BATCH})" if self.steps < MIN_STEPS else "")
            return (f"warm-up: global batch {self.global_batch} instead of the authors' "
                    f"{AUTHORS['global_batch']}, so that the {sample:,}-record sample trains: "
                    f"{trains}{few}; the rest is their recipe (--paper keeps their batch)")
        if config.paper:
            return f"warm-up (--paper, the authors' recipe) on a {sample:,}-record sample: {trains}"
        if self.steps < MIN_STEPS:
            auto = chosen_batch(sample, config.epochs)
            fix = (f"leave out --global-batch (--warmup-global-batch in tive score) to have it "
                   f"chosen ({auto} here)" if auto < self.global_batch
                   and config.epochs * math.ceil(sample / auto) >= MIN_STEPS else
                   "a smaller --global-batch (--warmup-global-batch in tive score) or more "
                   "epochs train more")
            return (f"warm-up: {trains}; fewer than {MIN_STEPS} steps, so the adapter may barely "
                    f"move; fix: {fix}")
        return None


def plan_recipe(config: WarmupConfig, sample: int, processes: int,
                projector: str | None) -> Recipe:
    """The :class:`Recipe` of training ``sample`` records on ``processes`` processes."""
    given = config.global_batch
    batch = given if given is not None else chosen_batch(sample, config.epochs)
    steps = config.epochs * max(1, math.ceil(sample / batch))
    share = math.ceil(min(batch, sample) / processes)
    return Recipe(batch, steps, math.ceil(WARMUP_RATIO * steps),
                  max(1, math.ceil(share / config.batch_size)), projector,
                  scaled=given is None and batch != AUTHORS["global_batch"])


def chosen_batch(sample: int, epochs: int) -> int:
    """The global batch when none is given: the authors' 128 where it gives at least
    :data:`MIN_STEPS` optimizer steps, else the largest batch that does, but not below
    :data:`MIN_BATCH`: a sample under ``MIN_BATCH · MIN_STEPS / epochs`` records trains fewer
    steps, and at least two where it can (the first step's learning rate is 0)."""
    authors = int(AUTHORS["global_batch"])
    for batch in range(authors, MIN_BATCH - 1, -1):
        if epochs * math.ceil(sample / batch) >= MIN_STEPS:
            return batch
    return max(1, min(MIN_BATCH, math.ceil(sample / 2)))


def lr_sum(steps: int, warmup_steps: int) -> float:
    """Σ over the optimizer steps of the learning rate in units of its peak, for the schedule
    the warm-up runs (transformers' ``get_cosine_schedule_with_warmup``: ``s / w`` for step
    ``s < w``, then ``½(1 + cos(π (s − w) / (steps − w)))``)."""
    total = 0.0
    for s in range(steps):
        if s < warmup_steps:
            total += s / max(1, warmup_steps)
        else:
            progress = (s - warmup_steps) / max(1, steps - warmup_steps)
            total += max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return total


def modality_order(rows: np.ndarray, has_image: np.ndarray, global_batch: int,
                   rng: np.random.Generator) -> np.ndarray:
    """``rows`` in the order the warm-up takes them, cut into steps of ``global_batch``:
    each step all-image or all-text, as LLaVA's ``group_by_modality_length`` (their
    ``get_modality_length_grouped_indices``). Each modality is shuffled and cut into steps;
    the full steps of both are shuffled together; the two incomplete last steps are joined at
    the end (so the last step or two may mix, as theirs). With one modality only, a shuffle.

    Args:
        rows: ``(n,)`` rows of the sample.
        has_image: ``(n,)`` bool, the record at ``rows[i]`` has an image.

    Returns:
        ``(n,)`` the rows reordered.
    """
    if has_image.all() or not has_image.any():
        return rng.permutation(rows)
    steps, tails = [], []
    for part in (rows[has_image], rows[~has_image]):
        part = rng.permutation(part)
        cut = [part[i:i + global_batch] for i in range(0, len(part), global_batch)]
        steps += cut[:-1]
        tails.append(cut[-1])
    order = [steps[i] for i in rng.permutation(len(steps))]
    return np.concatenate(order + [np.sort(np.concatenate(tails))])
