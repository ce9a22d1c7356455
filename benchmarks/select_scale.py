"""Selection at LLaVA-665K scale: time and peak memory of ``tive select`` on a synthetic store.

Builds (once, in ``--workdir``) a mixture of 665,298 tiny LLaVA records with the 665K task
sizes, and a store of 665,298 × ``--dim`` fp16 features (11 GB at 8192) with task-clustered
features; then runs ``tive select`` twice in child processes (the second at another budget,
reading the values the first cached in ``RUN/cache``) and reports each one's wall time and its
own peak RSS (its ``VmHWM``).

    python benchmarks/select_scale.py --workdir /tmp/tive-scale --cold     # 665,298 × 8192
    python benchmarks/select_scale.py --workdir /tmp/tive-small --records 50000 --dim 1024
    python benchmarks/select_scale.py --workdir /tmp/tive-200k --records 200000 --dim 2048 \
        --method kmeans
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# (task, records, image folder, prompt) as in llava_v1_5_mix665k.json (DESIGN.md)
TASKS = [
    ("llava_instruct", 157_712, "coco", "What is in the image?"),
    ("sharegpt", 40_688, None, "Hello"),
    ("vqav2", 82_783, "coco", "Answer the question using a single word or phrase."),
    ("gqa", 72_140, "gqa", "Answer the question using a single word or phrase."),
    ("okvqa", 8_998, "coco", "Answer the question using a single word or phrase."),
    ("ocrvqa", 80_000, "ocr_vqa", "Who wrote this book?"),
    ("aokvqa", 66_160, "coco", "Answer with the option's letter from the given choices directly."),
    ("textcaps", 21_953, "textvqa", "Provide a one-sentence caption for the provided image."),
    ("refcoco", 48_447, "coco", "Please provide a short description for this region: [0, 0, 1, 1]"),
    ("vg", 86_417, "vg", "Please provide a short description for this region: [0, 0, 1, 1]"),
]


def build(workdir: Path, records: int, dim: int) -> None:
    """Write ``mix.json`` and ``run/store`` unless they are there already."""
    from tive.data.mixture import load_mixture
    from tive.data.tasks import label_tasks
    from tive.store.format import IndexEntry
    from tive.store.writers import write_store

    scale = records / sum(n for _, n, _, _ in TASKS)
    counts = [max(1, round(n * scale)) for _, n, _, _ in TASKS]
    counts[0] += records - sum(counts)
    data = workdir / "mix.json"
    if not data.exists():
        out = []
        for (task, _, folder, prompt), n in zip(TASKS, counts):
            for j in range(n):
                turns = [{"from": "human", "value": f"<image>\n{prompt}"},
                         {"from": "gpt", "value": "A"}]
                if task == "vqav2":
                    turns += turns[:2]
                r = {"id": f"{task}-{j}", "conversations": turns}
                if folder:
                    r["image"] = f"{folder}/{j}.jpg"
                out.append(r)
        data.write_text(json.dumps(out))
    if (workdir / "run/store/meta.json").exists():
        return
    mixture = load_mixture(data)
    labels = label_tasks(mixture)
    names, codes = np.unique(labels.tasks.astype(str), return_inverse=True)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(len(names), dim)).astype(np.float32)

    class Features:
        """Generates the (N, dim) features chunk by chunk as write_store copies them."""
        shape, dtype = (records, dim), np.float32

        def __getitem__(self, rows: slice) -> np.ndarray:
            block = rng.normal(size=(len(range(*rows.indices(records))), dim)).astype(np.float32)
            return block * 2 + centers[codes[rows]]

    norms = rng.uniform(0.5, 2.0, size=len(names))[codes] * rng.lognormal(0, 0.3, records)
    index = [IndexEntry(r.id, str(t), int(k)) for r, t, k in zip(mixture, labels.tasks, mixture.keys)]
    meta = {"source": "benchmark:synthetic", "projector": {"type": "synthetic", "seed": 0},
            "data": {"path": str(data.resolve()), "format": "json", "schema": "llava",
                     "fingerprint": mixture.fingerprint},
            "settings": {"skip_missing_images": True}}
    write_store(workdir / "run/store", features=Features(), norms=norms, index=index, meta=meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--records", type=int, default=665_298)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--budget", default="0.075")
    ap.add_argument("--method", default="tive", help="tive select --method (e.g. kmeans)")
    ap.add_argument("--clusters", type=int, help="tive select --clusters (kmeans only)")
    ap.add_argument("--second-budget", default="0.15",
                    help="budget of the second call, which reads the values cached by the first")
    ap.add_argument("--cold", action="store_true",
                    help="remove RUN/cache first, so the first call computes the values")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build(args.workdir, args.records, args.dim)
    print(f"store ready ({time.perf_counter() - t0:.0f} s to build or find)")
    cmd = [str(Path(sys.executable).with_name("tive")), "select", "--run",
           str(args.workdir / "run"), "--budget", args.budget, "--method", args.method]
    if args.clusters is not None:
        cmd += ["--clusters", str(args.clusters)]
    if args.cold:
        shutil.rmtree(args.workdir / "run" / "cache", ignore_errors=True)
    second = cmd[:5] + [args.second_budget] + cmd[6:]
    rows = [("first", *timed(cmd)), ("second", *timed(second))]
    size_gb = (args.workdir / "run/store/features.npy").stat().st_size / 1e9
    print("| records | dim | features | call | tive select | wall | peak RSS (that process) |")
    print("|---|---|---|---|---|---|---|")
    for (name, wall, peak_mb), c in zip(rows, (cmd, second)):
        print(f"| {args.records:,} | {args.dim} | {size_gb:.1f} GB fp16 | {name} "
              f"| {' '.join(c[4:])} | {wall:.1f} s | {peak_mb:,.0f} MB |")


def timed(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` (``tive select ...``); its wall time in s and the peak RSS in MB of that
    process alone.

    The peak is the child's own ``VmHWM`` (the high-water mark of its address space since its
    ``exec``), which it writes to a file as it exits. ``RUSAGE_CHILDREN`` (and even ``wait4``'s
    or the child's own ``getrusage``) would also count this script's memory at the fork: Linux
    carries the pre-``exec`` peak into the child's ``ru_maxrss``, so right after building the
    store in this process they reported its 11 GB.
    """
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "vmhwm"
        code = ("import atexit, sys\n"
                "def peak():\n"
                "    for line in open('/proc/self/status'):\n"
                "        if line.startswith('VmHWM:'):\n"
                f"            open({str(report)!r}, 'w').write(line.split()[1])\n"
                "atexit.register(peak)\n"
                f"sys.argv = {['tive', *cmd[1:]]!r}\n"
                "from tive.cli.commands import main\n"
                "main()\n")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode})")
        return wall, int(report.read_text()) / 1024


if __name__ == "__main__":
    main()
