"""Paired differences between two methods' finished runs of ``selection_quality.py``.

``selection_quality.py`` compares every method with ``random``. Whether a task-value variant
should replace the authors' ``norm`` needs the other comparison, the variant against ``tive``
itself, with the same design: paired by training seed (training seed ``i`` with selection
seed ``i``), a 95% paired bootstrap interval over seeds and held-out items, for exact match and
the answer-token loss. This reads the finished runs (``runs-*.json``) of each mixture folder
and prints one table; it trains nothing and needs no store::

    python benchmarks/versus.py --out sq --mixture a,b,c --budget 0.15 --reference tive \\
        --methods tive-coherence,tive-mean-gradient,tive-progress
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import selection_quality as sq  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True,
                    help="the --out of selection_quality.py (one folder per mixture)")
    ap.add_argument("--mixture", default="a,b,c", help="comma-separated mixture folders")
    ap.add_argument("--budget", default="0.15", help="the budget, as the runs name it")
    ap.add_argument("--reference", default="tive", help="the method compared against")
    ap.add_argument("--methods", default="tive-coherence,tive-mean-gradient,tive-progress",
                    help="comma-separated methods compared with --reference")
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates")
    return ap.parse_args(argv)


def versus(runs: dict[str, dict[str, Any]], methods: list[str], reference: str,
           budget: str, replicates: int) -> dict[str, dict[str, Any] | None]:
    """``{method: sq.compare(...)}`` of each method's runs at ``budget`` against
    ``reference``'s, paired by the seeds both have (None where they share none)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs.values():
        if r["method"] not in (sq.BASE, sq.FULL) and r["budget"] == budget:
            groups.setdefault(r["method"], []).append(r)
    tasks = sorted({t for r in runs.values() for t in r["eval"]})
    return {m: sq.compare(groups, m, reference, tasks, replicates) if m in groups else None
            for m in methods}


def table(results: dict[str, dict[str, dict[str, Any] | None]], reference: str,
          budget: str) -> str:
    """Markdown: one row per mixture and method, the differences and their verdicts."""
    lines = [f"Difference from `{reference} {budget}`, paired by training seed, 95% paired "
             f"bootstrap interval over seeds and held-out items (macro over the tasks).", "",
             "| mixture | method | seeds | Δ exact match [95% CI] | verdict | Δ loss [95% CI] "
             "| verdict |", "|---|---|---|---|---|---|---|"]
    for mixture, by_method in results.items():
        for method, c in by_method.items():
            if c is None:
                lines.append(f"| {mixture} | {method} | 0 | - | - | - | - |")
                continue
            acc, acc_v = sq._ci(c, "accuracy")
            loss, loss_v = sq._ci(c, "loss")
            lines.append(f"| {mixture} | {method} | {len(c['seeds'])} | {acc} | {acc_v} | "
                         f"{loss} | {loss_v} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    args = parse(argv)
    methods = args.methods.split(",")
    results = {name: versus(sq._finished(args.out / name), methods, args.reference,
                            args.budget, args.bootstrap)
               for name in args.mixture.split(",")}
    text = table(results, args.reference, args.budget)
    print(text)
    return text


if __name__ == "__main__":
    main()
