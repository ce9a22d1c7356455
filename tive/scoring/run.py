"""``tive score``: every record's projected gradient, norm, loss and token count,
written to ``RUN/store`` as they are computed; resumable, and data-parallel under torchrun.

This module orchestrates (docs/design.md, "Scoring"): the batches are planned by
:mod:`tive.scoring.plan`, the store's identity is built by :mod:`tive.scoring.identity`, and the loop that
runs them is :mod:`tive.scoring.loop`. A run resumes by computing the batches not yet marked done;
under ``torchrun`` the pending batches are dealt round-robin to the ranks, which write their
own part of the store (``store/parts/rank-R``), folded into the store by rank 0 at the end (and
at the start of the next session, after a crash). One seeded projection everywhere, so the
store reads as one.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tive.data.mixture import Mixture, load_mixture
from tive.data.tasks import label_tasks
from tive.errors import ConfigError, DataError
from tive.models.encoding import pad_id
from tive.models.load import load_model, pick_device, quiet_peft
from tive.models.registry import resolve
from tive.models.segments import has_placeholder
from tive.models.skips import SkipReason
from tive.projection.projectors import make_projector, require_cuda_kernel
from tive.scoring.checkpoints import CheckpointFeatures, checkpoints_of, identity_of
from tive.scoring.gradients import GradientFeatures
from tive.scoring.grow import NEXT_DIR, grows, kept_reference, open_store, recover, swap
from tive.scoring.identity import check_identity, finish_replacement, run_identity, store_meta
from tive.scoring.loop import Feeding, score_batches
from tive.scoring.plan import plan_work, progress_bar
from tive.scoring.settings import DEFAULT_BATCH, ScoreConfig, paper_dtypes, parse_key_layers
from tive.store.format import STORE_DIR, Store
from tive.store.writers import RowWriter, create_part, fold_parts, mark_complete
from tive.util.dist import Dist
from tive.util.files import remove_stale_temps
from tive.warmup.lora import adapters_to_model_dtype, key_coverage, key_parameters
from tive.warmup.moments import load_moments, moments_path
from tive.warmup.reference import REFERENCE_DIR, ensure_reference
from tive.warmup.settings import WarmupConfig
from tive.scoring.probe import measure, probe_rows
from tive.store.probe import PROBE_FILE, read_probe, write_probe
from tive.store.target import TARGET_DIR


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
        reused, dropped: for a store grown for other data (docs/design.md, "Incremental
            scoring"), rows copied from the previous store and its rows left out; None else.
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
    reused: int | None = None
    dropped: int = 0

    def lines(self) -> list[str]:
        rate = self.computed / self.seconds if self.seconds > 0 else float("nan")
        skipped = ", ".join(f"{n:,} {r}" for r, n in self.skipped.items()) or "none"
        n = self.images_ignored
        ignored = ([f"{n:,} record{'s have' if n > 1 else ' has'} an image but no <image> in "
                    f"the text: scored as text, as LLaVA's and Bunny's trainers use such records"]
                   if n else [])
        run = (f"{self.computed:,} in this run, {self.seconds:.1f} s, {rate:.2f} records/s"
               if self.computed else "every row reused: nothing to compute"
               if self.reused is not None else "already complete: nothing to compute")
        grown = ([f"incremental: {self.reused:,} rows reused from the previous store, "
                  f"{self.computed:,} computed, {self.dropped:,} dropped (records no longer in "
                  f"the data)"] if self.reused is not None else [])
        return [f"scored {self.scored:,} of {self.records:,} records ({run})", *grown,
                f"skipped: {skipped}", *ignored,
                *([f"batch size: {self.batch}"] if self.batch else []),
                f"store: {self.store}"]


def summarize(store: Store, computed: int, seconds: float, warmup: str) -> Summary:
    done, codes = store.array("done"), store.array("skipped")
    counts = Counter(codes[done & (codes > 0)].tolist())
    return Summary(store=store.root, records=store.n_records,
                   scored=int((done & (codes == 0)).sum()),
                   skipped={str(SkipReason.from_code(c)): int(n)
                            for c, n in sorted(counts.items())},
                   computed=computed, seconds=seconds, warmup=warmup)


@dataclass
class ScoreRun:
    """What one ``tive score`` session works with, gathered once and handed to each step.

    Attributes:
        source: the resolved model.
        mixture: the data; ``tasks`` its task labels ``(N,)``.
        run: the run folder; the store is ``run/store``.
        config: the scoring settings.
        task_field, image_root: as given (recorded in the store's identity).
        identity: the part of the store's identity known before the model is loaded
            (:func:`tive.scoring.identity.run_identity`); :func:`tive.scoring.identity.store_meta` completes it.
        dist: the processes sharing the work (one without torchrun).
        force: replace a store with another identity instead of refusing.
        progress: show a progress bar (rank 0).
        echo: called with progress lines (rank 0; a no-op elsewhere).
        folder: ``store``, or ``target`` when the records are the target's
            (:mod:`tive.store.target`).
    """

    source: Any
    mixture: Mixture
    tasks: np.ndarray
    run: Path
    config: ScoreConfig
    task_field: str | None
    image_root: Any
    identity: dict[str, Any]
    dist: Dist
    force: bool = False
    progress: bool = True
    echo: Callable[[str], None] = print
    folder: str = STORE_DIR
    growing: bool = False

    @property
    def root(self) -> Path:
        """The store folder (``RUN/store``, or ``RUN/target`` for the target records;
        ``.store.next`` while a store is grown for other data)."""
        return self.run / (NEXT_DIR if self.growing else self.folder)


def run_score(model: str, data: str | os.PathLike | Mixture, run: str | os.PathLike, *,
              reference: str | os.PathLike | None = None,
              config: ScoreConfig = ScoreConfig(), warmup: Any = None,
              dtype: str = "auto", device: str = "auto", task_field: str | None = None,
              image_root: Any = None, skip_missing_images: bool = False,
              force: bool = False, progress: bool = True, echo: Any = None,
              target: str | os.PathLike | Mixture | None = None) -> Summary:
    """Warm up (unless a reference is given or already in ``run``), then score every record;
    with ``target``, then score the target records too, into ``run/target``, with the same
    model, adapter, projector and settings (docs/design.md, "Targeted selection").

    Args:
        model: alias, hub id in the local cache, folder or ``.gguf`` file.
        data: the mixture (path or :class:`~tive.data.mixture.Mixture`).
        run: run folder (``reference/``, ``store/``).
        reference: a peft adapter folder to score with instead of warming up.
        config: scoring settings.
        warmup: :class:`~tive.warmup.training.WarmupConfig` for the warm-up (default: the authors').
        force: replace an existing store (and retrain an existing reference with other
            settings) instead of refusing.
        echo: called with progress lines (rank 0 only).
        target: the target records (path or :class:`~tive.data.mixture.Mixture`; their own
            task labels, by ``task_field`` or inferred); their summary is echoed.

    Returns:
        the store's :class:`Summary` (on every rank; rank 0's has the totals).
    """
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
        warm_dtype = dtype
        if config.paper:
            require_cuda_kernel(pick_device(device))
            warm_dtype, dtype, line = paper_dtypes(dtype, pick_device(device).type)
            echo(line)
        ctx = ScoreRun(source, mixture, labels.tasks, run, config, task_field, image_root,
                       run_identity(source, mixture, config, task_field, image_root), dist,
                       force, progress, echo)
        aim = None if target is None else _target_run(ctx, target, skip_missing_images)
        with dist.exclusive(run, "tive score"):  # held until the store is complete
            if dist.rank == 0:
                _clean_temps(run, echo)
                recover(run)
            dist.barrier()
            if aim is not None and not force and (aim.root / "meta.json").exists():
                check_identity(Store.open(aim.root), aim.identity)  # refuse before loading
            warm = (WarmupConfig(max_length=config.max_length, paper=config.paper)
                    if warmup is None else warmup)
            if warm.paper != config.paper:
                raise ConfigError("paper: the warm-up and the scoring settings disagree; fix: "
                                  "paper=True for both, or for neither")
            how = ""
            if not force and (ctx.root / "meta.json").exists():  # refuse before loading
                existing = Store.open(ctx.root)
                ctx.growing = grows(existing, ctx.identity)
                if not ctx.growing:
                    check_identity(existing, ctx.identity)
                if reference is None and kept_reference(run, mixture.fingerprint, warm):
                    reference, how = run / REFERENCE_DIR, "kept"
                    echo(f"{reference}: kept (trained on other data; the store was scored "
                         f"with it)")
            if reference is None:  # under torchrun, every rank trains its share
                ref = ensure_reference(run, source, mixture, labels, warm, dtype=warm_dtype,
                                       device=device, image_root=image_root, missing=missing,
                                       replace=force, progress=progress, dist=dist, echo=echo)
                echo(ref.message)
                how = "trained" if ref.model is not None else "reused"
            else:
                ref, how = None, how or "given"
                if config.optimizer_aware:  # before loading the model
                    moments_path(Path(reference))
            adapter = Path(reference) if reference is not None else run / REFERENCE_DIR
            if warm_dtype != dtype and ref is not None:  # scored in another type: reloaded
                ref.model = ref.loaded = None
            peft_model, loaded = _reference_model(source, adapter, ref, dtype, device)
            summary = _score(ctx, peft_model, loaded, adapter, how)
            if aim is not None:
                for line in _score(aim, peft_model, loaded, adapter, how).lines():
                    echo(f"target: {line}")
            return summary
    finally:
        dist.close()


def _target_run(ctx: ScoreRun, target: str | os.PathLike | Mixture,
                skip_missing_images: bool) -> ScoreRun:
    """The session scoring the target records into ``RUN/target``, with ``ctx``'s settings."""
    mixture = target if isinstance(target, Mixture) else load_mixture(target, ctx.task_field)
    _check_missing(mixture, mixture.missing_images(ctx.image_root), ctx.image_root,
                   skip_missing_images)
    config = replace(ctx.config, optimizer_aware=False)  # LESS: plain target gradients
    identity = run_identity(ctx.source, mixture, config, ctx.task_field, ctx.image_root)
    return replace(ctx, mixture=mixture, tasks=label_tasks(mixture).tasks, identity=identity,
                   folder=TARGET_DIR, config=config)


def _clean_temps(run: Path, echo: Any) -> None:
    """Remove what killed runs left in ``run``, its store, its target and a store being grown
    (temporary names), and say so."""
    removed = (remove_stale_temps(run) + remove_stale_temps(run / STORE_DIR)
               + remove_stale_temps(run / TARGET_DIR) + remove_stale_temps(run / NEXT_DIR))
    if removed:
        echo(f"removed {len(removed)} temporary file(s) left by killed runs: "
             f"{', '.join(p.name for p in removed)}")


def _reference_model(source: Any, adapter: Path, ref: Any, dtype: str,
                     device: str) -> tuple[Any, Any]:
    """The peft reference model: the one just trained, else ``adapter`` loaded on the model."""
    if ref is not None and ref.model is not None:
        return ref.model, ref.loaded
    if not (adapter / "adapter_config.json").exists():
        raise ConfigError(f"{adapter}: not a peft adapter folder (no adapter_config.json); "
                          f"fix: pass --reference to the folder `tive warmup` wrote")
    loaded = load_model(source, dtype=dtype, device=device)
    from peft import PeftModel

    try:
        with quiet_peft():
            model = PeftModel.from_pretrained(loaded.model, str(adapter))
    except Exception as e:  # peft/safetensors: shape mismatches and damaged files
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"{adapter}: cannot load this adapter onto {source.spec} "
                          f"({type(e).__name__}: {first}); fix: use the adapter trained for "
                          f"this model") from None
    return model.eval(), loaded


