"""Deterministic 64-bit mixing (splitmix64), for record keys and seeded per-record draws; the
digest of a file's bytes."""

from __future__ import annotations

import hashlib
import os

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of each uint64 (wrapping arithmetic)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def distinct_keys(keys: np.ndarray) -> np.ndarray:
    """Make repeated keys distinct: the k-th repeat (k ≥ 1, in row order) is re-mixed with k.

    Identical records then draw independently, and since they are identical, which copy gets
    which key does not change a selection.
    """
    keys = np.asarray(keys, dtype=np.uint64)
    order = np.argsort(keys, kind="stable")
    ranked = keys[order]
    rows = np.arange(len(keys))
    first = np.r_[True, ranked[1:] != ranked[:-1]] if len(keys) else np.zeros(0, bool)
    occurrence = np.empty(len(keys), dtype=np.uint64)
    occurrence[order] = rows - np.maximum.accumulate(np.where(first, rows, 0))
    with np.errstate(over="ignore"):
        mixed = splitmix64(keys ^ (occurrence * np.uint64(0xD1B54A32D192ED03)))
    return np.where(occurrence > 0, mixed, keys)


def file_digest(path: str | os.PathLike) -> str:
    """blake2b-128 of a file's bytes, read in 4 MiB blocks (32 hex digits)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
