"""The ``tive`` command line. It only orchestrates; every stage lives in its own module."""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path
from typing import Any, Iterator

import click

from tive import __version__
from tive.cli.check import STRICT_HELP, check
from tive.cli.inspect import doctor, report, tasks
from tive.cli.share import apply, merge
from tive.cli.options import (
    DEFAULT_RUN,
    data_options,
    mixture_path,
    model_options,
    option_flag,
    reasons,
    removed_temps,
    settings_options,
    task_option,
)
from tive.errors import TiveError
from tive.models.registry import resolve
from tive.scoring.settings import ScoreConfig
from tive.selection.settings import SelectConfig
from tive.settings import cli_names
from tive.util.files import is_null_device, run_lock
from tive.warmup.settings import WarmupConfig

WORKFLOW = ("tasks", "warmup", "score", "import", "merge", "select", "report", "check", "apply",
            "doctor")


class _Group(click.Group):
    """Lists commands in workflow order with their whole first line, and prints a
    :class:`TiveError` as one line (``error: ...``) and exits with status 2."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = super().list_commands(ctx)
        return [n for n in WORKFLOW if n in names] + [n for n in names if n not in WORKFLOW]

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=10_000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        for stream in (sys.stdout, sys.stderr):  # a lone surrogate in a task or id prints as
            with contextlib.suppress(AttributeError, ValueError):  # its \u escape, not a crash
                stream.reconfigure(errors="backslashreplace")
        try:
            with cli_names(), _terminate_as_interrupt():
                return super().invoke(ctx)
        except TiveError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except (KeyboardInterrupt, _Terminated) as e:
            name = ctx.invoked_subcommand or ""
            click.echo(f"\n{'terminated' if isinstance(e, _Terminated) else 'interrupted'}: "
                       f"{KEPT.get(name, KEPT[''])}", err=True)
            sys.exit(143 if isinstance(e, _Terminated) else 130)


# what an interrupted command leaves, and how to go on (one line on stderr)
KEPT = {"score": "the finished warm-up and every row scored so far are kept in the run "
                 "folder; run the same command again to resume",
        "warmup": "nothing of this warm-up was kept (the adapter is saved only once trained); "
                  "run the same command again to start it over",
        "": "nothing was written (outputs appear whole or not at all); run the same command "
            "again"}


class _Terminated(BaseException):
    """SIGTERM, raised like ``KeyboardInterrupt`` so that every ``finally`` runs."""


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM raises :class:`_Terminated` (in the main thread)."""
    def raise_(signum: int, frame: Any) -> None:
        raise _Terminated()

    try:
        old = signal.signal(signal.SIGTERM, raise_)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tive")
def main() -> None:
    """Find the high-value part of a visual instruction-tuning mixture (TIVE)."""


@main.command("import")
@click.option("--data", type=click.Path(path_type=Path), callback=mixture_path,
              help="The mixture the features belong to (row order must match).")
@click.option("--features", type=click.Path(path_type=Path), help="(N, k) .npy of features.")
@click.option("--norms", type=click.Path(path_type=Path), help="(N,) .npy of exact norms.")
@click.option("--loss", type=click.Path(path_type=Path), help="(N,) .npy of per-record losses.")
@click.option("--ntokens", type=click.Path(path_type=Path),
              help="(N,) .npy of supervised token counts.")
@click.option("--ids", type=click.Path(path_type=Path),
              help="Ids of the rows of the arrays (JSON list, .npy or one per line), when "
                   "their order is not the data's.")
@click.option("--tive-outputs", type=click.Path(file_okay=False, path_type=Path),
              help="Folder of the TIVE authors' output_{i} and output_norm_{i}.json files.")
@click.option("--run", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_RUN,
              show_default=True, help="Run folder; the store goes to RUN/store.")
@click.option("--feature-dtype", type=click.Choice(["float16", "float32"]), default="float16",
              show_default=True, help="Storage type of the features.")
