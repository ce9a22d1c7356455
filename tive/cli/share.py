"""The commands that grow, merge and share: ``tive merge`` (stores computed separately into
one) and ``tive apply`` (a selection's manifest onto a mixture; registered on
:data:`tive.cli.commands.main`). Growing a store is ``tive score`` on other data
(docs/design.md, "Incremental scoring")."""

from __future__ import annotations

from pathlib import Path

import click

from tive.cli.options import removed_temps
from tive.util.files import run_lock


@click.command()
@click.argument("runs", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--run", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder of the merged store (OUT/store).")
@click.option("--data", type=click.Path(path_type=Path),
              help="The mixture the merged store is for (its rows in this file's order)  "
                   "[default: the stores' data, when they were all built from the same]")
@click.option("--force", is_flag=True, help="Replace a store already in OUT.")
def merge(runs: tuple[Path, ...], out: Path, data: Path | None, force: bool) -> None:
    """Merge stores scored separately (other machines, jobs, parts of a mixture) into one.

    RUNS are run folders (or their store folders) scored with the same model, adapter,
    projector and settings; records are matched by record key. A record in several stores is
    kept once when its rows are equal and refused when they differ. Records of the mixture in
    no store are left to compute: `tive score --data MIX --run OUT` finishes the store.
    """
    from tive.scoring.merge import merge_stores

    with run_lock(out, "tive merge"):
        removed_temps(out)
        merged = merge_stores(list(runs), out, data, force)
    click.echo(f"merged {merged.taken:,} rows from {len(runs)} stores into {merged.store}"
               + (f" ({merged.duplicates:,} records in more than one store, kept once)"
                  if merged.duplicates else ""))
    if merged.missing:
        fix = "" if merged.reference else " --reference ADAPTER (the adapter they were scored with)"
        click.echo(f"{merged.missing:,} records of the mixture are in none of the stores: the "
                   f"store is not complete; `tive score --data MIX --run {out}{fix}` with the "
                   f"stores' settings computes them")
    if merged.reference:
        click.echo(f"reference: {merged.reference}")


@click.command()
@click.argument("manifest", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", type=click.Path(path_type=Path),
              help="The mixture to take the records from (any order, any records besides).")
@click.option("--output", "-o", type=click.Path(path_type=Path),
              help="The subset to write, in the mixture's format.")
@click.option("--check", "check", type=click.Path(exists=True, path_type=Path),
              help="Compare this subset with MANIFEST  [default MANIFEST: the "
                   "<stem>.manifest.json beside it]; writes nothing.")
@click.option("--image-root", type=click.Path(file_okay=False, path_type=Path),
              help="Folder the records' relative image paths resolve against (their bytes are "
                   "part of a record's key)  [default: the manifest's, where it exists, else "
                   "the data's folder]")
def apply(manifest: Path | None, data: Path | None, output: Path | None, check: Path | None,
          image_root: Path | None) -> None:
    """Rebuild a selection's subset from its manifest and a mixture (no store, no model).

    `tive apply MANIFEST --data MIX -o SUBSET` writes the records the manifest names, found in
    MIX by record key, in the manifest's order (byte for byte the subset `tive select` wrote,
    when MIX holds the same records); a mixture lacking records is refused, naming them.
    `tive apply --check SUBSET` says whether SUBSET holds the manifest's records.
    """
    from tive.output.apply import apply_manifest, check_subset
    from tive.output.manifest import manifest_path

    if check is not None:
        if data is not None or output is not None:
            raise click.UsageError("--check compares a subset with its manifest: leave out "
                                   "--data and -o")
        click.echo(check_subset(check, manifest or manifest_path(check), image_root))
        return
    if manifest is None or data is None or output is None:
        raise click.UsageError("give MANIFEST, --data MIX and -o SUBSET (or --check SUBSET)")
    removed_temps(output.parent)
    written, n = apply_manifest(manifest, data, output, image_root)
    click.echo(f"wrote {n:,} records of {data} to {written}, as {manifest} lists them")
