"""Stage 4 — ``tive score``: every record's projected gradient, norm, loss and token count,
written to ``RUN/store`` as they are computed; resumable, and data-parallel under torchrun.

Batches are fixed slices of the data's rows (batch ``j`` is rows ``[jB, (j+1)B)``, less the
records that cannot be encoded), so what a batch computes never depends on when or where it
runs. A run resumes by computing the batches not yet marked done; under ``torchrun`` the
pending batches are dealt round-robin to the ranks, which write their own part of the store
(``store/parts/rank-R``), folded into the store by rank 0 at the end (and at the start of the
next session, after a crash). One seeded projection everywhere, so the store reads as one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tive import __version__
from tive.data import Mixture
from tive.dist import Dist
from tive.errors import ConfigError, DataError, OutputError, StoreError
from tive.models.family import IMAGE_TOKENS
from tive.progress import TokenBar
from tive.skips import SkipReason
from tive.store import (
    STORE_DIR,
    IndexEntry,
    RowWriter,
    Store,
    create_part,
    create_store,
    fold_parts,
    mark_complete,
)

FEATURE_DTYPES = ("float16", "float32")
GROUP_WINDOW = 64  # batches per window of length grouping
TURN_TOKENS = 4  # template tokens around a turn, for the length estimate of grouping
DEFAULT_BATCH = 8  # records per batch on a CPU (on a GPU: auto)
REPLACED_DIR = ".store.replaced"  # the store --force replaces, kept until the new one is done


def _batch_size(value: Any) -> int | str | None:
    """``auto``, a positive integer (also as text), or None (the device's default)."""
    if value is None or value == "auto":
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"--batch-size {value!r}: expected auto or a number of records ≥ 1")
    return value


# The TIVE authors' features (their compute_gradient_features.py: TRAK's projector, seed 0).
AUTHORS = {"projector": "trak", "proj_dim": 8192, "seed": 0, "feature_dtype": "float16"}


@dataclass(frozen=True)
class ScoreConfig:
    """Settings of ``tive score``.

    Attributes:
        batch_size: records per forward/backward.
        max_length: tokens per record at most (longer records are truncated, as in training).
        projector: ``sparse-jl`` (default), ``trak`` (the authors') or ``none``.
        proj_dim: ``k``, features per record (default 8192; not for ``none``, whose features
            are the whole gradient).
        seed: the projection's seed (not for ``none``).
        jl_nnz: non-zeros per gradient coordinate of the sparse JL map (default 1; only for
            ``sparse-jl``).
        feature_dtype: storage type of the features.
        padding_side: where batches are padded (results do not depend on it).
        group_by_length: batch records of similar length together, within windows of
            :data:`GROUP_WINDOW` batches (less padding; results do not depend on it).
        paper: the authors' features exactly: TRAK's projector, seed 0, 8192 dims, float16
            (:data:`AUTHORS`); another value of those is refused.
        workers: processes encoding batches ahead of the model (None: from the CPU count on
            a GPU, 0 on a CPU; 0: a thread of this process).
        gradient_checkpointing: recompute each decoder layer's activations in the backward
            pass instead of keeping them (less memory, one more forward pass per layer; the
            same features up to float rounding).
        key_layers: ``last:N``, the key parameters of the last N decoder layers only (the
            backward stops there: faster; beyond the paper, never the default).
    """

    batch_size: int | str | None = None
    max_length: int = 2048
    projector: str | None = None
    proj_dim: int | None = None
    seed: int | None = None
    jl_nnz: int | None = None
    feature_dtype: str | None = None
    padding_side: str = "right"
    group_by_length: bool = True
    paper: bool = False
    workers: int | None = None
    gradient_checkpointing: bool = False
    key_layers: str | None = None

    def __post_init__(self) -> None:
        from tive.lora import parse_key_layers
        from tive.projection import KINDS

        object.__setattr__(self, "batch_size", _batch_size(self.batch_size))
        if self.workers is not None and (isinstance(self.workers, bool) or self.workers < 0):
            raise ConfigError(f"--workers {self.workers}: expected 0 (encode in this process) "
                              f"or a number of worker processes")
        parse_key_layers(self.key_layers)

        if self.paper:
            for name, value in AUTHORS.items():
                if getattr(self, name) not in (None, value):
                    raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: "
                                      f"--paper scores with the authors' {value}; fix: leave "
                                      f"it out, or leave out --paper")
            if self.jl_nnz is not None:
                raise ConfigError("--jl-nnz does not apply to --paper, which projects with "
                                  "TRAK's projector; fix: leave it out")
            for name, value in AUTHORS.items():
                object.__setattr__(self, name, value)
        if self.projector is None:
            object.__setattr__(self, "projector", "sparse-jl")
        if self.feature_dtype is None:
            object.__setattr__(self, "feature_dtype", "float16")
        if self.projector not in KINDS:
            raise ConfigError(f"--projector {self.projector!r}: expected one of "
                              f"{', '.join(KINDS)}")
        applies = {"sparse-jl": ("proj_dim", "seed", "jl_nnz"), "trak": ("proj_dim", "seed"),
                   "none": ()}[self.projector]
        defaults = {"proj_dim": 8192, "seed": 0, "jl_nnz": 1}
        for name, default in defaults.items():
            given = getattr(self, name)
            if given is not None and name not in applies:
                raise ConfigError(f"--{name.replace('_', '-')} does not apply to --projector "
                                  f"{self.projector}; fix: leave it out")
            if given is None and name in applies:
                object.__setattr__(self, name, default)
        for name in ("max_length", "proj_dim", "jl_nnz"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: "
                                  f"expected ≥ 1")
        if self.seed is not None and not 0 <= self.seed < 2**31:
            raise ConfigError(f"--seed {self.seed}: expected 0 ≤ seed < 2^31")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise ConfigError(f"--feature-dtype {self.feature_dtype!r}: expected one of "
                              f"{', '.join(FEATURE_DTYPES)}")
        if self.padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side={self.padding_side!r}: expected left or right")


