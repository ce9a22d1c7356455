"""Does a ``tive select`` subset train a model better than a random one of the same size?

One command: build a multi-task mixture from data shipped in Python packages (or take yours
with ``--data MIX --eval EVAL``), score it with ``tive score`` (the warm-up as the quick start
runs it on a small mixture, then per-record gradients — the same command users run), select 15% of it with each method
through the report API (``tive select``'s code), fine-tune the same model on every subset with
one fixed LoRA recipe (the same epochs for all), and evaluate per task on held-out records:
exact-match accuracy of the greedy answer, and mean answer-token loss. Prints the tables and
writes ``results.json``, ``table.md`` and ``selection_quality.png`` into ``--out``.

    python benchmarks/selection_quality.py                        # default run (see README)
    python benchmarks/selection_quality.py --quick                # < 5 min: small, one seed
    python benchmarks/selection_quality.py --budgets 0.15,0.075   # also 7.5%
    python benchmarks/selection_quality.py --data mix.json --eval heldout.json --model M
    python benchmarks/selection_quality.py --device cuda

A rerun with the same ``--out`` reuses the store and the finished runs in ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_mixture  # noqa: E402
from quality_train import Recipe, evaluate, eval_items, train  # noqa: E402

# method label → (Report.select arguments, whether the draw is seeded)
METHODS: dict[str, tuple[dict[str, Any], bool]] = {
    "tive": ({"method": "tive"}, True),
    "tive-top": ({"method": "tive", "strategy": "top"}, False),
    "random": ({"method": "random"}, True),
    "random-per-task": ({"method": "random-per-task"}, True),
    "balanced": ({"method": "balanced"}, True),
    "kmeans": ({"method": "kmeans"}, True),
    "gradnorm": ({"method": "gradnorm"}, False),
    "loss": ({"method": "loss"}, False),
    "length": ({"method": "length"}, False),
}
FULL, BASE = "full", "base (no fine-tune)"
QUICK_METHODS = "tive,random,balanced,kmeans,full"  # --quick fine-tunes these (time)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("selection-quality-out"),
                    help="folder for the mixture, run, subsets and results")
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
    ap.add_argument("--budgets", default="0.15", help="comma-separated, e.g. 0.15,0.075")
    ap.add_argument("--seeds", type=int, help="seeds per method (default 2; 1 with --quick)")
    ap.add_argument("--methods", help=f"comma-separated subset of {', '.join([*METHODS, FULL])} "
                                      f"(default: all; with --quick: {QUICK_METHODS})")
    ap.add_argument("--epochs", type=int, help="epochs of the fine-tune (default: the recipe's)")
    ap.add_argument("--quick", action="store_true",
                    help="a small mixture (101 records), one seed, four methods and the full "
                         "mixture (< 5 min on 2 free cores)")
    ap.add_argument("--shard", default="0/1", metavar="I/N",
                    help="train only runs I, I+N, I+2N, … of the plan (start N processes with "
                         "I = 0 … N-1 on one --out; each keeps its own runs-I.json)")
    ap.add_argument("--threads", type=int, help="torch threads per process (default: torch's)")
    ap.add_argument("--summary-only", action="store_true",
                    help="tables and PNG from the runs finished so far in --out, training "
                         "nothing more (for a run cut short)")
    args = ap.parse_args(argv)
    if (args.data is None) != (args.eval is None):
        ap.error("--data and --eval go together (the mixture and its held-out records)")
    try:
        args.shard_index, args.shard_count = map(int, args.shard.split("/"))
    except ValueError:
        ap.error(f"--shard {args.shard!r}: expected I/N, e.g. 0/2")
    if not 0 <= args.shard_index < args.shard_count:
        ap.error(f"--shard {args.shard}: expected 0 <= I < N")
    if args.methods is None:
        args.methods = QUICK_METHODS if args.quick else ",".join([*METHODS, FULL])
    unknown = set(args.methods.split(",")) - {*METHODS, FULL}
    if unknown:
        ap.error(f"--methods: unknown {', '.join(sorted(unknown))}; choose from "
                 f"{', '.join([*METHODS, FULL])}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = Recipe(epochs=args.epochs or Recipe.epochs)
    seeds = list(range(args.seeds or (1 if args.quick else 2)))
    log = _logger(args.out / "log.txt")
    if args.data is None and args.summary_only:
        mix, held = args.out / "data" / "mix.json", args.out / "data" / "eval.json"
    elif args.data is None:
        sizes = quality_mixture.QUICK_SIZES if args.quick else quality_mixture.SIZES
        mix, held = quality_mixture.build(args.out / "data", sizes)  # the same bytes again
        log(f"mixture: {mix} ({sum(a for a, _ in sizes.values())} records, {len(sizes)} tasks); "
            f"held out: {held}")
    else:
        mix, held = args.data.resolve(), args.eval.resolve()
    if args.summary_only:
        timings = {"score": float("nan")}
        report = _report(args.out / "run")
        results = _finished(args.out)
    else:
        timings = {"score": _score(args, mix, recipe.max_length, log)}
        report = _report(args.out / "run")
        log(f"task values:\n{report.table()}")
        subsets = _subsets(report, args, seeds, log)
        _train_all(args, report, held, subsets, recipe, log)
        results = _finished(args.out)
    timings["total"] = time.perf_counter() - t_start
    summary = summarise(results, report)
    out = {"recipe": asdict(recipe), "model": args.model, "data": str(mix), "eval": str(held),
           "seeds": seeds, "timings_s": timings, "runs": results, "summary": summary,
           "command": " ".join(["python", "benchmarks/selection_quality.py",
                                *(argv if argv is not None else sys.argv[1:])])}
    (args.out / "results.json").write_text(json.dumps(out, indent=1))
    table = tables(summary)
    (args.out / "table.md").write_text(table)
    plot(summary, args.out / "selection_quality.png")
    log(table)
    log(f"wall time: {timings['total']:.0f} s (scoring {timings['score']:.0f} s)")
    return out


def _logger(path: Path) -> Any:
    def log(text: str) -> None:
        print(text, flush=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(text + "\n")
    return log


def _score(args: argparse.Namespace, mix: Path, max_length: int, log: Any) -> float:
    """``tive score`` in a child process; the warm-up as the README's quick start runs it on a
    small mixture (``--warmup-global-batch 4 --warmup-lr 2e-4``) unless told otherwise."""
    cmd = [str(Path(sys.executable).with_name("tive")), "score", "--model", args.model,
           "--data", str(mix), "--run", str(args.out / "run"), "--max-length", str(max_length),
           "--device", args.device, "--quiet"]
    if args.warmup_global_batch:
        cmd += ["--warmup-global-batch", str(args.warmup_global_batch)]
    if args.warmup_lr:
        cmd += ["--warmup-lr", str(args.warmup_lr)]
    log("$ " + " ".join(cmd))
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log(res.stdout.strip())
    if res.returncode:
        raise SystemExit(f"tive score failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return time.perf_counter() - t0


def _report(run: Path) -> Any:
    from tive import value_estimate

    return value_estimate(store=run)


def _subsets(report: Any, args: argparse.Namespace, seeds: list[int],
             log: Any) -> dict[str, dict[str, Any]]:
    """``{run name: {"method", "budget", "seed", "indices", "selected"}}`` for every method,
    budget and seed, seed by seed (every method's first seed, the full mixture's included,
    comes before any second seed, so that a run cut short still compares every method); each
    subset is also saved under ``out/subsets``."""
    out: dict[str, dict[str, Any]] = {}
    wanted = args.methods.split(",")
    for seed in seeds:
        for budget in args.budgets.split(","):
            for name in (m for m in METHODS if m in wanted):
                kwargs, seeded = METHODS[name]
                sel = report.select(budget=budget, **kwargs, **({"seed": seed} if seeded else {}))
                sel.save(args.out / "subsets" / f"{name}-{budget}-s{seed}.json")
                out[f"{name}@{budget}#s{seed}"] = {
                    "method": name, "budget": budget, "seed": seed,
                    "indices": sel.indices.tolist(), "selected": sel.selected()}
        if FULL in wanted:
            out[f"{FULL}#s{seed}"] = {"method": FULL, "budget": "1.0", "seed": seed,
                                      "indices": np.flatnonzero(report.valid).tolist(),
                                      "selected": report.valid_sizes()}
    log("subsets: " + ", ".join(f"{k} {len(v['indices'])}" for k, v in out.items()
                                if v["seed"] == seeds[0]))
    return out


def _train_all(args: argparse.Namespace, report: Any, held: Path,
               subsets: dict[str, dict[str, Any]], recipe: Recipe, log: Any) -> None:
    """Fine-tune and evaluate every subset of this process's shard (and, in shard 0, the
    untouched model); finished runs are kept in ``out/runs-I.json`` and not repeated."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from tive.data.mixture import load_mixture
    from tive.data.tasks import label_tasks
    from tive.models.encoding import encode_row, pad_id
    from tive.models.load import load_model
    from tive.models.registry import resolve

    done_path = args.out / f"runs-{args.shard_index}.json"
    done = json.loads(done_path.read_text()) if done_path.exists() else {}
    plan = [(BASE, None), *subsets.items()][args.shard_index::args.shard_count]
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
    log(f"held out: {len(items)} records of {len(set(i.task for i in items))} tasks "
        f"({len(ev) - len(keep)} not encodable)")
    eos = sorted({int(tok.eos_token_id),
                  *(int(e) for e in np.atleast_1d(base.generation_config.eos_token_id or []))})
    torch.manual_seed(0)
    finished = set(_finished(args.out)) if list(args.out.glob("runs-*.json")) else set()
    for key, sub in plan:
        if key in done or key in finished:  # done here, or by a shard of an earlier split
            continue
        t0 = time.perf_counter()
        if sub is None:
            model, stats = base, {}
        else:
            records = [encoded[i] for i in sub["indices"] if not isinstance(encoded[i], str)]
            log(f"{key}: {len(records)} records")
            model, stats = train(base, records, recipe, sub["seed"], pad, args.device, log)
        scores = evaluate(model.to(args.device), items, tok, pad, eos, args.device)
        done[key] = {**({k: v for k, v in sub.items() if k != "indices"} if sub else
                        {"method": BASE, "budget": "0", "seed": 0, "selected": {}}),
                     "train": stats, "eval": scores, "seconds": time.perf_counter() - t0}
        done_path.write_text(json.dumps(done, indent=1))
        macro = np.mean([s["accuracy"] for s in scores.values()])
        log(f"  {key}: macro accuracy {macro:.3f} ({time.perf_counter() - t0:.0f} s)")
        del model