def _score(ctx: ScoreRun, peft_model: Any, loaded: Any, adapter: Path, how: str) -> Summary:
    """Score the pending batches of ``ctx``'s store with ``peft_model``; fold and finish it."""
    config, dist = ctx.config, ctx.dist
    last = parse_key_layers(config.key_layers)
    if config.adapter_dtype == "model":
        adapters_to_model_dtype(peft_model)
    keys = key_parameters(peft_model, last_layers=last)
    device = next(peft_model.parameters()).device
    config = replace(config, batch_size=config.batch_size or (
        "auto" if device.type == "cuda" else DEFAULT_BATCH))
    projector = make_projector(config.projector, [k.numel for k in keys], config.proj_dim or 0,
                               config.seed or 0, config.jl_nnz or 1, device)
    meta = store_meta(ctx.identity, source=ctx.source.describe(),
                      dtype=next(peft_model.parameters()).dtype, adapter=adapter, keys=keys,
                      projector=projector, mixture=ctx.mixture, config=config,
                      adapter_dtype=dict(peft_model.named_parameters())[keys[0].name].dtype,
                      coverage=key_coverage(peft_model, keys))
    points = checkpoints_of(adapter)  # LESS's warm-up checkpoints: one block each
    meta["identity"]["checkpoints"] = identity_of(adapter, points)
    growth = open_store(ctx.run, ctx.root, meta, ctx.mixture, ctx.tasks, ctx.image_root,
                        projector.dim * max(1, len(points)), ctx.config.feature_dtype,
                        ctx.force, ctx.growing) if dist.rank == 0 else None
    dist.barrier()
    store = Store.open(ctx.root)
    encoder = loaded.encoder(config.max_length)
    feed = Feeding.resolve(config, device, dist, store)
    work, mine, lengths = plan_work(ctx.mixture, encoder, store.array("done"), feed.planned,
                                    ctx.config.group_by_length, ctx.dist)
    writer = RowWriter(store.root) if dist.world == 1 else create_part(
        store, dist.rank, np.concatenate(mine) if mine else np.zeros(0, np.int64))
    bar = progress_bar(mine, lengths, ctx.progress, ctx.dist)
    start = time.perf_counter()
    moments = load_moments(adapter, [k.name for k in keys], device) \
        if config.optimizer_aware else None
    with GradientFeatures(peft_model, projector, last_layers=last,
                          checkpointing=config.gradient_checkpointing, moments=moments) as gf:
        if points:
            gf = CheckpointFeatures(gf, adapter, points, config.optimizer_aware)
        score_batches(gf, encoder, pad_id(loaded.tokenizer), ctx.mixture, mine, writer, config,
                      ctx.image_root, bar, workers=feed.workers, pin=feed.pin, limit=feed.limit,
                      on_limit=feed.record(ctx.root) if feed.auto else None)
    writer.close()
    bar.close()
    seconds = time.perf_counter() - start
    _finish(ctx)
    if dist.rank == 0 and ctx.folder == STORE_DIR and read_probe(ctx.root) is None:
        _probe(ctx, peft_model, loaded, adapter)
    if ctx.growing:
        if dist.rank == 0:
            swap(ctx.run)
        dist.barrier()
    summary = summarize(Store.open(ctx.run / ctx.folder), sum(len(rows) for rows in work),
                        seconds, how)
    ignored = sum(1 for r in ctx.mixture if r.images and not has_placeholder(r)) \
        if loaded.kind.ignores_unplaced_images else 0
    grown = {"reused": growth.reused, "dropped": growth.dropped} if growth is not None else {}
    return replace(summary, rank=dist.rank, images_ignored=ignored, batch=feed.describe(),
                   **grown)


