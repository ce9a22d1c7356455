"""The identity of a scored store: what it must match to be continued (docs/design.md,
"Identities"), and opening or creating the store for it.

The identity is built once per run, in two steps: :func:`run_identity` from what is known
before the model is loaded (model folder, data, settings: enough to refuse a mismatched store
early), then :func:`store_meta` adds what loading tells (weights' type, the adapter's digest,
the gradient's length, the projector's full description). Stores written by earlier versions
hold the same keys and values, so they keep opening.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from tive import __version__
from tive.data.mixture import Mixture
from tive.errors import ConfigError, StoreError
from tive.projection.registry import projector_named
from tive.scoring.settings import ScoreConfig
from tive.store.format import IndexEntry, Store
from tive.store.writers import create_store, fold_parts
from tive.warmup.lora import gradient_dim
from tive.warmup.moments import moments_sha256

# Identity keys that stores of earlier versions lack, and the value they were scored with.
LEGACY = {"adapter_dtype": "float32", "gradients": "sgd", "checkpoints": None}
REPLACED_DIR = ".store.replaced"  # the store --force replaces, kept until the new one is done


def replaced_dir(root: Path) -> Path:
    """Where ``--force`` keeps the store at ``root`` until its replacement is complete
    (``RUN/.store.replaced``, ``RUN/.target.replaced``)."""
    return root.with_name(REPLACED_DIR if root.name == "store" else f".{root.name}.replaced")


def adapter_sha256(folder: Path) -> str:
    """Digest of the adapter (its identity in the store): ``adapter_config.json`` (rank,
    alpha, targets) and the weights file peft loads (safetensors before ``.bin``)."""
    h = hashlib.sha256()
    folder = Path(folder)
    weights = [folder / n for n in ("adapter_model.safetensors", "adapter_model.bin")
               if (folder / n).exists()]
    if not weights or not (folder / "adapter_config.json").exists():
        raise ConfigError(f"{folder}: not a complete peft adapter (adapter_config.json and "
                          f"adapter_model.safetensors); fix: pass the folder `tive warmup` wrote")
    h.update(_normal_adapter_config(folder / "adapter_config.json"))
    with open(weights[0], "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _normal_adapter_config(path: Path) -> bytes:
    """``adapter_config.json`` with keys and name lists sorted: peft writes ``target_modules``
    from a set, whose order differs from one process to the next."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise ConfigError(f"{path}: unreadable ({e}); fix: pass the folder `tive warmup` "
                          f"wrote, or retrain with --force") from None

    def normal(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: normal(v) for k, v in value.items()}
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return sorted(value)
        return value

    return json.dumps(normal(config), sort_keys=True).encode("utf-8")


def run_identity(source: Any, mixture: Mixture, config: ScoreConfig, task_field: str | None,
                 image_root: Any) -> dict[str, Any]:
    """The part of a store's identity known before the model is loaded, as ``meta.json``
    holds it (``identity``, and the data's path for messages): enough to refuse a store
    begun with other settings before a model is loaded."""
    return {"identity": {
        "model": _model_identity(source.describe()),
        "projector": projector_named(config.projector).settings(config),
        "feature_dtype": config.feature_dtype,
        "data": mixture.fingerprint, "records": len(mixture), "max_length": config.max_length,
        "task_field": task_field,
        "image_root": image_root_setting(mixture, image_root),
        "gradients": "adam" if config.optimizer_aware else "sgd",
        # known now only for float32: "model" gives the weights' type, known once loaded
        **({"adapter_dtype": "float32"} if config.adapter_dtype == "float32" else {})},
        "data": {"path": str(mixture.path)}}


def store_meta(known: dict[str, Any], *, source: dict, dtype: Any, adapter: Path, keys: list,
               projector: Any, mixture: Mixture, config: ScoreConfig,
               adapter_dtype: Any, coverage: dict[str, Any] | None = None) -> dict[str, Any]:
    """meta.json of a scored store: :func:`run_identity`'s ``known`` completed with what the
    loaded model tells; its ``identity`` must match for a run to be continued.

    ``adapter_dtype``: the key LoRA matrices' type (float32 unless ``--adapter-dtype model``
    cast them to a 16-bit model's type); ``coverage``: the key parameters hooked against those
    expected (:func:`tive.warmup.lora.key_coverage`), with the ``--key-layers`` asked for."""
    first, digest = known["identity"], adapter_sha256(adapter)
    key_info = {"gradient_dim": gradient_dim(keys),
                "matrices": [{"name": k.name, "shape": list(k.shape)} for k in keys]}
    if coverage is not None:
        key_info["coverage"] = {**coverage, "key_layers": config.key_layers}
    identity = {"model": first["model"], "dtype": str(dtype).replace("torch.", ""),
                "adapter": digest[:16], "gradient_dim": key_info["gradient_dim"],
                **{k: v for k, v in first.items() if k != "model"}}
    identity["adapter_dtype"] = str(adapter_dtype).replace("torch.", "")
    identity["projector"] = projector.describe()  # the full description, in the same place
    if config.optimizer_aware:
        identity["moments"] = moments_sha256(adapter)[:16]
    settings = {k: first[k] for k in ("max_length", "task_field", "image_root")}
    return {"tive_version": __version__, "source": "tive score", "model": source,
            "adapter": {"path": str(Path(adapter).resolve()), "sha256": digest},
            "key_parameters": key_info, "projector": projector.describe(),
            "data": {"path": str(mixture.path.resolve()), "format": mixture.container,
                     "schema": mixture.schema, "fingerprint": mixture.fingerprint},
            "settings": {**settings, "batch_size": config.batch_size,
                         "padding_side": config.padding_side,
                         "group_by_length": config.group_by_length, "paper": config.paper,
                         "adapter_dtype": config.adapter_dtype},
            "identity": identity}


