"""``tive check``: the health checks of a run, one line each with its fix, and with
``--stability N`` how much of a selection stays the same across seeds and stores
(registered on :data:`tive.cli.commands.main`; docs/design.md, "Health checks")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tive.cli.options import DEFAULT_RUN, settings_options, task_option
from tive.selection.settings import SelectConfig

STRICT_HELP = "Make the health checks' warnings errors (exit status 2)."


@click.command()
@click.option("--run", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_RUN,
              show_default=True, help="Run folder holding store/.")
@click.option("--data", type=click.Path(path_type=Path),
              help="The mixture to check the store against  [default: the one the store was "
                   "built from]")
@click.option("--strict", is_flag=True, help=STRICT_HELP)
@click.option("--stability", type=click.IntRange(min=1), metavar="N",
              help="Select N times with seeds 0..N-1 (the selection options below) and print "
                   "the subsets' Jaccard overlap per task and overall.")
@click.option("--compare", type=click.Path(file_okay=False, path_type=Path), metavar="RUN2",
              help="With --stability: also select from this run's store (the same data, e.g. "
                   "another --proj-dim) with each seed and print the overlap across stores.")
@click.option("--budget", metavar="P|N|P%", help="With --stability: the subset size, as for "
                                                 "tive select.")
@settings_options(SelectConfig, skip=("budget", "seed"))
@task_option
def check(run: Path, data: Path | None, strict: bool, stability: int | None,
          compare: Path | None, budget: str | None, task_field: str | None,
          **options: Any) -> None:
    """Health checks of a run: reference, features, key parameters, projection, task values,
    quotas, task labels, data; with --stability, how stable a selection is."""
    from tive.health.findings import tell, warnings_in
    from tive.health.run import run_findings
    from tive.store.format import Store

    options["exclude"] = tuple(options["exclude"])
    if stability is None:
        given = [k for k, v in options.items()
                 if v is not None and v is not False and v != () and v != "tive"]
        if budget is not None or compare is not None or given:
            raise click.UsageError("--budget, --compare and the selection options go with "
                                   "--stability N")
    store = Store.open(run)
    findings = run_findings(store, data=data, task_field=task_field)
    tell(findings, click.echo, strict)
    problems = len(warnings_in(findings))
    notes = len(findings) - problems
    click.echo(f"{store.root}: " + (f"{problems} warning{'s' * (problems != 1)}, {notes} "
                                    f"note{'s' * (notes != 1)}" if findings else
                                    "no problem found"))
    if stability is not None:
        _stability(store, compare, stability, budget, data, task_field, options)


def _stability(store: Any, compare: Path | None, n: int, budget: str | None,
               data: Path | None, task_field: str | None, options: dict[str, Any]) -> None:
    """Print the overlaps of ``n`` selections (and those from ``compare``'s store)."""
    from tive.api import value_estimate
    from tive.health.stability import stability

    if budget is None:
        raise click.UsageError("--stability needs --budget (the subset size, as for tive "
                               "select)")
    config = SelectConfig(budget=budget, **options)
    reports = [value_estimate(store=store, data=data, task_field=task_field)]
    if compare is not None:
        reports.append(value_estimate(store=compare, data=data if data is not None else
                                      reports[0].source.get("data"), task_field=task_field))
    result = stability(reports, config, n)
    seeds = f"seeds {result.seeds[0]}..{result.seeds[-1]}" if result.seeds else "no seed"
    click.echo(f"\nstability: {config.method}, budget {config.budget}, {seeds}"
               + (f", against {compare}" if compare is not None else "")
               + " (Jaccard overlap of the chosen records; 1 = the same records)")
    click.echo(result.table())