@dataclass
class Summary:
    """What a scoring session did (for the command's last lines).

    Attributes:
        store: the store folder.
        records: rows in the store.
        scored: rows with features.
        skipped: reason → rows that could not be scored.
        computed: rows computed in this session (all ranks).
        seconds: this session's scoring time (model loading and warm-up excluded).
        warmup: what the warm-up did (``trained``, ``reused`` or ``given``).
        rank: the process that made this summary (0 prints it).
        images_ignored: records with an image but no ``<image>`` in their text, scored as
            text (LLaVA and Bunny).
        batch: the batch size used (``auto`` says what it settled on).
    """

    store: Path
    records: int
    scored: int
    skipped: dict[str, int]
    computed: int
    seconds: float
    warmup: str = ""
    rank: int = 0
    images_ignored: int = 0
    batch: str = ""

    def lines(self) -> list[str]:
        rate = self.computed / self.seconds if self.seconds > 0 else float("nan")
        skipped = ", ".join(f"{n:,} {r}" for r, n in self.skipped.items()) or "none"
        n = self.images_ignored
        ignored = ([f"{n:,} record{'s have' if n > 1 else ' has'} an image but no <image> in "
                    f"the text: scored as text, as LLaVA's and Bunny's trainers use such records"]
                   if n else [])
        run = (f"{self.computed:,} in this run, {self.seconds:.1f} s, {rate:.2f} records/s"
               if self.computed else "already complete: nothing to compute")
        return [f"scored {self.scored:,} of {self.records:,} records ({run})",
                f"skipped: {skipped}", *ignored,
                *([f"batch size: {self.batch}"] if self.batch else []),
                f"store: {self.store}"]


def plan_batches(n: int, batch_size: int,
                 lengths: np.ndarray | None = None) -> list[np.ndarray]:
    """The store rows of every batch, in the order they are scored.

    Without ``lengths``: consecutive slices of ``batch_size`` rows. With ``lengths`` ``(N,)``:
    each window of ``GROUP_WINDOW × batch_size`` consecutive rows is ordered longest first
    (stable, so ties keep row order) and cut into batches, so that a batch pads little. The
    plan depends only on the mixture and ``batch_size``, never on what is done already: a
    resumed run scores exactly the batches an uninterrupted one would.

    Returns:
        int64 arrays of rows; together every row of ``range(n)`` once.
    """
    if lengths is not None and len(lengths) != n:
        raise ValueError(f"lengths has {len(lengths)} rows, expected {n}")
    out = []
    window = GROUP_WINDOW * batch_size if lengths is not None else batch_size
    for start in range(0, n, window):
        rows = np.arange(start, min(start + window, n), dtype=np.int64)
        if lengths is not None:
            rows = rows[np.argsort(-np.asarray(lengths[rows], dtype=np.int64), kind="stable")]
        out.extend(rows[i:i + batch_size] for i in range(0, len(rows), batch_size))
    return out