def check_identity(store: Store, meta: dict[str, Any]) -> None:
    """Refuse to continue a store built with other settings, model, adapter or data.

    Only the keys of ``meta["identity"]`` are compared (a check before the model is loaded
    gives those it knows already: see :func:`run_identity`).

    Raises:
        StoreError: naming each difference (stored → asked) and the remedy.
    """
    have, want = store.meta.get("identity"), meta["identity"]
    if have is not None:  # what a store written before a key existed was scored with
        have = {**{k: v for k, v in LEGACY.items() if k in want}, **have}
    if have is not None and "projector" in want and "projector" in have:  # a partial identity
        have = {**have, "projector": {k: v for k, v in have["projector"].items()
                                      if k in want["projector"]}}
    if have is not None:
        have = {k: v for k, v in have.items() if k in want}
    if have is None:
        raise StoreError(f"{store.root}: this store was not written by `tive score` "
                         f"({store.meta.get('source')}); fix: another --run folder, or --force "
                         f"to replace it")
    if (have.get("data"), have.get("records")) != (want.get("data"), want.get("records")):
        # other data: say which files, record counts and fingerprints, as `tive select` does
        store.check_data(want["data"], want["records"], meta.get("data", {}).get("path", "?"))
    diffs = [f"{k}: {_short(have.get(k))} → {_short(want.get(k))}"
             for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
    if diffs:
        raise StoreError(f"{store.root}: started with other settings ({'; '.join(diffs)}); "
                         f"fix: rerun with the store's settings to continue it, or use another "
                         f"--run folder (or --force) to start over")


def image_root_setting(mixture: Mixture, image_root: Any) -> str | None:
    """The image root as a store records it: None for the default (the data file's folder,
    however it is written), else the resolved folder."""
    if image_root is None:
        return None
    root = Path(image_root).resolve()
    return None if root == mixture.image_root().resolve() else str(root)


def _model_identity(source: dict) -> dict:
    """Where the weights are (resolved, so ``./m`` and ``/abs/m`` agree), their family and
    GGUF file."""
    return {"path": str(Path(source["path"]).resolve()) if source.get("path") else None,
            "family": source.get("family"), "gguf_file": source.get("gguf_file")}


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def open_or_create(root: Path, meta: dict[str, Any], mixture: Mixture, tasks: np.ndarray,
                   dim: int, feature_dtype: str, force: bool = False) -> Store:
    """The store at ``root``: continued when its identity matches, else created (an existing
    store with another identity is replaced only with ``force``).

    With ``force`` the old store (even a damaged one) is moved to ``RUN/.store.replaced`` and deleted only once the
    new one is complete (:func:`finish_replacement`), so a crash in between loses nothing.

    Raises:
        StoreError: an existing store with another identity (and not ``force``).
    """
    if os.path.lexists(root / "meta.json"):
        store = None
        try:
            store = Store.open(root)
            check_identity(store, meta)
        except StoreError:
            if not force:
                raise
            # --force starts over (when the settings differ or the store is damaged), keeping
            # the last complete store beside until the new one is complete
            _set_aside(root, complete=store is not None and store.complete)
        else:
            fold_parts(store)
            return Store.open(root)
    index = [IndexEntry(r.id, str(t), int(k)) for r, t, k in zip(mixture, tasks, mixture.keys)]
    return create_store(root, n=len(mixture), k=dim, index=index, meta=meta,
                        feature_dtype=feature_dtype)


def _set_aside(root: Path, complete: bool) -> None:
    """Move the store ``root`` to :func:`replaced_dir` (``RUN/.store.replaced``); an unfinished or damaged one is
    deleted instead when a complete one is already kept there."""
    old = replaced_dir(root)
    if os.path.lexists(old) and not complete:
        _remove(root)  # an unfinished replacement or a damaged store: the kept one stays
    else:
        _remove(old)
        os.replace(root, old)


def _remove(path: Path) -> None:
    """Delete a folder, or the symlink or file found in its place (never what a link names)."""
    import shutil

    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)


def finish_replacement(root: Path) -> None:
    """Delete the store that ``--force`` replaced, now that its replacement is complete."""
    import shutil

    shutil.rmtree(replaced_dir(root), ignore_errors=True)
