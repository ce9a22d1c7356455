"""Quotas and draws: task values to quotas, instance values to the records of each quota.

* quotas: ``n_t = B · V(t) / Σ V`` over the non-excluded tasks, rounded by largest remainder so
  they sum to exactly B; with ``oversample=False`` a quota is capped at its task's size and the
  surplus goes to the other tasks in proportion to their value;
* within a task: ``soft`` draws n_t records without replacement with probability ∝ exp(v/τ)
  (Gumbel-top-k: the top n_t of ``v/τ + Gumbel noise``, the same distribution as sequential
  weighted draws), ``top`` takes the n_t highest instance values; a quota above the task's size
  takes the whole task ⌊n_t/|t|⌋ times and draws the remainder.

Random draws come from each record's content key and the seed, not from its row, so a
selection does not depend on the order of the mixture.
"""

from __future__ import annotations

import math

import numpy as np

from tive.errors import ConfigError
from tive.util.hashing import splitmix64


def largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Integers summing to ``total`` that round ``shares`` (which sum to ``total``) fairly.

    Floors first; the units left go to the largest fractional parts (ties: lower index).
    """
    floors = np.floor(shares + 1e-9).astype(np.int64)
    left = total - int(floors.sum())
    if left > 0:
        order = np.lexsort((np.arange(len(shares)), -(shares - floors)))
        floors[order[:left]] += 1
    return floors


def quotas(values: np.ndarray, sizes: np.ndarray, budget: int, oversample: bool = True) -> np.ndarray:
    """Per-task quotas summing to ``budget``.

    Args:
        values: ``(T,)`` non-negative task values of the tasks taking part.
        sizes: ``(T,)`` selectable records per task.
        budget: B, the total to select.
        oversample: if False, no quota exceeds its task's size; surplus is shared out again in
            proportion to value among the tasks below their cap (water-filling).

    Returns:
        ``(T,)`` int64 quotas, summing to ``budget``.
    """
    values = np.asarray(values, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.int64)
    if not oversample and budget > sizes.sum():
        raise ConfigError(f"budget {budget:,} is more than the {int(sizes.sum()):,} selectable "
                          f"records; fix: a smaller --budget, or allow --oversample")
    with np.errstate(over="ignore"):
        if not np.isfinite(values.sum()):  # values near 1e308: their shares would overflow
            values = values / values.max()
    _require_positive(values)
    if oversample:
        return largest_remainder(budget * values / values.sum(), budget)
    capped = np.zeros(len(values), dtype=bool)
    while True:
        left = budget - sizes[capped].sum()
        free = ~capped & (values > 0)
        shares = np.where(capped, sizes, 0).astype(np.float64)
        if free.any():
            shares[free] = left * values[free] / values[free].sum()
        over = free & (shares > sizes)
        if not over.any():
            break
        capped |= over
    if not free.any() and left > 0:  # only zero-valued tasks remain to absorb the surplus
        room = np.where(capped, 0, sizes).astype(np.float64)
        shares += left * room / room.sum()
    return largest_remainder(shares, budget)


def _require_positive(values: np.ndarray) -> None:
    """Refuse task values that cannot share a budget (all zero)."""
    if not values.sum() > 0:
        raise ConfigError("every task value is zero (with --task-value norm: all gradient norms "
                          "are 0; with coherence or mean-gradient: no task's records point the "
                          "same way; with progress: the warm-up lowered no task's loss on "
                          "records it did not train on); the values cannot share the budget "
                          "among tasks; fix: check the store was computed correctly, or "
                          "another --task-value")


def truncated_quotas(values: np.ndarray, budget: float) -> np.ndarray:
    """The TIVE authors' quotas: ``int(V(t) / ΣV · B)`` with ``B = p·N`` unrounded, computed in
    their order of operations (``select_data_TIVE.py``), so the total may fall short of B.

    Args:
        values: ``(T,)`` task values of the tasks taking part.
        budget: ``p·N`` (a float) or a record count.

    Returns:
        ``(T,)`` int64 quotas.
    """
    values = np.asarray(values, dtype=np.float64)
    _require_positive(values)
    total = sum(float(v) for v in values)  # their running Python sum
    return np.array([int(float(v) / total * budget) for v in values], dtype=np.int64)


def uniforms(keys: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic uniform numbers in (0, 1), one per record key (splitmix64 of key and seed)."""
    salt = splitmix64(np.array([(seed * 0x2545F4914F6CDD1D) & 0xFFFFFFFFFFFFFFFF]))
    x = splitmix64(np.asarray(keys, dtype=np.uint64) ^ salt)
    return ((x >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def top_n(scores: np.ndarray, n: int, tiebreak: np.ndarray) -> np.ndarray:
    """Positions of the ``n`` largest ``scores`` (ties: larger ``tiebreak``, then lower position)."""
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    order = np.lexsort((np.arange(len(scores)), -tiebreak, -scores))
    return np.sort(order[:n])


def choose_in_task(
    members: np.ndarray,
    quota: int,
    instance_values: np.ndarray,
    noise: np.ndarray,
    temperature: float,
    soft: bool,
) -> np.ndarray:
    """Rows chosen from one task (repeats when ``quota`` exceeds the task's size).

    Args:
        members: ``(m,)`` rows of the task's selectable records.
        quota: n_t.
        instance_values: ``(m,)`` v_i of those rows.
        noise: ``(m,)`` uniforms in (0, 1) of those rows.
        temperature: τ of the soft draw (``inf``: uniform).
        soft: draw ∝ exp(v/τ) if True, else take the highest v.
    """
    whole, rest = divmod(quota, len(members)) if len(members) else (0, 0)
    if soft:
        gumbel = -np.log(-np.log(noise))
        scores = gumbel if math.isinf(temperature) else instance_values / temperature + gumbel
    else:
        scores = instance_values
    picked = members[top_n(scores, rest, noise)]
    return np.concatenate([np.tile(members, whole), picked])
