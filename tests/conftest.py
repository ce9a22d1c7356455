"""Shared fixtures: small mixtures with images and synthetic features, built in tmp folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

TOL = 1e-10  # float64 agreement between streamed and reference computations
TOL32 = 1e-5  # the same for float16/float32 features, which are reduced in float32
SCALE_TOL = 1e-4  # float32 results of training or summing in another order, relative to the
#                  tensor's largest entry (an absolute tolerance fails on another CPU's rounding)


def assert_close_to_scale(got, want, rel: float = SCALE_TOL) -> None:
    """``got`` equals ``want`` within ``rel`` of ``want``'s largest magnitude, elementwise (numpy
    arrays or torch tensors): the difference an element near zero may show when float32 sums
    are taken in another order, on any CPU."""
    got, want = (np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64)
                 for x in (got, want))
    scale = float(np.abs(want).max()) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel * scale)

TASK_SPECS = {  # task -> (image folder or None, prompt suffix, records)
    "llava_instruct": ("coco", "Describe the image in detail.", 12),
    "vqav2": ("coco", "Answer the question using a single word or phrase.", 9),
    "gqa": ("gqa", "Answer the question using a single word or phrase.", 7),
    "sharegpt": (None, "Write a poem.", 5),
    "vg": ("vg", "Please provide a short description for this region: [0.1, 0.2, 0.3, 0.4]", 3),
}


def llava_records(specs: dict = TASK_SPECS, seed: int = 0) -> list[dict]:
    """LLaVA-format records whose inferred tasks are the keys of ``specs``."""
    rng = np.random.default_rng(seed)
    records = []
    for task, (folder, prompt, count) in specs.items():
        for j in range(count):
            rid = f"{task}-{j}"
            turns = [{"from": "human", "value": f"<image>\nQuestion {j}?\n{prompt}"},
                     {"from": "gpt", "value": "answer " * int(rng.integers(1, 20))}]
            if task == "vqav2":  # several QA pairs: VQAv2, not OK-VQA
                turns += [{"from": "human", "value": f"More {j}?\n{prompt}"},
                          {"from": "gpt", "value": "yes"}]
            record = {"id": rid, "conversations": turns}
            if folder:
                record["image"] = f"{folder}/{rid}.png"
            else:
                turns[0]["value"] = turns[0]["value"].replace("<image>\n", "")
            records.append(record)
    return records


def write_mixture(folder: Path, records: list[dict], images: bool = True) -> Path:
    """Write ``mix.json`` and (empty placeholder) image files under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if images:
        for r in records:
            if "image" in r:
                p = folder / r["image"]
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(b"\x89PNG")
    path = folder / "mix.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def task_features(tasks: list[str], dim: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features clustered by task (a mean direction plus noise) and task-dependent norms."""
    rng = np.random.default_rng(seed)
    names = sorted(set(tasks))
    centers = {t: rng.normal(size=dim) for t in names}
    scale = {t: 1.0 + i for i, t in enumerate(names)}
    feats = np.stack([centers[t] + rng.normal(scale=1.5, size=dim) for t in tasks])
    norms = np.array([scale[t] * rng.uniform(0.5, 1.5) for t in tasks])
    return feats, norms


@pytest.fixture
def mixture_run(tmp_path: Path) -> dict:
    """A LLaVA mixture with images, features and norms saved as .npy files."""
    records = llava_records()
    data = write_mixture(tmp_path / "data", records)
    tasks = [r["id"].rsplit("-", 1)[0] for r in records]
    feats, norms = task_features(tasks)
    np.save(tmp_path / "features.npy", feats.astype(np.float32))
    np.save(tmp_path / "norms.npy", norms)
    return {"data": data, "records": records, "tasks": tasks, "features": feats,
            "norms": norms, "dir": tmp_path, "run": tmp_path / "run"}


@pytest.fixture
def imported(mixture_run: dict) -> dict:
    """:func:`mixture_run` with its features imported into ``RUN`` by ``tive import``."""
    from click.testing import CliRunner

    from tive.cli.commands import main

    d = mixture_run["dir"]
    args = ["import", "--data", mixture_run["data"], "--features", d / "features.npy",
            "--norms", d / "norms.npy", "--run", mixture_run["run"]]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + str(result.exception)
    return mixture_run


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` run only when asked for (``-m slow``)."""
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