def _finished(out: Path) -> dict[str, dict[str, Any]]:
    """Every finished run of every shard (``runs-*.json``)."""
    runs: dict[str, dict[str, Any]] = {}
    for path in sorted(out.glob("runs-*.json")):
        runs.update(json.loads(path.read_text()))
    if not runs:
        raise SystemExit(f"{out}: no finished run (runs-*.json); run without --summary-only")
    return runs


def summarise(results: dict[str, dict[str, Any]], report: Any) -> dict[str, Any]:
    """Per (method, budget): macro accuracy and loss over seeds (mean, sd, each seed), per-task
    accuracy (mean over seeds), records per task; and the full mixture's macro for scale."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results.values():
        label = r["method"] if r["method"] in (FULL, BASE) else f"{r['method']} {r['budget']}"
        groups.setdefault(label, []).append(r)
    tasks = sorted({t for r in results.values() for t in r["eval"]})
    order = [BASE, *METHODS, FULL]  # rows: the untouched model, the methods, the full mixture
    labels = sorted(groups, key=lambda k: (order.index(groups[k][0]["method"]),
                                           -float(groups[k][0]["budget"])))
    rows = {}
    for label, runs in ((k, groups[k]) for k in labels):
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
    return {"tasks": tasks, "task_sizes": report.sizes,
            "task_values": report.task_values, "rows": rows}


def tables(summary: dict[str, Any]) -> str:
    """Markdown: the macro table, the per-task accuracy table, the records per task."""
    rows, tasks = summary["rows"], summary["tasks"]
    lines = ["| method | records | seeds | macro accuracy (mean ± sd) | per seed | of full "
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
              "| task value | " + " | ".join(f"{summary['task_values'][t]:.3g}" for t in names)
              + " |"]
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
