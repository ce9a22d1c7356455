"""The warm-up reference of a run: ``RUN/reference/``, reused when it was trained with the same
settings, trained (:func:`tive.warmup.training.train`) otherwise.

The adapter (with the multimodal projector, as peft's ``modules_to_save``) is saved in standard
peft format, with ``reference.json`` saying what it was trained on, with which recipe, and its
identity (docs/design.md, "Identities"). The folder appears only when complete.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tive.data.mixture import Mixture
from tive.errors import ConfigError, OutputError
from tive.models.load import load_model
from tive.util.dist import Dist
from tive.util.files import atomic_path
from tive.warmup.lora import gradient_dim, key_parameters
from tive.warmup.checkpoints import save_checkpoints
from tive.warmup.moments import save_moments
from tive.warmup.settings import WarmupConfig
from tive.warmup.plan import WARMUP_RATIO, Recipe
from tive.warmup.training import SCHEDULE, WEIGHT_DECAY, train, usable_rows, warmup_sample

REFERENCE_DIR = "reference"
MEMORY_ONLY = ("gradient_checkpointing",)  # settings that do not change the adapter


def save_reference(run: str | Path, model: Any, info: dict[str, Any],
                   moments: dict[str, Any] | None = None,
                   checkpoints: list[dict[str, Any]] = ()) -> Path:
    """Save the adapter (peft format), ``reference.json``, the AdamW ``moments``
    (:mod:`tive.warmup.moments`) and the earlier ``checkpoints``
    (:mod:`tive.warmup.checkpoints`) to ``run/reference`` atomically."""
    target = Path(run) / REFERENCE_DIR
    with atomic_path(target, directory=True) as tmp:
        try:
            model.save_pretrained(str(tmp))
            if moments:
                save_moments(tmp, moments)
            save_checkpoints(tmp, list(checkpoints))
        except Exception as e:  # safetensors' own error for a full disk is no OSError
            if type(e).__name__ != "SafetensorError":
                raise
            raise OutputError(f"{target}: saving the adapter failed ({str(e)[:120]}); nothing "
                              f"was kept; fix: free some space in {target.parent} (or choose "
                              f"another --run folder) and run again") from None
        (tmp / "reference.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return target


def reference_info(mixture: Mixture, tasks: np.ndarray, rows: np.ndarray,
                   config: WarmupConfig, source: dict[str, Any],
                   result: dict[str, Any]) -> dict[str, Any]:
    """What the adapter was trained on, for ``reference.json``."""
    names, counts = np.unique(tasks[result["used"]].astype(str), return_counts=True)
    losses = result["losses"]
    keys = key_parameters(result["model"])
    return {
        "model": source,
        "data": {"path": str(mixture.path.resolve()), "fingerprint": mixture.fingerprint,
                 "records": len(mixture)},
        "settings": asdict(config),
        "recipe": recipe_info(config, result["recipe"], result["processes"],
                              result["model"]),
        "sample": {"rows": [int(r) for r in rows], "trained": len(result["used"]),
                   "per_task": {str(n): int(c) for n, c in zip(names, counts)}},
        "loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None,
                 "steps": len(losses)},
        "skipped": result["skipped"],
        "checkpoints": result["checkpoints"].listing(),
        "processes": result["processes"],
        "records_per_process": result["records_per_process"],  # forward passes, all epochs
        "key_parameters": {"gradient_dim": gradient_dim(keys),
                           "matrices": [{"name": k.name, "shape": list(k.shape)} for k in keys]},
    }


def recipe_info(config: WarmupConfig, recipe: Recipe, processes: int,
                model: Any) -> dict[str, Any]:
    """Every training setting actually used, for ``reference.json``."""
    lora = model.peft_config["default"]
    return {"optimizer": "AdamW", "lr": config.lr, "projector_lr": config.projector_lr,
            "weight_decay": WEIGHT_DECAY, "schedule": SCHEDULE, "warmup_ratio": WARMUP_RATIO,
            "warmup_steps": recipe.warmup_steps, "steps": recipe.steps,
            "epochs": config.epochs, "global_batch": recipe.global_batch,
            "global_batch_scaled": recipe.scaled, "lr_sum": round(recipe.lr_sum, 4),
            "group_by_modality": config.group_by_modality,
            "per_device_batch": config.batch_size, "accumulation": recipe.accumulation,
            "processes": processes, "bf16": config.bf16, "paper": config.paper,
            "lora": {"r": lora.r, "alpha": lora.lora_alpha, "dropout": lora.lora_dropout,
                     "layers": len(lora.target_modules)},
            "projector": recipe.projector}


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


def model_key(source: Any) -> str:
    """The model as a reference records it: a folder or file given by path is resolved (so
    ``examples/m`` from the CLI and ``/abs/examples/m`` from a notebook agree); an alias or
    hub id stays as written."""
    return _resolved(source.spec)


def _resolved(spec: str) -> str:
    """``spec`` resolved when it names an existing path, else as written."""
    given = Path(spec)
    return str(given.resolve()) if given.exists() else spec


def identity_settings(config: Any) -> dict[str, Any]:
    """The warm-up settings a reference's identity holds (``reference.json``): all but those
    that change only memory, as JSON types, and without a later setting at the value that
    does what references made before it did (:func:`comparable_settings`)."""
    settings = {k: v for k, v in asdict(config).items() if k not in MEMORY_ONLY}
    return comparable_settings(json.loads(json.dumps(settings)))


# Settings added after references were first saved, at the value that trains as those did:
# one checkpoint, and steps drawn as one permutation rather than grouped by modality.
EARLIER_BEHAVIOUR = {"checkpoints": 1, "group_by_modality": False}


def comparable_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` (a reference identity's) without a setting of ``EARLIER_BEHAVIOUR`` at its
    value there, so that a reference saved before the setting existed and one saved since
    with it at that value compare equal (both trained the same way)."""
    def earlier(k: str, v: Any) -> bool:
        was = EARLIER_BEHAVIOUR.get(k, None)
        return was is not None and type(v) is type(was) and v == was  # 1 is not True

    return {k: v for k, v in settings.items() if not earlier(k, v)}