def pending_batches(plan: list[np.ndarray], done: np.ndarray) -> list[np.ndarray]:
    """The rows not done of each batch of ``plan`` that has any.

    A batch is committed whole, so with the settings a store was begun with these are whole
    batches of the plan (and a resumed run is bit-identical); after a change of
    ``--batch-size`` or grouping, rows already done are not scored again.
    """
    out = []
    for rows in plan:
        left = rows[~done[rows]]
        if len(left):
            out.append(left)
    return out


def record_lengths(mixture: Mixture, encoder: Any, rows: np.ndarray | None = None,
                   chunk: int = 4096) -> np.ndarray:
    """``(N,)`` int64: each record's length in tokens as ``encoder`` makes it, estimated
    without loading images — its turns' text through the tokenizer (batched), plus
    ``TURN_TOKENS`` of template per turn and the encoder's tokens per image, at most its
    ``max_length``. The sort key of length grouping; integers, so every rank agrees.

    Args:
        rows: the rows to measure (others are 0); None: all.
    """
    out = np.zeros(len(mixture), dtype=np.int64)
    rows = np.arange(len(mixture)) if rows is None else np.asarray(rows, dtype=np.int64)
    per_image = getattr(encoder, "image_tokens", None) or IMAGE_TOKENS  # fixed, or estimated
    for start in range(0, len(rows), chunk):
        records = [mixture[int(i)] for i in rows[start:start + chunk]]
        # a lone surrogate (which JSON can hold) becomes "?": no tokenizer takes it, and the
        # record itself is skipped as an encoder error when it is scored
        texts = ["\n".join(t.text for t in r.turns).encode("utf-8", "replace").decode("utf-8")
                 for r in records]
        ids = encoder.tokenizer(texts, add_special_tokens=False)["input_ids"]
        out[rows[start:start + chunk]] = [
            len(x) + TURN_TOKENS * len(r.turns) + per_image * len(r.images)
            for x, r in zip(ids, records)]
    return np.minimum(out, encoder.max_length)


def open_window_rows(done: np.ndarray, batch_size: int) -> np.ndarray:
    """Rows of the grouping windows that still have a row not done (the only ones whose
    lengths the plan needs: a window all done has no pending batch, whatever its order)."""
    window = GROUP_WINDOW * batch_size
    spans = [np.arange(s, min(s + window, len(done)))
             for s in range(0, len(done), window) if not done[s:s + window].all()]
    return np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)


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


def store_meta(*, source: dict, dtype: torch.dtype, adapter: Path, keys: list, projector: Any,
               mixture: Mixture, config: ScoreConfig, task_field: str | None,
               image_root: Any) -> dict[str, Any]:
    """meta.json of a scored store; its ``identity`` must match for a run to be continued."""
    from tive.lora import gradient_dim

    key_info = {"gradient_dim": gradient_dim(keys),
                "matrices": [{"name": k.name, "shape": list(k.shape)} for k in keys]}
    settings = {"max_length": config.max_length, "task_field": task_field,
                "image_root": image_root_setting(mixture, image_root)}
    identity = {"model": _model_identity(source),
                "dtype": str(dtype).replace("torch.", ""),
                "adapter": adapter_sha256(adapter)[:16],
                "gradient_dim": key_info["gradient_dim"],
                "projector": projector.describe(), "feature_dtype": config.feature_dtype,
                "data": mixture.fingerprint, "records": len(mixture), **settings}
    return {"tive_version": __version__, "source": "tive score", "model": source,
            "adapter": {"path": str(Path(adapter).resolve()), "sha256": adapter_sha256(adapter)},
            "key_parameters": key_info, "projector": projector.describe(),
            "data": {"path": str(mixture.path.resolve()), "format": mixture.container,
                     "schema": mixture.schema, "fingerprint": mixture.fingerprint},
            "settings": {**settings, "batch_size": config.batch_size,
                         "padding_side": config.padding_side,
                         "group_by_length": config.group_by_length, "paper": config.paper},
            "identity": identity}


def check_identity(store: Store, meta: dict[str, Any]) -> None:
    """Refuse to continue a store built with other settings, model, adapter or data.

    Only the keys of ``meta["identity"]`` are compared (a check before the model is loaded
    gives those it knows already: see :func:`early_identity`).

    Raises:
        StoreError: naming each difference (stored → asked) and the remedy.
    """
    have, want = store.meta.get("identity"), meta["identity"]
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


