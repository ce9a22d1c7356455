"""Does a ``tive select`` subset train a model better than a random one of the same size?

One command: build multi-task mixtures from data shipped in Python packages (three shapes, see
``quality_mixture.py``; or take yours with ``--data MIX --eval EVAL``), score each with ``tive
score`` (the warm-up as the quick start runs it on a small mixture, then per-record gradients —
the same command users run), select 15% and 7.5% of it with each method through the report API
(``tive select``'s code), fine-tune the same model on every subset and on the full mixture with
one fixed LoRA recipe (one epoch each, as the paper trains), and evaluate per held-out item:
teacher-forced exact match of the greedy answer and the mean answer-token loss. Every method is
trained with the same training seeds (training seed i paired with selection seed i), so each
method's difference from ``random`` gets a 95% paired bootstrap interval (seeds and held-out
items resampled) and a verdict: better, worse, or no difference. Prints the tables and writes
``results.json``, ``table.md`` and ``selection_quality.png`` per mixture into ``--out/<mixture>``
(and every mixture's tables into ``--out/table.md``).

    python benchmarks/selection_quality.py                        # the evidence (see README)
    python benchmarks/selection_quality.py --shard 0/2 &          # … in two processes
    python benchmarks/selection_quality.py --shard 1/2
    python benchmarks/selection_quality.py --quick                # < 5 min: small, two seeds
    python benchmarks/selection_quality.py --mixture c --budgets 0.15
    python benchmarks/selection_quality.py --data mix.json --eval heldout.json --model M
    python benchmarks/selection_quality.py --device cuda
    python benchmarks/selection_quality.py --target all           # targeted: less, tive-target
    python benchmarks/selection_quality.py --target some --target-tasks add,sort

Targeted (``--target all|some``): each task's held-out records are split in two halves by
position (even: the target, odd: the test half); the target half of every task (``all``) or of
``--target-tasks`` only (``some``; default: every other task by name) is scored into the run's
``target/`` (``tive score --target``, reusing the untargeted store when there is one) and given
to tive; every method is evaluated on the test half of the target's tasks only, which no method
sees. Results go to ``--out/<mixture>-target-<all|some>``.
A run the untargeted comparison (or, for ``some``, the ``all`` one) of the same ``--out`` has
finished with the same records, seed, recipe, model, mixture and held-out file (the untouched
model; ``tive`` and ``random``, whose subsets do not depend on the target) is not trained
again: its per-item results on the test half are taken from it (``--retrain`` trains it).

A rerun with the same ``--out`` reuses the stores and the finished runs (``runs-*.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import inspect
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_mixture  # noqa: E402
from paired_bootstrap import paired_bootstrap, verdict  # noqa: E402
from quality_train import Recipe, eval_items, evaluate, task_scores, train  # noqa: E402

# method label → (Report.select arguments, whether the draw is seeded)
METHODS: dict[str, tuple[dict[str, Any], bool]] = {
    "tive": ({"method": "tive"}, True),  # task value "norm", tive's default
    "tive-coherence": ({"method": "tive", "task_value": "coherence"}, True),
    "tive-mean-gradient": ({"method": "tive", "task_value": "mean-gradient"}, True),
    "tive-progress": ({"method": "tive", "task_value": "progress"}, True),
    "tive-top": ({"method": "tive", "strategy": "top"}, False),
    "random": ({"method": "random"}, True),
    "random-per-task": ({"method": "random-per-task"}, True),
    "balanced": ({"method": "balanced"}, True),
    "kmeans": ({"method": "kmeans"}, True),
    "gradnorm": ({"method": "gradnorm"}, False),
    "loss": ({"method": "loss"}, False),
    "length": ({"method": "length"}, False),
    "less": ({"method": "less"}, False),  # with --target only
    "tive-target": ({"method": "tive-target"}, True),
}
TARGETED = ("less", "tive-target")
TARGET_METHODS = "less,tive-target,tive,random"  # --target's default at every budget
FULL, BASE, REFERENCE = "full", "base (no fine-tune)", "random"
DEFAULT_METHODS = ("tive,tive-coherence,tive-mean-gradient,tive-progress,random,random-per-task,"
                   "balanced,kmeans,full")
DEFAULT_METHODS_SMALL = "tive,tive-coherence,tive-mean-gradient,tive-progress,random"
QUICK_METHODS = "tive,random,full"  # --quick fine-tunes these (the full mixture with one seed)
QUICK_RECORDS, QUICK_HELD_PER_TASK = 300, 8  # --quick samples a user's mixture down to these
# a run's cost beside its training records, in training records: a fresh LoRA copy (~10 s) and
# the evaluation of 360 held-out items (~0.17 s each), at ~0.58 s per training record
RUN_COST = 120.0


def parse(argv: list[str] | None) -> argparse.Namespace:
    names = ", ".join([*METHODS, FULL])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("selection-quality-out"),
                    help="folder for the mixtures, stores, subsets and results (one sub-folder "
                         "per mixture)")
    ap.add_argument("--mixture", help="comma-separated shapes of quality_mixture.py: a (today's "
                                      "nine tasks), b (LLaVA-665K-like), c (all learnable); "
                                      "default a,b,c (--quick: a, small)")
    ap.add_argument("--data", type=Path, help="your mixture (any format tive reads)")
    ap.add_argument("--eval", type=Path, help="held-out records, compared on their last "
                                              "assistant turn (with --data)")
    ap.add_argument("--model", default="smollm2-135m", help="a text model tive loads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--warmup-global-batch", type=int, default=4,
                    help="records per warm-up step (tive's default, the authors' 128, makes a "
                         "warm-up sample under 128 records one step at learning rate 0; 0 = "
                         "tive's default)")
    ap.add_argument("--warmup-lr", type=float, default=2e-4,
                    help="warm-up learning rate (0 = tive's default, the authors' 2e-5)")
    ap.add_argument("--budgets", help="comma-separated, largest first (default 0.15,0.075; "
                                      "--quick: 0.15)")
    ap.add_argument("--seeds", type=int, help="training seeds, each paired with the selection "
                                              "seed of the same number (default 5; --quick 2)")
    ap.add_argument("--full-seeds", type=int, help="training seeds of the full mixture: the "
                                                   "first K of --seeds (default: all; --quick 1)")
    ap.add_argument("--methods", help=f"at the first budget, comma-separated, of {names} "
                                      f"(default: {DEFAULT_METHODS}; --quick: {QUICK_METHODS})")
    ap.add_argument("--methods-small", help=f"at the other budgets (default: "
                                            f"{DEFAULT_METHODS_SMALL})")
    ap.add_argument("--epochs", type=int, help="epochs of the fine-tune (default: the recipe's)")
    ap.add_argument("--batch-size", type=int, help="fine-tune batch (default: the recipe's)")
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates")
    ap.add_argument("--quick", action="store_true",
                    help="a small mixture (shape a, 100 records, 8 held out per task; or yours "
                         f"sampled down to {QUICK_RECORDS} records and {QUICK_HELD_PER_TASK} "
                         "held out per task), two seeds of tive and random, one of the full "
                         "mixture (< 5 min on 2 free cores)")
    ap.add_argument("--shard", default="0/1", metavar="I/N",
                    help="train only shard I of N of each mixture's runs (balanced by records; "
                         "start N processes with I = 0 … N-1 on one --out; each keeps its own "
                         "runs-I.json per mixture, and the first to reach a mixture scores it)")
    ap.add_argument("--threads", type=int, help="torch threads per process, tive score's too "
                                                "(default: torch's)")
    ap.add_argument("--target", choices=("none", "all", "some"), default="none",
                    help="targeted selection: split each task's held-out records into a target "
                         "half (given to tive) and a test half (evaluated); all: every task's, "
                         "some: --target-tasks' only (default none)")
    ap.add_argument("--target-tasks", help="with --target some: comma-separated tasks the target "
                                           "covers (default: every other task by name)")
    ap.add_argument("--no-warmup-group-by-modality", dest="warmup_ungrouped",
                    action="store_true",
                    help="passed to tive score: warm-up steps drawn as one permutation (the "
                         "identity of a store scored before tive grouped them, so it is reused)")
    ap.add_argument("--retrain", action="store_true",
                    help="with --target: train every run, also those whose subset an untargeted "
                         "run (or a --target all run) of the same --out has trained and "
                         "evaluated already (by default their per-item results on the test "
                         "half are taken from it)")
    ap.add_argument("--summary-only", action="store_true",
                    help="tables and PNG from the runs finished so far in --out, training "
                         "nothing more (for a run cut short)")
    args = ap.parse_args(argv)
    if (args.data is None) != (args.eval is None):
        ap.error("--data and --eval go together (the mixture and its held-out records)")
    if args.data is not None and args.mixture:
        ap.error("--mixture builds a mixture; --data brings yours: give one")
    try:
        args.shard_index, args.shard_count = map(int, args.shard.split("/"))
    except ValueError:
        ap.error(f"--shard {args.shard!r}: expected I/N, e.g. 0/2")
    if not 0 <= args.shard_index < args.shard_count:
        ap.error(f"--shard {args.shard}: expected 0 <= I < N")
    args.mixtures = ["user"] if args.data else (args.mixture or ("a" if args.quick else
                                                                 "a,b,c")).split(",")
    bad = [m for m in args.mixtures if m not in (*quality_mixture.SHAPES, "user")]
    if bad:
        ap.error(f"--mixture: unknown {', '.join(bad)}; choose from "
                 f"{', '.join(quality_mixture.SHAPES)}")
    args.budgets = args.budgets or ("0.15" if args.quick else "0.15,0.075")
    aimed = args.target != "none"
    args.methods = args.methods or (TARGET_METHODS if aimed else QUICK_METHODS if args.quick
                                    else DEFAULT_METHODS)
    args.methods_small = args.methods_small or (TARGET_METHODS if aimed
                                                else DEFAULT_METHODS_SMALL)
    if args.target_tasks and args.target != "some":
        ap.error("--target-tasks goes with --target some")
    for opt in ("methods", "methods_small"):
        needs = set(getattr(args, opt).split(",")) & set(TARGETED)
        if needs and not aimed:
            ap.error(f"--{opt.replace('_', '-')}: {', '.join(sorted(needs))} need a target; "
                     f"fix: --target all or --target some")
    for opt in ("methods", "methods_small"):
        unknown = set(getattr(args, opt).split(",")) - {*METHODS, FULL}
        if unknown:
            ap.error(f"--{opt.replace('_', '-')}: unknown {', '.join(sorted(unknown))}; "
                     f"choose from {names}")
    args.seed_list = list(range(args.seeds or (2 if args.quick else 5)))
    full_seeds = args.full_seeds or (1 if args.quick else None)
    args.full_seed_list = args.seed_list[:full_seeds] if full_seeds else args.seed_list
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = Recipe(epochs=args.epochs or Recipe.epochs,
                    batch_size=args.batch_size or Recipe.batch_size)
    log = _logger(args.out / f"log-{args.shard_index}.txt")
    # shards start at different mixtures, so that they score different ones at once
    k = args.shard_index % len(args.mixtures)
    order = args.mixtures[k:] + args.mixtures[:k]
    results = {}
    for name in order:
        res = run_mixture(args, name, recipe, log)
        if res is not None:
            results[name] = res
    if not results:
        raise SystemExit(f"{args.out}: no finished run (runs-*.json) of any mixture; run "
                         f"without --summary-only")
    results = {name: results[name] for name in args.mixtures if name in results}
    total = time.perf_counter() - t_start
    text = "\n".join(f"## Mixture {name}\n\n{tables(r['summary'])}" for name, r in results.items())
    _write(args.out / "table.md", text)
    _write(args.out / "results.json", json.dumps(
        {"mixtures": results, "wall_s": total, "command": _command(argv)}, indent=1))
    scoring = ", ".join(f"{n}: scoring {r['timings_s']['score']:.0f} s"
                        for n, r in results.items())
    log(f"wall time: {total:.0f} s ({scoring})")
    return results


def run_mixture(args: argparse.Namespace, name: str, recipe: Recipe,
                log: Any) -> dict[str, Any] | None:
    """Build (or take), score, select, train this shard's runs and summarise one mixture in
    ``out/<name>``; returns what its ``results.json`` holds (None: ``--summary-only`` and no
    finished run)."""
    out = args.out / (name if args.target == "none" else f"{name}-target-{args.target}")
    if args.summary_only and not list(out.glob("runs-*.json")):
        log(f"[{name}] no finished run in {out}: left out of the summary")
        return None
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with _locked(out / ".score.lock"):  # one shard builds and scores; the others wait
        mix, held = _mixture(args, name, args.out / name, log)
        target, sources, whole = None, None, held
        if args.target != "none":
            target, held, aim = split_held(whole, out / "data", args.target, args.target_tasks,
                                           log)
            _reuse_store(args.out / name / "run", out / "run", log)
            sources = None if args.retrain else run_sources(args, name, whole, aim)
        meta = run_meta(args, recipe, mix, whole)
        score_s = float("nan") if args.summary_only else _score(args, out, mix, recipe, log,
                                                                 target)
    report = _report(out / "run")
    if not args.summary_only:
        log(f"[{name}] task values:\n{report.table()}")
        subsets = _subsets(report, args, log, name)
        _train_all(args, out, report, held, subsets, recipe, log, name, sources, meta)
    runs = _finished(out)
    summary = summarise(runs, report, args.bootstrap)
    res = {"mixture": name, "recipe": asdict(recipe), "model": args.model, "data": str(mix),
           "eval": str(held), "seeds": args.seed_list, "full_seeds": args.full_seed_list,
           "target": args.target,
           "timings_s": {"score": score_s, "mixture": time.perf_counter() - t0},
           "runs": runs, "summary": summary, "command": _command(None)}
    _write(out / "results.json", json.dumps(res, indent=1))
    table = tables(summary)
    _write(out / "table.md", table)
    plot(summary, out / "selection_quality.png")
    log(f"## Mixture {name}\n\n{table}")
    return res


def _command(argv: list[str] | None) -> str:
    return " ".join(["python", "benchmarks/selection_quality.py",
                     *(argv if argv is not None else sys.argv[1:])])


def _write(path: Path, text: str) -> None:
    """Write by renaming a temporary file (shards write the same summaries)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