def ensure_reference(run: str | Path, source: Any, mixture: Mixture, labels: Any,
                     config: WarmupConfig, *, dtype: str = "auto", device: str = "auto",
                     image_root: Any = None, missing: np.ndarray | None = None,
                     retrain: bool = False, replace: bool = False,
                     progress: bool = True, dist: Dist | None = None,
                     echo: Callable[[str], None] | None = None) -> Reference:
    """Reuse ``run/reference`` when it was trained with these settings, else train it (under
    ``torchrun``, on every rank of ``dist`` together; rank 0 saves it).

    Args:
        source: the resolved model (:func:`tive.models.registry.resolve`).
        labels: the mixture's task labels.
        missing: ``(N,)`` records whose images are missing (left out of the sample).
        retrain: train again even when the settings match.
        echo: called with a line worth saying before training (rank 0 only).
        replace: replace a reference trained with other settings instead of refusing.

    Raises:
        ConfigError: a reference with other settings is there (and neither flag is given).
    """
    missing = np.zeros(len(mixture), dtype=bool) if missing is None else missing
    usable = usable_rows(mixture, missing, source.family)
    rows = usable[warmup_sample(labels.tasks[usable], mixture.keys[usable], config.fraction,
                                config.seed)]
    identity = {"model": model_key(source), "dtype": dtype, "data": mixture.fingerprint,
                "settings": identity_settings(config),
                "rows": [int(r) for r in rows], "tasks": sorted(set(labels.tasks[rows]))}
    existing = Path(run) / REFERENCE_DIR / "reference.json"
    if existing.exists() and not retrain:
        done = json.loads(existing.read_text(encoding="utf-8"))
        saved = dict(done.get("identity") or {})
        if "model" in saved:  # a path saved as written (before model_key) resolves the same
            saved["model"] = _resolved(saved["model"])
        if isinstance(saved.get("settings"), dict):
            saved["settings"] = comparable_settings(saved["settings"])
        if saved == identity:
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
    result = train(loaded, mixture, rows, config, image_root, progress=progress, dist=dist,
                   echo=echo if dist.rank == 0 else None)
    info = reference_info(mixture, labels.tasks, rows, config, source.describe(), result)
    path = Path(run) / REFERENCE_DIR
    if dist.rank == 0:
        path = save_reference(run, result["model"], {**info, "identity": identity},
                              result.get("moments"), result["checkpoints"].kept)
    dist.barrier()
    loss, per_task = info["loss"], info["sample"]["per_task"]
    skipped = ", ".join(f"{n:,} {r}" for r, n in result["skipped"].items())
    message = (f"trained on {info['sample']['trained']:,} records "
               f"({', '.join(f'{t} {n}' for t, n in per_task.items())}); "
               f"loss {loss['first']:.4g} → {loss['last']:.4g}; adapter in {path}"
               + (f"; skipped {skipped}" if skipped else ""))
    return Reference(path, info, result["model"], loaded, message)