def early_identity(source: Any, mixture: Mixture, config: ScoreConfig, task_field: str | None,
                   image_root: Any) -> dict[str, Any]:
    """The part of a store's identity known before the model is loaded."""
    projector = {"type": config.projector}
    projector.update({k: v for k, v in (("dim", config.proj_dim), ("seed", config.seed),
                                        ("nnz", config.jl_nnz)) if v is not None})
    return {"identity": {
        "model": _model_identity(source.describe()),
        "projector": projector, "feature_dtype": config.feature_dtype,
        "data": mixture.fingerprint, "records": len(mixture), "max_length": config.max_length,
        "task_field": task_field,
        "image_root": image_root_setting(mixture, image_root)},
        "data": {"path": str(mixture.path)}}


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

    With ``force`` the old store is moved to ``RUN/.store.replaced`` and deleted only once the
    new one is complete (:func:`finish_replacement`), so a crash in between loses nothing.

    Raises:
        StoreError: an existing store with another identity (and not ``force``).
    """
    import shutil

    if (root / "meta.json").exists():
        store = Store.open(root)
        try:
            check_identity(store, meta)
        except StoreError:
            if not force:
                raise
            # --force starts over (only when the settings differ), keeping the last complete
            # store beside until the new one is complete
            old = root.with_name(REPLACED_DIR)
            if old.exists() and not store.complete:
                shutil.rmtree(root)  # an unfinished replacement: the kept one stays
            else:
                shutil.rmtree(old, ignore_errors=True)
                os.replace(root, old)
        else:
            fold_parts(store)
            return Store.open(root)
    index = [IndexEntry(r.id, str(t), int(k)) for r, t, k in zip(mixture, tasks, mixture.keys)]
    return create_store(root, n=len(mixture), k=dim, index=index, meta=meta,
                        feature_dtype=feature_dtype)


def finish_replacement(root: Path) -> None:
    """Delete the store that ``--force`` replaced, now that its replacement is complete."""
    import shutil

    shutil.rmtree(root.with_name(REPLACED_DIR), ignore_errors=True)


def score_batches(gf: Any, encoder: Any, pad: int, mixture: Mixture, work: list[np.ndarray],
                  writer: RowWriter, config: ScoreConfig, image_root: Any = None,
                  progress: Any = None, workers: int = 0, pin: bool = False,
                  limit: int | None = None,
                  on_limit: Any = None) -> int:
    """Compute and write ``work`` (the store rows of each batch, in order); return the rows
    written.

    Args:
        workers: processes encoding batches ahead (0: a thread of this one).
        pin: pinned host memory for the inputs (their copy to the GPU overlaps).
        limit: most records per forward/backward (``--batch-size auto``: batches are cut to
            it; None with a fixed batch size, whose batches are never cut).
        on_limit: called with the new limit when a batch did not fit in GPU memory and was
            halved (``--batch-size auto``); None: out of memory is an error.
    """
    from tive.batches import EncodedBatches, prepared_batches, split_rows

    written = 0
    pending = split_rows(work, limit)
    while pending:
        dataset = EncodedBatches(encoder, mixture, pending, image_root, pad,
                                 config.padding_side)
        done = 0
        try:
            for prepared in prepared_batches(dataset, workers, pin):
                _score_one(gf, prepared, writer)
                done += 1
                written += len(prepared.rows)
                if progress is not None:
                    progress.update(len(prepared.rows))
            pending = []
        except torch.cuda.OutOfMemoryError:
            failed = pending[done]
            if on_limit is None or len(failed) == 1:
                raise OutputError(_oom_message(mixture, failed, on_limit is None)) from None
            limit = len(failed) // 2  # halve, and retry the same rows
            on_limit(limit)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            pending = split_rows(pending[done:], limit)
    return written


def _score_one(gf: Any, prepared: Any, writer: RowWriter) -> None:
    """Features of one prepared batch, written with each row's skip reason."""
    rows, at = prepared.rows, prepared.at
    n = len(rows)
    features = np.zeros((n, gf.projector.dim), dtype=np.float32)
    norms = np.full(n, np.nan)
    loss = np.full(n, np.nan)
    ntokens = np.full(n, -1, dtype=np.int64)
    skipped = np.array([0 if r is None else r.code for r in prepared.reasons], dtype=np.int8)
    if prepared.inputs is not None:
        result = gf(prepared.inputs)
        features[at] = unit_rows(result.features)
        norms[at], loss[at] = result.norms, result.loss
        ntokens[at] = result.ntokens
        bad = ~result.finite
        skipped[at[bad]] = SkipReason.NON_FINITE.code
        skipped[at[result.ntokens == 0]] = SkipReason.NO_SUPERVISED_TOKEN.code
    writer.write(rows, features, norms, loss, ntokens, skipped)