@contextlib.contextmanager
def _locked(path: Path) -> Any:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _logger(path: Path) -> Any:
    def log(text: str) -> None:
        print(text, flush=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(text + "\n")
    return log


def quick_sizes(sizes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """A shape at a tenth of its training records (at least 3 a task), 8 held out per task."""
    return {t: (max(3, round(n / 10)), QUICK_HELD_PER_TASK) for t, (n, _) in sizes.items()}


def _mixture(args: argparse.Namespace, name: str, out: Path, log: Any) -> tuple[Path, Path]:
    """The mixture and held-out files: a shape built into ``out/data`` (the same bytes each
    time), or the user's (with ``--quick``, sampled down into ``out/data`` where large)."""
    data = out / "data"
    if name != "user":
        sizes = quality_mixture.SHAPES[name]
        if args.quick:
            sizes = quick_sizes(sizes)
        mix, held = (data / "mix.json", data / "eval.json") if args.summary_only else \
            quality_mixture.build(data, sizes, shape=name)
        log(f"[{name}] mixture {mix}: {sum(a for a, _ in sizes.values())} records of "
            f"{len(sizes)} tasks; held out {held}: {sum(b for _, b in sizes.values())}")
        return mix, held
    mix, held = args.data.resolve(), args.eval.resolve()
    if args.quick and not args.summary_only:
        mix, held = _sample_down(mix, held, data, log)
    elif args.quick:
        mix, held = (data / mix.name, data / held.name) if (data / mix.name).exists() else \
            (mix, held)
    return mix, held


def _rows(path: Path) -> list[Any] | None:
    """The raw records of a ``.json`` list or ``.jsonl`` file (None for other formats)."""
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()]
    if path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        return rows if isinstance(rows, list) else None
    return None


def _save_rows(rows: list[Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                        encoding="utf-8")
    else:
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")


def _sample_down(mix: Path, held: Path, data: Path, log: Any) -> tuple[Path, Path]:
    """``--quick`` on a user's mixture: at most :data:`QUICK_RECORDS` records (a seeded uniform
    sample) and :data:`QUICK_HELD_PER_TASK` held-out records per task, and it says so."""
    from tive.data.mixture import load_mixture
    from tive.data.tasks import label_tasks

    rng = np.random.default_rng(0)
    rows = _rows(mix)
    if rows is None:
        log(f"--quick: {mix} is not a .json list or .jsonl file; used whole, not sampled down")
    elif len(rows) > QUICK_RECORDS:
        keep = np.sort(rng.choice(len(rows), QUICK_RECORDS, replace=False))
        _save_rows([rows[i] for i in keep], data / mix.name)
        log(f"--quick: your mixture sampled down to {QUICK_RECORDS} of its {len(rows):,} "
            f"records (seeded, uniform) → {data / mix.name}; the full run uses all of them")
        mix = data / mix.name
    held_rows = _rows(held)
    if held_rows is not None:
        tasks = label_tasks(load_mixture(held)).tasks
        if len(tasks) == len(held_rows):
            keep = np.sort(np.concatenate([
                rng.permutation(np.flatnonzero(tasks == t))[:QUICK_HELD_PER_TASK]
                for t in np.unique(tasks)]))
            if len(keep) < len(held_rows):
                _save_rows([held_rows[i] for i in keep], data / held.name)
                log(f"--quick: held-out records sampled down to {QUICK_HELD_PER_TASK} per task "
                    f"({len(keep)} of {len(held_rows):,}) → {data / held.name}")
                held = data / held.name
    return mix, held


def split_held(held: Path, folder: Path, mode: str, covered: str | None,
               log: Any) -> tuple[Path, Path, set[str]]:
    """``(target, test, aimed tasks)``: files in ``folder`` from the held-out records: per task,
    its records at even positions go to the target (every task's with ``mode`` ``all``; with
    ``some`` those of ``covered``, default every other task by name), at odd positions to the
    test half; the test half keeps the target's tasks only. The same bytes each time."""
    rows = _rows(held)
    if rows is None:
        raise SystemExit(f"--target: {held} must be a .json list or .jsonl file to be split")
    tasks = _held_tasks(held)
    names = sorted(set(tasks))
    aim = set(names) if mode == "all" else set(
        covered.split(",") if covered else names[::2])
    if not aim <= set(names) or not aim:
        raise SystemExit(f"--target-tasks: {covered!r}; the held-out tasks are {', '.join(names)}")
    seen: dict[str, int] = {}
    target, test = [], []
    for row, task in zip(rows, tasks):
        k = seen[task] = seen.get(task, -1) + 1
        if task in aim:
            (target if k % 2 == 0 else test).append(row)
    paths = folder / f"target{held.suffix}", folder / f"test{held.suffix}"
    for part, path in zip((target, test), paths):
        _save_rows(part, path)
    log(f"--target {mode}: tasks {', '.join(sorted(aim))}; {len(target)} target records → "
        f"{paths[0]}, {len(test)} test records → {paths[1]}")
    return paths[0], paths[1], aim


def _held_tasks(held: Path) -> list[str]:
    """The task label of every held-out record, in file order."""
    from tive.data.mixture import load_mixture
    from tive.data.tasks import label_tasks

    return [str(t) for t in label_tasks(load_mixture(held)).tasks]


def evaluated_positions(tasks: list[str], aim: set[str] | None) -> dict[str, list[int]]:
    """Per task (in order of first appearance), the positions within the task's held-out
    records that a run evaluates: all of them untargeted (``aim`` None); with a target, the
    test half (odd positions, as :func:`split_held` splits) of the aimed tasks only."""
    count: dict[str, int] = {}
    for task in tasks:
        count[task] = count.get(task, 0) + 1
    return {t: list(range(n)) if aim is None else list(range(1, n, 2))
            for t, n in count.items() if aim is None or t in aim}


def restrict_items(items: dict[str, dict[str, list]], have: dict[str, list[int]],
                   want: dict[str, list[int]]) -> dict[str, dict[str, list]] | None:
    """A run's per-item results (``{task: {"correct": [...], "loss": [...]}}`` at the
    positions ``have``) at the positions ``want`` only, in ``want``'s order; None where the
    run lacks one of them (another split, or items it could not encode)."""
    out = {}
    for task, positions in want.items():
        got, at = items.get(task), have.get(task)
        if not positions:
            continue
        if got is None or at is None or len(got["correct"]) != len(at):
            return None
        where = {p: i for i, p in enumerate(at)}
        if any(p not in where for p in positions):
            return None
        out[task] = {k: [got[k][where[p]] for p in positions] for k in ("correct", "loss")}
    return out


def run_sources(args: argparse.Namespace, name: str, held: Path,
                aim: set[str]) -> list[tuple[Path, dict[str, list[int]], dict[str, list[int]]]]:
    """Where a targeted comparison may take finished runs from: ``(folder, positions its runs
    evaluated, positions this comparison evaluates)`` for the untargeted run of the mixture
    and, for ``--target some``, the ``--target all`` run."""
    tasks = _held_tasks(held)
    want = evaluated_positions(tasks, aim)
    sources = [(args.out / name, evaluated_positions(tasks, None), want)]
    if args.target == "some":
        sources.append((args.out / f"{name}-target-all",
                        evaluated_positions(tasks, set(tasks)), want))
    return sources


def run_meta(args: argparse.Namespace, recipe: Recipe, mix: Path, held: Path) -> dict[str, Any]:
    """What a finished run records of how it was made (a run is taken into another
    comparison only where all of it is equal): the recipe, the model, the device, and digests
    of the mixture and of the held-out records before any target split (files or folders)."""
    from tive.output.manifest import tree_digest

    return {"recipe": asdict(recipe), "model": args.model, "device": args.device,
            "data_digest": tree_digest(mix), "held_digest": tree_digest(held)}


def _subset_file(out: Path, key: str) -> Path:
    return out / "subsets" / f"{key.replace('#', '-').replace('@', '-')}.json"


def borrow_run(key: str, sub: dict[str, Any] | None, sources: list[tuple[Path, Any, Any]],
               meta: dict[str, Any],
               finished: dict[Path, dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The finished run ``key`` of a source folder (named in its ``borrowed_from``), its
    per-item results restricted to this comparison's test items, when it trained exactly
    ``sub``'s records (the same indices, so the same method, budget and selection seed; the
    same training seed by its key) with the same recipe, model, device and data (``meta``);
    else None. ``finished``: each source's finished runs, read once by the caller (else read
    here). A model trained on the same records with the same seed is the same model, so its
    results on the test half are those a retraining would give, up to float rounding (the
    items are batched with other items)."""
    for folder, have, want in sources:
        runs = finished[folder] if finished is not None else _finished(folder, missing_ok=True)
        found = runs.get(key)
        if found is None or any(found.get(k) != v for k, v in meta.items()):
            continue
        if sub is not None:
            path = _subset_file(folder, key)
            if not path.exists() or json.loads(path.read_text())["indices"] != sub["indices"]:
                continue
        items = restrict_items(found["items"], have, want)
        if items is None:
            continue
        return {**found, "eval": task_scores(items), "items": items,
                "borrowed_from": str(folder)}
    return None


def _reuse_store(source: Path, run: Path, log: Any) -> None:
    """Copy the untargeted run's reference and complete store (``source``) into ``run`` when it
    has none, so that ``tive score --target`` scores only the target."""
    import shutil

    meta = source / "store" / "meta.json"
    if (run / "store").exists() or not meta.exists() or not json.loads(
            meta.read_text()).get("complete"):
        return
    for part in ("reference", "store"):
        if (source / part).exists():
            shutil.copytree(source / part, run / part)
    log(f"reused the store of {source} (the target alone is scored)")


def _score(args: argparse.Namespace, out: Path, mix: Path, recipe: Recipe, log: Any,
           target: Path | None = None) -> float:
    """``tive score`` in a child process (a finished store is reused); the warm-up as the
    README's quick start runs it on a small mixture (``--warmup-global-batch 4 --warmup-lr
    2e-4``) unless told otherwise; with ``target``, its records into the run's ``target/``."""
    cmd = [str(Path(sys.executable).with_name("tive")), "score", "--model", args.model,
           "--data", str(mix), "--run", str(out / "run"), "--max-length",
           str(recipe.max_length), "--device", args.device, "--quiet"]
    if target is not None:
        cmd += ["--target", str(target)]
    if args.warmup_global_batch:
        cmd += ["--warmup-global-batch", str(args.warmup_global_batch)]
    if args.warmup_lr:
        cmd += ["--warmup-lr", str(args.warmup_lr)]
    if args.warmup_ungrouped:
        cmd += ["--no-warmup-group-by-modality"]
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    log("$ " + " ".join(cmd))
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    log(res.stdout.strip())
    if res.returncode:
        raise SystemExit(f"tive score failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return time.perf_counter() - t0


def _report(run: Path) -> Any:
    from tive import value_estimate

    return value_estimate(store=run)


def supports_task_value(report: Any) -> bool:
    """Whether this tive's ``Report.select`` takes ``task_value`` (the task-value variants)."""
    return "task_value" in inspect.signature(report.select).parameters


def _subsets(report: Any, args: argparse.Namespace, log: Any,
             name: str = "") -> dict[str, dict[str, Any]]:
    """``{run name: {"method", "budget", "seed", "indices", "selected"}}`` for every method,
    budget and seed, seed by seed (every method's first seed, the full mixture's included,
    comes before any second seed, so that a run cut short still compares every method).
    Methods at the first budget are ``--methods``, at the others ``--methods-small``; the
    task-value variants are skipped, saying so, where this tive does not have them."""
    out: dict[str, dict[str, Any]] = {}
    budgets = args.budgets.split(",")
    variants = supports_task_value(report)
    skipped = set()
    for seed in args.seed_list:
        for b, budget in enumerate(budgets):
            wanted = (args.methods if b == 0 else args.methods_small).split(",")
            for label in (m for m in METHODS if m in wanted):
                kwargs, seeded = METHODS[label]
                if "task_value" in kwargs and not variants:
                    skipped.add(label)
                    continue
                sel = report.select(budget=budget, **kwargs, **({"seed": seed} if seeded else {}))
                out[f"{label}@{budget}#s{seed}"] = {
                    "method": label, "budget": budget, "seed": seed,
                    "indices": sel.indices.tolist(), "selected": sel.selected()}
        if FULL in args.methods.split(",") and seed in args.full_seed_list:
            out[f"{FULL}#s{seed}"] = {"method": FULL, "budget": "1.0", "seed": seed,
                                      "indices": np.flatnonzero(report.valid).tolist(),
                                      "selected": report.valid_sizes()}
    if skipped:
        log(f"[{name}] skipped {', '.join(sorted(skipped))}: this tive's Report.select takes no "
            f"task_value (the task-value variants are not installed)")
    first = args.seed_list[0]
    log(f"[{name}] subsets: " + ", ".join(f"{k} {len(v['indices'])}" for k, v in out.items()
                                          if v["seed"] == first))
    return out


def shard_plan(subsets: dict[str, dict[str, Any]], index: int, count: int,
               run_cost: float = RUN_COST) -> list[tuple[str, dict[str, Any] | None]]:
    """This shard's runs: the untouched model and every subset, in order, each given to the
    shard with the least work so far (records trained + ``run_cost`` per run), so that shards
    finish together; every shard computes the same split."""
    load = [0.0] * count
    mine = []
    for key, sub in [(BASE, None), *subsets.items()]:
        to = int(np.argmin(load))
        load[to] += run_cost + (len(sub["indices"]) if sub else 0)
        if to == index:
            mine.append((key, sub))
    return mine


def _train_all(args: argparse.Namespace, out: Path, report: Any, held: Path,
               subsets: dict[str, dict[str, Any]], recipe: Recipe, log: Any,
               name: str = "", sources: list[tuple[Path, Any, Any]] | None = None,
               meta: dict[str, Any] | None = None) -> None:
    """Fine-tune and evaluate every subset of this process's shard (and the untouched model in
    one of them); finished runs are kept in ``out/runs-I.json`` and not repeated. With
    ``sources`` (a targeted comparison), a run another comparison has finished with the same
    records, seed and recipe is taken from it (:func:`borrow_run`) instead of trained."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from tive.data.mixture import load_mixture
    from tive.data.tasks import label_tasks
    from tive.models.encoding import encode_row, pad_id
    from tive.models.load import load_model
    from tive.models.registry import resolve

    done_path = out / f"runs-{args.shard_index}.json"
    done = json.loads(done_path.read_text()) if done_path.exists() else {}
    finished = set(_finished(out)) if list(out.glob("runs-*.json")) else set()
    plan = [(k, s) for k, s in shard_plan(subsets, args.shard_index, args.shard_count)
            if k not in done and k not in finished]  # done here, or by an earlier split
    meta = meta or {}
    taken = {folder: _finished(folder, missing_ok=True) for folder, _, _ in sources or []}
    for key, sub in list(plan) if sources else []:
        got = borrow_run(key, sub, sources, meta, taken)
        if got is not None:
            if sub is not None:
                source = _subset_file(Path(got["borrowed_from"]), key)
                _write(_subset_file(out, key), source.read_text())
            done[key] = got
            _write(done_path, json.dumps(done))
            plan.remove((key, sub))
            log(f"  [{name}] {key}: taken from {got['borrowed_from']} (the same records, "
                f"seed and recipe), its results on the test half")
    if not plan:
        log(f"[{name}] shard {args.shard}: nothing left to train")
        return
    loaded = load_model(resolve(args.model), dtype="fp32", device="cpu")
    if loaded.family != "causal-lm":
        raise SystemExit(f"--model {args.model}: a {loaded.family} model; this benchmark "
                         f"fine-tunes text models (family causal-lm)")
    base, tok, pad = loaded.model, loaded.tokenizer, pad_id(loaded.tokenizer)
    encoder = loaded.encoder(recipe.max_length)
    mixture = report.mixture
    encoded = [encode_row(encoder, mixture, i) for i in range(len(mixture))]
    ev = load_mixture(held)
    ev_enc = [encode_row(encoder, ev, i) for i in range(len(ev))]
    keep = [i for i, e in enumerate(ev_enc) if not isinstance(e, str)]
    answers = [[t.text for t in ev[i].turns if t.role == "assistant"][-1] for i in keep]
    items = eval_items([ev_enc[i] for i in keep], [str(label_tasks(ev).tasks[i]) for i in keep],
                       answers)
    log(f"[{name}] held out: {len(items)} records of {len({i.task for i in items})} tasks "
        f"({len(ev) - len(keep)} not encodable); shard {args.shard}: {len(plan)} runs to train")
    eos = sorted({int(tok.eos_token_id),
                  *(int(e) for e in np.atleast_1d(base.generation_config.eos_token_id or []))})
    torch.manual_seed(0)
    for key, sub in plan:
        t0 = time.perf_counter()
        if sub is None:
            model, stats = base, {}
        else:
            records = [encoded[i] for i in sub["indices"] if not isinstance(encoded[i], str)]
            log(f"[{name}] {key}: {len(records)} records")
            model, stats = train(base, records, recipe, sub["seed"], pad, args.device, log)
        t_eval = time.perf_counter()
        scores, per_item = evaluate(model.to(args.device), items, pad, eos, args.device)
        stats["eval_seconds"] = time.perf_counter() - t_eval
        if sub is not None:
            _write(_subset_file(out, key), json.dumps(
                {k: sub[k] for k in ("method", "budget", "seed", "selected", "indices")}))
        done[key] = {**({k: v for k, v in sub.items() if k != "indices"} if sub else
                        {"method": BASE, "budget": "0", "seed": 0, "selected": {}}),
                     **meta, "train": stats, "eval": scores, "items": per_item,
                     "seconds": time.perf_counter() - t0}
        _write(done_path, json.dumps(done))
        macro = np.mean([s["accuracy"] for s in scores.values()])
        loss = np.mean([s["loss"] for s in scores.values()])
        log(f"  [{name}] {key}: macro exact match {macro:.3f}, loss {loss:.3f} "
            f"({time.perf_counter() - t0:.0f} s, evaluation {stats['eval_seconds']:.0f} s)")
        del model


def _finished(out: Path, missing_ok: bool = False) -> dict[str, dict[str, Any]]:
    """Every finished run of every shard (``runs-*.json``)."""
    runs: dict[str, dict[str, Any]] = {}
    for path in sorted(out.glob("runs-*.json")):
        runs.update(json.loads(path.read_text()))
    if not runs and not missing_ok:
        raise SystemExit(f"{out}: no finished run (runs-*.json); run without --summary-only")
    return runs


def _label(run: dict[str, Any]) -> str:
    return run["method"] if run["method"] in (FULL, BASE) else f"{run['method']} {run['budget']}"


def _per_item(runs: list[dict[str, Any]], seeds: list[int], tasks: list[str],
              metric: str) -> dict[str, np.ndarray]:
    """task → (seeds, items) array of one metric, rows in ``seeds`` order."""
    by_seed = {r["seed"]: r for r in runs}
    return {t: np.array([by_seed[s]["items"][t][metric] for s in seeds], float) for t in tasks}


def compare(groups: dict[str, list[dict[str, Any]]], label: str, reference: str,
            tasks: list[str], replicates: int) -> dict[str, Any] | None:
    """``label``'s runs against ``reference``'s, paired by training seed: per metric the paired
    bootstrap (:func:`paired_bootstrap.paired_bootstrap`) and its verdict; None where they
    share no seed or lack per-item results."""
    if reference not in groups or label == reference:
        return None
    runs, ref = groups[label], groups[reference]
    seeds = sorted({r["seed"] for r in runs} & {r["seed"] for r in ref})
    if not seeds or any("items" not in r for r in [*runs, *ref]):
        return None
    out: dict[str, Any] = {"seeds": seeds}
    for metric, higher in (("correct", True), ("loss", False)):
        res = paired_bootstrap(_per_item(runs, seeds, tasks, metric),
                               _per_item(ref, seeds, tasks, metric), replicates)
        res["verdict"] = verdict(res["low"], res["high"], higher)
        out["accuracy" if metric == "correct" else "loss"] = res
    return out


def summarise(results: dict[str, dict[str, Any]], report: Any,
              replicates: int = 2000) -> dict[str, Any]:
    """Per (method, budget): macro accuracy and loss over seeds (mean, sd, each seed), per-task
    accuracy (mean over seeds), records per task; per budget, each method's paired difference
    from ``random`` at that budget (the full mixture's from every budget's ``random``)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results.values():
        groups.setdefault(_label(r), []).append(r)
    tasks = sorted({t for r in results.values() for t in r["eval"]})
    order = [BASE, *METHODS, FULL]

    def place(label: str) -> tuple[int, float, int]:  # the untouched model, by budget, full
        method, budget = groups[label][0]["method"], float(groups[label][0]["budget"])
        group = 0 if method == BASE else 2 if method == FULL else 1
        return group, -budget, order.index(method)

    labels = sorted(groups, key=place)
    rows = {}
    for label in labels:
        runs = sorted(groups[label], key=lambda r: r["seed"])
        macro = [float(np.mean([r["eval"][t]["accuracy"] for t in tasks])) for r in runs]
        loss = [float(np.mean([r["eval"][t]["loss"] for t in tasks])) for r in runs]
        rows[label] = {
            "method": runs[0]["method"], "budget": runs[0]["budget"], "seeds": len(runs),
            "records": int(np.mean([sum(r["selected"].values()) for r in runs])),
            "macro_accuracy": float(np.mean(macro)), "macro_accuracy_runs": macro,
            "macro_accuracy_sd": float(np.std(macro, ddof=1)) if len(macro) > 1 else 0.0,
            "macro_loss": float(np.mean(loss)), "macro_loss_runs": loss,
            "per_task": {t: float(np.mean([r["eval"][t]["accuracy"] for r in runs]))
                         for t in tasks},
            "selected": {t: float(np.mean([r["selected"].get(t, 0) for r in runs]))
                         for t in report.task_names}}
    full = rows.get(FULL, {}).get("macro_accuracy")
    for row in rows.values():
        row["of_full"] = row["macro_accuracy"] / full if full else None
    budgets = sorted({r["budget"] for r in results.values()
                      if r["method"] not in (FULL, BASE)}, key=float, reverse=True)
    comparisons: dict[str, dict[str, Any]] = {}
    for budget in budgets:
        ref = f"{REFERENCE} {budget}"
        cmp = comparisons.setdefault(budget, {})
        for label in labels:
            row = rows[label]
            if row["method"] == BASE or (row["method"] != FULL and row["budget"] != budget):
                continue
            cmp[label] = compare(groups, label, ref, tasks, replicates)
    return {"tasks": tasks, "task_sizes": report.sizes, "task_values": report.task_values,
            "rows": rows, "budgets": budgets, "comparisons": comparisons,
            "bootstrap_replicates": replicates}


def _ci(res: dict[str, Any] | None, key: str, digits: int = 3) -> tuple[str, str]:
    if res is None:
        return "-", "-"
    r = res[key]
    return f"{r['diff']:+.{digits}f} [{r['low']:+.{digits}f}, {r['high']:+.{digits}f}]", \
        r["verdict"]


def tables(summary: dict[str, Any]) -> str:
    """Markdown: per budget the comparison with random; then the per-seed table, the per-task
    accuracy table, the records per task."""
    rows, tasks = summary["rows"], summary["tasks"]
    lines = []
    for budget in summary.get("budgets", []):
        cmp = summary["comparisons"][budget]
        seeds = sorted({s for c in cmp.values() if c for s in c["seeds"]})
        lines += [f"**Budget {float(budget):.1%}**: difference from `random {budget}`, paired by "
                  f"training seed ({len(seeds)} seeds), 95% paired bootstrap interval "
                  f"({summary.get('bootstrap_replicates', 2000)} replicates over seeds and "
                  f"held-out items); macro over {len(tasks)} tasks.", "",
                  "| method | records | mean exact-match | Δ vs random [95% CI] | verdict "
                  "| mean loss | Δ loss [95% CI] | verdict |", "|---|---|---|---|---|---|---|---|"]
        for label in [BASE, *cmp]:
            if label not in rows:
                continue
            r = rows[label]
            acc, acc_v = _ci(cmp.get(label), "accuracy")
            loss, loss_v = _ci(cmp.get(label), "loss")
            if label == f"{REFERENCE} {budget}":
                acc_v = loss_v = "(reference)"
            lines.append(f"| {label} | {r['records']} | {r['macro_accuracy']:.3f} | {acc} | "
                         f"{acc_v} | {r['macro_loss']:.3f} | {loss} | {loss_v} |")
        lines.append("")
    lines += ["| method | records | seeds | macro accuracy (mean ± sd) | per seed | of full "
              "| macro answer loss |", "|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        per = ", ".join(f"{a:.3f}" for a in r["macro_accuracy_runs"])
        of = f"{r['of_full']:.2f}" if r["of_full"] is not None else "-"
        lines.append(f"| {label} | {r['records']} | {r['seeds']} | {r['macro_accuracy']:.3f} ± "
                     f"{r['macro_accuracy_sd']:.3f} | {per} | {of} | {r['macro_loss']:.3f} |")
    lines += ["", "| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for label, r in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{r['per_task'][t]:.2f}" for t in tasks)
                     + " |")
    names = list(summary["task_sizes"])
    lines += ["", "| records per task | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names),
              "| mixture | " + " | ".join(str(summary["task_sizes"][t]) for t in names) + " |",
              "| task value (norm) | " + " | ".join(f"{summary['task_values'][t]:.3g}"
                                                   for t in names) + " |"]
    for label, r in rows.items():
        if r["method"] not in (FULL, BASE):
            lines.append(f"| {label} | " + " | ".join(f"{r['selected'][t]:g}" for t in names)
                         + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    """Methods × macro accuracy (mean, each seed, ± sd) beside a per-task heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, tasks = summary["rows"], summary["tasks"]
    labels = list(rows)
    fig, (ax, hm) = plt.subplots(1, 2, figsize=(13, 0.42 * len(labels) + 1.8),
                                 gridspec_kw={"width_ratios": [1, 1.6]})
    y = np.arange(len(labels))
    means = [rows[k]["macro_accuracy"] for k in labels]
    sds = [rows[k]["macro_accuracy_sd"] for k in labels]
    colours = ["tab:red" if rows[k]["method"].startswith("tive") else
               "tab:orange" if rows[k]["method"] == "less" else
               "tab:gray" if rows[k]["method"] in (FULL, BASE) else "tab:blue" for k in labels]
    ax.barh(y, means, xerr=sds, color=colours, alpha=0.8, capsize=3)
    for i, k in enumerate(labels):
        ax.plot(rows[k]["macro_accuracy_runs"], [i] * rows[k]["seeds"], "k.", ms=4)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("macro exact-match accuracy (held out)")
    ax.set_title("mean ± sd over seeds (dots: seeds)")
    grid = np.array([[rows[k]["per_task"][t] for t in tasks] for k in labels])
    im = hm.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    hm.set_xticks(np.arange(len(tasks)), tasks, rotation=35, ha="right")
    hm.set_yticks(y, labels)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            hm.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if grid[i, j] < 0.6 else "black")
    hm.set_title("per-task accuracy (mean over seeds)")
    fig.colorbar(im, ax=hm, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


if __name__ == "__main__":
    main()