@click.option("--target-features", type=click.Path(path_type=Path),
              help="(M, k) .npy of the target records' features, computed with the store's "
                   "reference and projection; goes to RUN/target (with --target-data, instead "
                   "of a store).")
@click.option("--target-data", type=click.Path(path_type=Path),
              help="The target records (what the model should get better at), in the rows' "
                   "order of --target-features.")
@click.option("--force", is_flag=True, help="Replace an existing store (or target) in RUN.")
@data_options
def import_(data: Path | None, features: Path | None, norms: Path | None, loss: Path | None,
            ntokens: Path | None, ids: Path | None, tive_outputs: Path | None, run: Path,
            target_features: Path | None, target_data: Path | None, feature_dtype: str,
            force: bool, task_field: str | None, image_root: Path | None,
            skip_missing_images: bool) -> None:
    """Build a store from features computed elsewhere (.npy arrays or the authors' outputs),
    or a target (RUN/target) for a store."""
    import numpy as np

    from tive.data.mixture import load_mixture
    from tive.data.tasks import label_tasks
    from tive.store import external as importers

    if target_features is not None or target_data is not None:
        given = [f for f, v in (("--data", data), ("--features", features), ("--norms", norms),
                                ("--loss", loss), ("--ntokens", ntokens), ("--ids", ids),
                                ("--tive-outputs", tive_outputs)) if v is not None]
        if given or target_features is None or target_data is None:
            raise click.UsageError("--target-features and --target-data go together, without "
                                   f"the store's options{f' ({given[0]})' if given else ''}")
        return _import_target(run, target_features, target_data, feature_dtype, force,
                              task_field, image_root, skip_missing_images)
    if data is None:
        raise click.UsageError("Missing option '--data'.")
    if (tive_outputs is None) == (features is None and norms is None):
        raise click.UsageError("give either --features and --norms, or --tive-outputs")
    if tive_outputs is None and (features is None or norms is None):
        raise click.UsageError("--features and --norms go together")
    mixture = load_mixture(data, task_field=task_field)
    labels = label_tasks(mixture)
    missing = mixture.check_images(image_root, skip_missing_images)
    if tive_outputs is not None:
        arrays = importers.read_authors_outputs(tive_outputs)
        source = f"tive-authors:{tive_outputs}"
    else:
        arrays = {"features": importers.load_npy(features, "features"),
                  "norms": importers.load_npy(norms, "norms")}
        source = f"npy:{features}"
    for name, path in (("loss", loss), ("ntokens", ntokens)):
        if path is not None:
            arrays[name] = importers.load_npy(path, name)
    arrays = importers.check_arrays(arrays, len(mixture), str(mixture.path))
    if ids is not None:
        arrays = importers.reorder_by_ids(mixture, importers.read_ids(ids), arrays, str(ids))
    settings = {"task_field": task_field,
                "image_root": None if image_root is None else str(image_root.resolve()),
                "skip_missing_images": skip_missing_images}
    with run_lock(run, "tive import"):
        removed_temps(run)
        store = importers.import_store(run, mixture, labels, arrays, source=source,
                                       settings=settings, feature_dtype=feature_dtype,
                                       skipped=np.where(missing, 1, 0).astype(np.int8),
                                       overwrite=force)
    click.echo(f"imported {store.n_records:,} records × {store.dim} features into {store.root}"
               + (f" ({int(missing.sum()):,} with missing images left out)" if missing.any()
                  else ""))


