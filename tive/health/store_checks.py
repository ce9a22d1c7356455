"""Health checks of what a store records (docs/design.md, "Health checks"): the reference it
was scored with, the key parameters hooked, the projection that ran, and whether its records
still match the data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tive.data.cache import load_labelled
from tive.data.mixture import Mixture
from tive.data.tasks import TaskLabels
from tive.health.findings import NOTE, Finding
from tive.store.format import Store

RESCORE = "then score again with --force (or into another --run)"


def store_findings(store: Store) -> list[Finding]:
    """The reference, key-parameter coverage and projection checks of ``store``."""
    return [*reference_findings(store), *coverage_findings(store), *projection_findings(store)]


def reference_findings(store: Store) -> list[Finding]:
    """An untrained reference: every LoRA B matrix of the adapter the store was scored with is
    0 (the reference is then the base model, and every gradient of an A matrix is 0). Stores
    of imported features have no adapter and are not checked."""
    adapter = store.meta.get("adapter")
    path = adapter.get("path") if isinstance(adapter, dict) else None
    if not path:
        return []
    folder = Path(path)
    moved = lora_b_moved(folder) if folder.is_dir() else None
    if moved is None:
        return [Finding("reference", f"{folder}: the adapter this store was scored with is "
                        f"gone or has no LoRA B matrices, so whether it was trained cannot be "
                        f"checked", "keep the run's reference/ folder beside its store",
                        NOTE)]
    if moved:
        return []
    steps = _recorded_steps(folder / "reference.json")
    return [Finding("reference", f"{folder}: every LoRA B matrix is 0 ({steps}): the reference "
                    f"is the base model, so every gradient of the LoRA A matrices is 0 and the "
                    f"features come from the B matrices alone",
                    f"warm up until it trains (a smaller --warmup-global-batch or a larger "
                    f"--warmup-lr on tive score, --global-batch/--lr on tive warmup), {RESCORE}")]


def lora_b_moved(folder: Path) -> bool | None:
    """Whether any LoRA B matrix of the peft adapter in ``folder`` has a non-zero entry
    (read one matrix at a time, stopping at the first that has); None when the folder has
    no weights file or no B matrix."""
    import torch

    safetensors, pickled = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    if safetensors.is_file():
        from safetensors import safe_open

        with safe_open(str(safetensors), framework="pt") as f:
            names = [k for k in f.keys() if "lora_B" in k]
            for name in names:
                if bool(f.get_tensor(name).count_nonzero()):
                    return True
        return False if names else None
    if pickled.is_file():
        weights = torch.load(pickled, map_location="cpu", weights_only=True)
        names = [k for k in weights if "lora_B" in k]
        if any(bool(weights[k].count_nonzero()) for k in names):
            return True
        return False if names else None
    return None


def _recorded_steps(path: Path) -> str:
    """The optimizer steps ``reference.json`` records, in words."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        steps = info.get("recipe", {}).get("steps", info.get("loss", {}).get("steps"))
    except (OSError, ValueError, AttributeError):
        steps = None
    if not isinstance(steps, int):
        return "reference.json records no step count"
    return f"{steps:,} optimizer step{'' if steps == 1 else 's'} recorded in reference.json"


def coverage_findings(store: Store) -> list[Finding]:
    """Key parameters expected but not hooked: the coverage ``tive score`` records
    (:func:`tive.warmup.lora.key_coverage`), by module count and by parameter count."""
    if store.meta.get("source") != "tive score":
        return []  # imported features: tive hooked nothing
    coverage = (store.meta.get("key_parameters") or {}).get("coverage")
    if not isinstance(coverage, dict):
        return [Finding("coverage", "this store was scored before tive recorded which key "
                        "parameters were hooked, so their coverage cannot be checked",
                        "score again into another --run to record it", NOTE)]
    expected, hooked = coverage["expected"], coverage["hooked"]
    by_module = hooked["modules"] / max(expected["modules"], 1)
    by_count = hooked["parameters"] / max(expected["parameters"], 1)
    if by_module >= 1 and by_count >= 1:
        return []
    missing = coverage.get("missing") or []
    shown = ", ".join(missing[:2]) + (", …" if len(missing) > 2 else "")
    message = (f"{hooked['modules']:,} of {expected['modules']:,} attention projections hooked "
               f"({by_module:.0%} of the modules, {by_count:.0%} of the key parameters); "
               f"not hooked: {shown}")
    if coverage.get("key_layers"):
        return [Finding("coverage", f"{message} (asked: --key-layers {coverage['key_layers']})",
                        "leave out --key-layers for the authors' key parameters (every layer)",
                        NOTE)]
    return [Finding("coverage", message, f"give every attention projection of the language "
                    f"model a LoRA adapter (--lora-targets), {RESCORE}")]


def projection_findings(store: Store) -> list[Finding]:
    """A TRAK projection asked for on a GPU that ran without TRAK's CUDA kernel (``fast_jl``):
    its CPU projector draws another matrix than the kernel the authors used, and is slow."""
    from tive.projection.projectors import FAST_JL_INSTALL

    p = store.meta.get("projector") or {}
    if p.get("type") != "trak" or p.get("device") != "cuda" or p.get("kernel") == "cuda":
        return []
    return [Finding("projection", "TRAK's projection ran on the GPU without its CUDA kernel "
                    "(fast_jl did not import): its CPU projector draws another random matrix "
                    "than the authors' kernel, and is far slower",
                    f"{FAST_JL_INSTALL}; check with tive doctor, {RESCORE}")]


def data_findings(store: Store, data: Any = None, task_field: str | None = None,
                  ) -> tuple[list[Finding], Mixture | None, TaskLabels | None]:
    """Whether the store's records still match the mixture (``data``, a path or a
    :class:`~tive.data.mixture.Mixture`; default: the file the store was built from), by each
    record's content key.

    Returns:
        the findings, and the mixture and its labels (None when the file is gone).
    """
    path = Path(getattr(data, "path", data) if data is not None else store.meta["data"]["path"])
    if not path.exists():
        return [Finding("data", f"{path}: the data this store was built from is gone, so "
                        f"whether its records still match cannot be checked",
                        "pass its current location with --data", NOTE)], None, None
    field = task_field or store.meta.get("settings", {}).get("task_field")
    mixture, labels = load_labelled(path, field, store.root.parent / "cache")
    want = store.meta["data"]
    if want["records"] == len(mixture) and want["fingerprint"] == mixture.fingerprint:
        return [], mixture, labels
    keys = np.array([e.key for e in store.index()], dtype=np.uint64)
    common = min(len(keys), len(mixture))
    differ = np.flatnonzero(keys[:common] != np.asarray(mixture.keys[:common], np.uint64))
    changed = len(differ) + abs(len(keys) - len(mixture))
    first = int(differ[0]) if len(differ) else common
    where = (f"first: row {first}, id {mixture.ids[first]!r}" if first < len(mixture)
             else f"first: row {first}")
    sizes = ("" if len(keys) == len(mixture) else
             f"; the store has {len(keys):,} records, the data {len(mixture):,}")
    return [Finding("data", f"{path}: {changed:,} of the store's {len(keys):,} records no "
                    f"longer match it ({where}){sizes}: their features belong to other records",
                    "score this data again (tive score --force, or another --run), or pass "
                    "the data the store was built from with --data")], mixture, labels