def _oom_message(mixture: Mixture, rows: np.ndarray, fixed: bool) -> str:
    first = mixture[int(rows[0])]
    if fixed:
        return (f"a batch of {len(rows)} records (from record {int(rows[0])}, id {first.id}) "
                f"does not fit in GPU memory; nothing of it was written; fix: --batch-size auto "
                f"(halves until it fits), a smaller --batch-size, or --gradient-checkpointing")
    return (f"record {int(rows[0])} (id {first.id}) alone does not fit in GPU memory; fix: a "
            f"smaller --max-length, --gradient-checkpointing, or --key-layers last:N")


def unit_rows(features: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (zero rows stay zero).

    Selection uses only the features' directions (cosines); the exact gradient norm is kept
    in ``norms.npy``. Unit rows always fit float16 with full relative precision, whatever the
    size of the gradient (a well-learnt record's tiny gradient would underflow otherwise).
    """
    f = features.astype(np.float64)
    n = np.linalg.norm(f, axis=1, keepdims=True)
    return np.divide(f, n, out=np.zeros_like(f), where=n > 0).astype(np.float32)


def summarize(store: Store, computed: int, seconds: float, warmup: str) -> Summary:
    done, codes = store.array("done"), store.array("skipped")
    counts = Counter(codes[done & (codes > 0)].tolist())
    return Summary(store=store.root, records=store.n_records,
                   scored=int((done & (codes == 0)).sum()),
                   skipped={str(SkipReason.from_code(c)): int(n)
                            for c, n in sorted(counts.items())},
                   computed=computed, seconds=seconds, warmup=warmup)


def run_score(model: str, data: str | os.PathLike | Mixture, run: str | os.PathLike, *,
              reference: str | os.PathLike | None = None,
              config: ScoreConfig = ScoreConfig(), warmup: Any = None,
              dtype: str = "auto", device: str = "auto", task_field: str | None = None,
              image_root: Any = None, skip_missing_images: bool = False,
              force: bool = False, progress: bool = True,
              echo: Any = None) -> Summary:
    """Warm up (unless a reference is given or already in ``run``), then score every record.

    Args:
        model: alias, hub id in the local cache, folder or ``.gguf`` file.
        data: the mixture (path or :class:`~tive.data.Mixture`).
        run: run folder (``reference/``, ``store/``).
        reference: a peft adapter folder to score with instead of warming up.
        config: scoring settings.
        warmup: :class:`~tive.warmup.WarmupConfig` for the warm-up (default: the authors').
        force: replace an existing store (and retrain an existing reference with other
            settings) instead of refusing.
        echo: called with progress lines (rank 0 only).

    Returns:
        the :class:`Summary` (on every rank; rank 0's has the totals).
    """
    from tive import warmup as wu
    from tive.data import load_mixture
    from tive.models.registry import resolve
    from tive.tasks import label_tasks

    dist = Dist.from_env(device)
    try:
        echo = echo if (echo is not None and dist.rank == 0) else (lambda line: None)
        run = Path(run)
        source = resolve(model)
        mixture = data if isinstance(data, Mixture) else load_mixture(data, task_field)
        labels = label_tasks(mixture)
        missing = mixture.missing_images(image_root)
        _check_missing(mixture, missing, image_root, skip_missing_images)
        device = dist.device(device)
        if config.paper:
            from tive.models.load import pick_device
            from tive.projection import require_cuda_kernel

            require_cuda_kernel(pick_device(device))
        with dist.exclusive(run, "tive score"):  # held until the store is complete
            if dist.rank == 0:
                _clean_temps(run, echo)
            if not force and (run / STORE_DIR / "meta.json").exists():  # refuse before loading
                check_identity(Store.open(run / STORE_DIR),
                               early_identity(source, mixture, config, task_field, image_root))
            warm = (wu.WarmupConfig(max_length=config.max_length, paper=config.paper)
                    if warmup is None else warmup)
            if warm.paper != config.paper:
                raise ConfigError("paper: the warm-up and the scoring settings disagree; fix: "
                                  "paper=True for both, or for neither")
            if reference is None:  # under torchrun, every rank trains its share
                ref = wu.ensure_reference(run, source, mixture, labels, warm, dtype=dtype,
                                          device=device, image_root=image_root, missing=missing,
                                          replace=force, progress=progress, dist=dist, echo=echo)
                echo(ref.message)
                how = "trained" if ref.model is not None else "reused"
            else:
                ref, how = None, "given"
            adapter = Path(reference) if reference is not None else run / wu.REFERENCE_DIR
            peft_model, loaded = _reference_model(source, adapter, ref, dtype, device)
            return _score(peft_model, loaded, source, adapter, mixture, labels.tasks, run, config,
                          task_field, image_root, dist, force, progress, how)
    finally:
        dist.close()


def _clean_temps(run: Path, echo: Any) -> None:
    """Remove what killed runs left in ``run`` and its store (temporary names), and say so."""
    from tive.fileio import remove_stale_temps

    removed = remove_stale_temps(run) + remove_stale_temps(run / STORE_DIR)
    if removed:
        echo(f"removed {len(removed)} temporary file(s) left by killed runs: "
             f"{', '.join(p.name for p in removed)}")


def _reference_model(source: Any, adapter: Path, ref: Any, dtype: str,
                     device: str) -> tuple[Any, Any]:
    """The peft reference model: the one just trained, else ``adapter`` loaded on the model."""
    from tive.models.load import load_model

    if ref is not None and ref.model is not None:
        return ref.model, ref.loaded
    if not (adapter / "adapter_config.json").exists():
        raise ConfigError(f"{adapter}: not a peft adapter folder (no adapter_config.json); "
                          f"fix: pass --reference to the folder `tive warmup` wrote")
    loaded = load_model(source, dtype=dtype, device=device)
    from peft import PeftModel

    try:
        from tive.models.load import quiet_peft

        with quiet_peft():
            model = PeftModel.from_pretrained(loaded.model, str(adapter))
    except Exception as e:  # peft/safetensors: shape mismatches and damaged files
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"{adapter}: cannot load this adapter onto {source.spec} "
                          f"({type(e).__name__}: {first}); fix: use the adapter trained for "
                          f"this model") from None
    return model.eval(), loaded


def _score(peft_model: Any, loaded: Any, source: Any, adapter: Path, mixture: Mixture,
           tasks: np.ndarray, run: Path, config: ScoreConfig, task_field: str | None,
           image_root: Any, dist: Dist, force: bool, progress: bool, how: str) -> Summary:
    from tqdm.auto import tqdm

    from tive.encode import has_placeholder, pad_id
    from tive.gradients import GradientFeatures
    from tive.lora import key_parameters, parse_key_layers
    from tive.projection import make_projector

    last = parse_key_layers(config.key_layers)
    keys = key_parameters(peft_model, last_layers=last)
    dims = [k.numel for k in keys]
    device = next(peft_model.parameters()).device
    config = replace(config, batch_size=config.batch_size or (
        "auto" if device.type == "cuda" else DEFAULT_BATCH))
    projector = make_projector(config.projector, dims, config.proj_dim or 0, config.seed or 0,
                               config.jl_nnz or 1, device)
    dtype = next(peft_model.parameters()).dtype
    meta = store_meta(source=source.describe(), dtype=dtype, adapter=adapter, keys=keys,
                      projector=projector, mixture=mixture, config=config,
                      task_field=task_field, image_root=image_root)
    root = run / STORE_DIR
    if dist.rank == 0:
        open_or_create(root, meta, mixture, tasks, projector.dim, config.feature_dtype, force)
    dist.barrier()
    store = Store.open(root)
    encoder = loaded.encoder(config.max_length)
    done = store.array("done")
    feed = Feeding.resolve(config, device, dist, store)
    lengths = None
    if config.group_by_length:  # measured once, on rank 0, so that every rank has one plan
        lengths = dist.broadcast(
            record_lengths(mixture, encoder, open_window_rows(done, feed.planned))
            if dist.rank == 0 else None)
    work = pending_batches(plan_batches(len(mixture), feed.planned, lengths), done)
    mine = work[dist.rank::dist.world]
    if dist.world == 1:
        writer = RowWriter(store.root)
    else:
        rows = np.concatenate(mine) if mine else np.zeros(0, np.int64)
        writer = create_part(store, dist.rank, rows)
    total = sum(len(rows) for rows in mine)
    shown = {"disable": not progress or dist.rank != 0 or total == 0, "smoothing": 0.1,
             "desc": "score" if dist.world == 1 else f"score (rank 0 of {dist.world})"}
    # longest batches first: a bar in estimated tokens gives an honest time left
    bar = (TokenBar(mine, lengths, **shown) if lengths is not None
           else tqdm(total=total, unit="rec", **shown))
    start = time.perf_counter()
    with GradientFeatures(peft_model, projector, last_layers=last,
                          checkpointing=config.gradient_checkpointing) as gf:
        score_batches(gf, encoder, pad_id(loaded.tokenizer), mixture, mine, writer, config,
                      image_root, bar, workers=feed.workers, pin=feed.pin, limit=feed.limit,
                      on_limit=feed.record(root) if feed.auto else None)
    writer.close()
    bar.close()
    seconds = time.perf_counter() - start
    dist.barrier()
    store = Store.open(root)
    if dist.rank == 0:
        fold_parts(store)
        store = mark_complete(Store.open(root))
        finish_replacement(root)
    dist.barrier()
    summary = summarize(Store.open(root), sum(len(rows) for rows in work), seconds, how)
    ignored = sum(1 for r in mixture if r.images and not has_placeholder(r)) \
        if loaded.kind.ignores_unplaced_images else 0
    return replace(summary, rank=dist.rank, images_ignored=ignored, batch=feed.describe())


@dataclass
class Feeding:
    """How the planned batches reach the model.

    Attributes:
        planned: records per planned batch (``--batch-size``, or :data:`AUTO_START` for auto).
        auto: ``--batch-size auto``: a batch that does not fit in GPU memory is halved.
        limit: most records per forward/backward so far (auto; None: the planned size).
        workers: encoding processes (0: a thread of this one).
        pin: inputs in pinned memory (on a GPU).
        rank: this process's rank (rank 0 alone writes meta.json).
        halvings: how often auto halved the batch in this run.
    """

    planned: int
    auto: bool
    limit: int | None
    workers: int
    pin: bool
    rank: int = 0
    halvings: int = 0

    @classmethod
    def resolve(cls, config: ScoreConfig, device: torch.device, dist: Dist,
                store: Store) -> Feeding:
        """The feeding of this run; auto resumes from the size a killed run had reached."""
        from tive.batches import AUTO_START, default_workers

        auto = config.batch_size == "auto"
        workers = (default_workers(device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
                   if config.workers is None else config.workers)
        reached = store.meta.get("settings", {}).get("batch_used") if auto else None
        return cls(AUTO_START if auto else int(config.batch_size), auto,
                   int(reached) if isinstance(reached, int) else None, workers,
                   device.type == "cuda", dist.rank)

    def record(self, root: Path) -> Any:
        """The ``on_limit`` of :func:`score_batches`: remember the size that fits, in this
        object and (rank 0's) in ``meta.json``, so a resumed run starts from it."""
        from tive.fileio import write_json

        def on_limit(limit: int) -> None:
            self.limit, self.halvings = limit, self.halvings + 1
            if self.rank == 0:
                meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
                meta.setdefault("settings", {})["batch_used"] = limit
                write_json(root / "meta.json", meta)

        return on_limit

    def describe(self) -> str:
        workers = f"{self.workers} encoding worker{'s' if self.workers != 1 else ''}"
        if not self.auto:
            return f"{self.planned} ({workers})"
        used = self.limit or self.planned
        how = (f", after {self.halvings} halving{'s' if self.halvings > 1 else ''} out of GPU "
               f"memory" if self.halvings else "")
        return f"auto → {used}{how} ({workers})"


def _check_missing(mixture: Mixture, missing: np.ndarray, image_root: Any,
                   skip_missing_images: bool) -> None:
    """Missing images are recorded as skips; but when *every* image is missing the image root
    is most likely wrong, and that is an error unless ``skip_missing_images``."""
    with_images = np.array([bool(r.images) for r in mixture])
    if with_images.any() and missing[with_images].all() and not skip_missing_images:
        raise DataError(f"{mixture.path}: none of the {int(with_images.sum()):,} records with "
                        f"images finds its image under {mixture.image_root(image_root)}; fix: "
                        f"--image-root DIR, or --skip-missing-images to score the text records "
                        f"only")