def _probe(ctx: ScoreRun, peft_model: Any, loaded: Any, adapter: Path) -> None:
    """Write ``STORE/probe.json`` (measured by :mod:`tive.scoring.probe`, the file
    :mod:`tive.store.probe`): each task's loss on records outside the warm-up sample, with the
    adapter off and on; say in one line how much the warm-up lowered it."""
    trained, known = np.zeros(0, dtype=np.int64), False
    info = adapter / "reference.json"
    if info.is_file():  # the sample it was trained on, when it was trained on this data
        ref = json.loads(info.read_text(encoding="utf-8"))
        if ref.get("data", {}).get("fingerprint") == ctx.mixture.fingerprint:
            trained = np.asarray(ref.get("sample", {}).get("rows", []), dtype=np.int64)
            known = True
    rows = probe_rows(ctx.tasks, ctx.mixture.keys, trained)
    found = measure(peft_model, loaded, ctx.mixture, rows, ctx.config.max_length,
                    ctx.image_root)
    saved = write_probe(ctx.root, ctx.tasks, found, str(adapter), sample_known=known)
    drops = [1 - t["reference"] / t["base"] for t in saved["tasks"].values() if t["base"] > 0]
    where = ("outside the warm-up sample" if known else "(the warm-up sample of this adapter "
             "is not known for this data: some may be records it trained on)")
    ctx.echo(f"probe: {len(found['rows']):,} records {where}; the warm-up changed their loss "
             f"by {-max(drops):+.1%} to {-min(drops):+.1%} per task ({PROBE_FILE}, for "
             f"--task-value progress)" if drops else
             f"probe: no record {where} could be encoded ({PROBE_FILE})")


def _finish(ctx: ScoreRun) -> None:
    """Every rank done: rank 0 folds the parts, marks the store complete and deletes the store
    ``--force`` replaced."""
    ctx.dist.barrier()
    if ctx.dist.rank == 0:
        fold_parts(Store.open(ctx.root))
        mark_complete(Store.open(ctx.root))
        finish_replacement(ctx.root)
    ctx.dist.barrier()


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