def _import_target(run: Path, features: Path, data: Path, feature_dtype: str, force: bool,
                   task_field: str | None, image_root: Path | None,
                   skip_missing_images: bool) -> None:
    """``tive import --target-features F.npy --target-data VAL`` into ``RUN/target``."""
    import numpy as np

    from tive.data.mixture import load_mixture
    from tive.data.tasks import label_tasks
    from tive.store.external import load_npy
    from tive.store.format import Store
    from tive.store.target import import_target

    store = Store.open(run)
    mixture = load_mixture(data, task_field=task_field)
    missing = mixture.check_images(image_root, skip_missing_images)
    settings = {"task_field": task_field,
                "image_root": None if image_root is None else str(image_root.resolve())}
    with run_lock(run, "tive import"):
        removed_temps(run)
        target = import_target(run, store, mixture, label_tasks(mixture).tasks,
                               load_npy(features, "target-features"), source=f"npy:{features}",
                               settings=settings, feature_dtype=feature_dtype,
                               skipped=np.where(missing, 1, 0).astype(np.int8), overwrite=force)
    click.echo(f"imported {target.n_records:,} target records × {target.dim} features into "
               f"{target.root}")


@main.command()
@click.option("--run", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_RUN,
              show_default=True, help="Run folder holding store/ (from tive score or import).")
@settings_options(SelectConfig)
@click.option("--output", "-o", type=click.Path(path_type=Path),
              help="Subset file; its .report.json, .png and .html go beside it (never over a "
                   "device, FIFO or socket; -o /dev/null discards all four)  [default: "
                   "RUN/subset-METHOD-BUDGET in the data's format]")
@click.option("--data", type=click.Path(path_type=Path), callback=mixture_path,
              help="The mixture (must match the store's)  [default: the one the store was "
                   "built from]")
@click.option("--strict", is_flag=True, help=STRICT_HELP + " Nothing is written then.")
@task_option
def select(run: Path, output: Path | None, data: Path | None, task_field: str | None,
           strict: bool, **config: Any) -> None:
    """Value tasks and records and write the chosen subset, a JSON report and a chart.

    Records the store could not score (missing images, nothing supervised, non-finite
    gradients) are left out and counted in the report. The health checks of the store, the
    values and the selection are told as warnings (tive check).
    """
    import numpy as np

    from tive.api import value_estimate
    from tive.health.findings import tell, warnings_in
    from tive.health.run import select_findings
    from tive.store.format import Store

    cfg = SelectConfig(**{**config, "exclude": tuple(config["exclude"])})
    store = Store.open(run)  # the run folder, or the store itself
    report = value_estimate(store=store, data=data, task_field=task_field)
    selection = report.select_with(cfg)
    click.echo(selection.table())
    for note in selection.notes:
        click.echo(note)
    tell(warnings_in(select_findings(store, selection)), lambda line: click.echo(line, err=True),
         strict)  # the notes (checks that could not be made) are tive check's
    if output is None:
        name = f"subset-{cfg.method}-{cfg.budget.name}{report.mixture.default_suffix()}"
        output = run / name
    removed_temps(output.parent)
    inputs = [report.mixture.path, *sorted(store.root.iterdir())]
    paths = selection.save(output, inputs=inputs)
    left = sum(report.invalid.values())
    hint = cfg.budget.percent_hint(len(report.tasks))
    click.echo(f"\nselected {len(selection.indices):,} of {len(report.tasks):,} records "
               f"({len(np.unique(selection.indices)):,} distinct)"
               + (f"; {left:,} left out: {reasons(report.invalid)}" if left else "")
               + (f"; {hint}" if hint else ""))
    if is_null_device(output):
        click.echo(f"discarded: {output} is the null device; nothing was written")
        return
    for kind, path in paths.items():
        click.echo(f"{kind:>8}: {path}")


@main.command()
@model_options
@click.option("--data", required=True, type=click.Path(path_type=Path), callback=mixture_path,
              help="The mixture.")
@click.option("--run", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_RUN,
              show_default=True, help="Run folder; the adapter goes to RUN/reference.")
@settings_options(WarmupConfig, skip=("paper",))
@settings_options(WarmupConfig, only=("paper",))
@click.option("--force", is_flag=True, help="Retrain even if RUN/reference exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@data_options
def warmup(model_spec: str, dtype: str, device: str, data: Path, run: Path, force: bool,
           quiet: bool, task_field: str | None, image_root: Path | None,
           skip_missing_images: bool, **settings: Any) -> None:
    """Train the warm-up LoRA reference model on an equal-per-task sample of the mixture
    (the TIVE authors' recipe by default; see the table in docs/models.md)."""
    from tive.data.mixture import load_mixture
    from tive.data.tasks import label_tasks
    from tive.util.dist import Dist
    from tive.warmup.reference import ensure_reference

    config = WarmupConfig(**settings)
    source = resolve(model_spec)
    mixture = load_mixture(data, task_field=task_field)
    dist = Dist.from_env(device)  # under torchrun: data-parallel, rank 0 saves
    try:
        with dist.exclusive(run, "tive warmup"):
            if dist.rank == 0:
                removed_temps(run)
            ref = ensure_reference(
                run, source, mixture, label_tasks(mixture), config, dtype=dtype,
                device=dist.device(device), image_root=image_root,
                missing=mixture.check_images(image_root, skip_missing_images), retrain=force,
                progress=not quiet, dist=dist, echo=click.echo)
    finally:
        dist.close()
    if dist.rank == 0:
        click.echo(ref.message)


@main.command()
@model_options
@click.option("--data", required=True, type=click.Path(path_type=Path), callback=mixture_path,
              help="The mixture.")
@click.option("--run", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_RUN,
              show_default=True, help="Run folder: reference/ (warm-up adapter) and store/.")
@click.option("--reference", type=click.Path(file_okay=False, path_type=Path),
              help="Score with this peft adapter folder instead of warming up.")
@click.option("--target", type=click.Path(path_type=Path),
              help="Then score these records too (what the model should get better at; any "
                   "format tive reads, their own tasks) into RUN/target, with the same "
                   "reference, projector and settings, for --method less and tive-target.")
@settings_options(ScoreConfig, skip=("paper",))
@settings_options(WarmupConfig, prefix="warmup-", dest="warmup_",
                  skip=("max_length", "gradient_checkpointing", "paper"))
@settings_options(ScoreConfig, only=("paper",))
@click.option("--force", is_flag=True,
              help="Replace a store or reference made with other settings instead of refusing.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@lambda f: data_options(f, "Score the text records even when no image is found at all (records "
                            "with missing images are always skipped and counted; when every "
                            "image is missing the image root is likely wrong, which stops the "
                            "run without this flag).")
def score(model_spec: str, dtype: str, device: str, data: Path, run: Path,
          reference: Path | None, target: Path | None, force: bool, quiet: bool,
          task_field: str | None,
          image_root: Path | None, skip_missing_images: bool, **settings: Any) -> None:
    """Per-record gradient features of the reference model, written to RUN/store.

    Trains the warm-up reference first (unless --reference is given or RUN/reference was
    trained with the same settings). Resumes an interrupted run. Under `torchrun
    --nproc-per-node N --no-python -- tive score ...` the records are shared among the
    processes (the `--` keeps torchrun from reading tive's --run).
    """
    from tive.scoring.run import run_score

    warmup = {k[len("warmup_"):]: settings.pop(k) for k in list(settings)
              if k.startswith("warmup_")}
    config = ScoreConfig(**settings)
    given = [k for k, v in warmup.items() if v != getattr(WarmupConfig(), k)]
    if reference is not None and given:
        names = ", ".join(option_flag(WarmupConfig, g, prefix="warmup-") for g in given)
        raise click.UsageError(f"--reference is a trained adapter; leave out the warm-up "
                               f"options ({names})")
    warm = WarmupConfig(max_length=config.max_length, paper=config.paper,
                        gradient_checkpointing=config.gradient_checkpointing, **warmup)
    summary = run_score(model_spec, data, run, reference=reference, config=config, warmup=warm,
                        dtype=dtype, device=device, task_field=task_field,
                        image_root=image_root, skip_missing_images=skip_missing_images,
                        force=force, progress=not quiet, echo=click.echo, target=target)
    if summary.rank == 0:
        for line in summary.lines():
            click.echo(line)


for command in (tasks, report, check, doctor, merge, apply):
    main.add_command(command)
