"""Targeted selection: RUN/target (imported), the methods less and tive-target against a
brute-force twin, and a synthetic store whose answer is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TOL, TOL32, write_mixture

from tive import value_estimate
from tive.cli.commands import main
from tive.errors import ConfigError, StoreError
from tive.selection import targeted as tg
from tive.store.format import Store


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def text_records(tasks: list[str], prefix: str) -> list[dict]:
    return [{"id": f"{prefix}{i}", "task": t,
             "conversations": [{"from": "human", "value": f"{prefix} question {i}"},
                               {"from": "gpt", "value": f"answer {i}"}]}
            for i, t in enumerate(tasks)]


def directions(dim: int, seed: int = 1) -> np.ndarray:
    """Three orthonormal directions in ``dim`` dimensions."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, 3)))
    return q.T


def known_answer(tmp_path, dim: int = 32):
    """A store of tasks a, b, c (12 each) clustered along three orthogonal directions, and a
    target of 8 records along b's: the answer is b."""
    rng = np.random.default_rng(0)
    tasks = [t for t in "abc" for _ in range(12)]
    e = dict(zip("abc", directions(dim)))
    feats = np.stack([e[t] + rng.normal(scale=0.05, size=dim) for t in tasks])
    norms = rng.uniform(0.5, 2, size=len(tasks)) * np.array([{"a": 5, "b": 1, "c": 3}[t]
                                                              for t in tasks])
    data = write_mixture(tmp_path / "data", text_records(tasks, "r"))
    np.save(tmp_path / "f.npy", feats.astype(np.float32))
    np.save(tmp_path / "n.npy", norms)
    target = np.stack([e["b"] + rng.normal(scale=0.05, size=dim) for _ in range(8)])
    val = write_mixture(tmp_path / "val", text_records(["bench"] * 8, "v"))
    np.save(tmp_path / "t.npy", target.astype(np.float32))
    run = tmp_path / "run"
    res = invoke("import", "--data", data, "--features", tmp_path / "f.npy", "--norms",
                 tmp_path / "n.npy", "--run", run)
    assert res.exit_code == 0, res.output
    res = invoke("import", "--target-features", tmp_path / "t.npy", "--target-data", val,
                 "--run", run)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "imported 8 target records × 32 features" in res.output
    return run, tasks


def test_both_methods_pick_the_task_the_target_points_along(tmp_path):
    run, tasks = known_answer(tmp_path)
    b_rows = [i for i, t in enumerate(tasks) if t == "b"]
    report = value_estimate(store=run)
    less = report.select(budget=12, method="less")
    assert sorted(less.indices.tolist()) == b_rows
    aim = report.select(budget=12, method="tive-target", seed=3)
    assert aim.quotas == {"a": 0, "b": 12, "c": 0} and sorted(aim.indices.tolist()) == b_rows
    # untargeted TIVE gives the budget by gradient norm: a, the largest, gets the most
    assert report.select(budget=12).quotas["a"] > 6
    values = report.targeted()
    assert values.serves == {"a": "bench", "b": "bench", "c": "bench"}
    assert values.task_values["b"] > 0.9 and abs(values.task_values["a"]) < 0.1
    # from the command line too
    res = invoke("select", "--run", run, "--budget", 12, "--method", "less")
    assert res.exit_code == 0, res.output + repr(res.exception)
    chosen = json.loads((run / "subset-less-12.json").read_text())
    assert {r["task"] for r in chosen} == {"b"} and len(chosen) == 12


def brute_force(feats: np.ndarray, tasks: list[str], target: np.ndarray,
                target_tasks: list[str]):
    """Every pairwise cosine, then LESS's score and tive-target's values by definition."""
    f = feats.astype(np.float64)
    t = target.astype(np.float64)
    cos = (f @ t.T) / np.linalg.norm(f, axis=1)[:, None] / np.linalg.norm(t, axis=1)[None, :]
    names = list(dict.fromkeys(target_tasks))
    a = np.stack([cos[:, [j for j, s in enumerate(target_tasks) if s == name]].mean(axis=1)
                  for name in names], axis=1)  # (N, S) mean cosine to each target task
    less = a.max(axis=1)
    value, instance = {}, np.zeros(len(tasks))
    for task in dict.fromkeys(tasks):
        rows = [i for i, x in enumerate(tasks) if x == task]
        means = a[rows].mean(axis=0)
        best = int(np.argmax(means))
        value[task] = max(0.0, float(means[best]))
        instance[rows] = a[rows, best]
    return less, value, instance


@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_scores_equal_a_brute_force_all_pairs_computation(tmp_path, chunk_rows):
    rng = np.random.default_rng(4)
    tasks = [str(x) for x in rng.choice(["p", "q", "r", "s"], size=40)]
    feats = rng.normal(size=(40, 16)) + np.where(np.array(tasks)[:, None] == "p", 1.0, 0.0)
    target_tasks = [str(x) for x in rng.choice(["x", "y", "z"], size=15)]
    target = rng.normal(size=(15, 16)) + 0.5
    less, value, instance = brute_force(feats, tasks, target, target_tasks)
    report = value_estimate(features=feats, norms=np.ones(40), tasks=tasks,
                            target=(target, target_tasks), chunk_rows=chunk_rows)
    got = report.targeted()
    np.testing.assert_allclose(got.less, less, rtol=0, atol=TOL)
    np.testing.assert_allclose(got.instance, instance, rtol=0, atol=TOL)
    assert got.task_values.keys() == value.keys()
    np.testing.assert_allclose([got.task_values[t] for t in value], list(value.values()),
                               rtol=0, atol=TOL)
    # the same through an imported store and target (float16 on disk: float32 arithmetic)
    data = write_mixture(tmp_path / "data", text_records(tasks, "r"))
    val = write_mixture(tmp_path / "val", text_records(target_tasks, "v"))
    np.save(tmp_path / "f.npy", feats)
    np.save(tmp_path / "n.npy", np.ones(40))
    np.save(tmp_path / "t.npy", target)
    run = tmp_path / "run"
    for args in (("--data", data, "--features", tmp_path / "f.npy", "--norms",
                  tmp_path / "n.npy", "--feature-dtype", "float32"),
                 ("--target-features", tmp_path / "t.npy", "--target-data", val,
                  "--feature-dtype", "float32")):
        assert invoke("import", *args, "--run", run).exit_code == 0
    stored = value_estimate(store=run, chunk_rows=chunk_rows).targeted()
    f32, t32 = feats.astype(np.float32), target.astype(np.float32)
    less32, _, instance32 = brute_force(f32, tasks, t32, target_tasks)
    np.testing.assert_allclose(stored.less, less32, rtol=0, atol=TOL32)
    np.testing.assert_allclose(stored.instance, instance32, rtol=0, atol=TOL32)
    # kept in RUN/cache, and read back the same
    assert len(list((run / "cache").glob("target-*.npz"))) == 1
    again = value_estimate(store=run, chunk_rows=chunk_rows).targeted()
    assert np.array_equal(again.alignment, stored.alignment)


def test_a_target_for_another_store_or_none_is_refused(tmp_path):
    run, tasks = known_answer(tmp_path)
    report = value_estimate(features=np.eye(3), norms=np.ones(3), tasks=["a", "b", "c"])
    with pytest.raises(ConfigError, match="no target"):
        report.select(budget=1, method="less")
    report.target, report.features = tg.Target.of_arrays(np.eye(3), ["x"] * 3, 3), None
    with pytest.raises(ConfigError, match="tive-target: this report has no features to compare"):
        report.select(budget=1, method="tive-target")
    # the store imported again from other features: the target no longer matches it
    np.save(tmp_path / "f2.npy", np.load(tmp_path / "f.npy")[::-1].copy())
    res = invoke("import", "--data", tmp_path / "data" / "mix.json", "--features",
                 tmp_path / "f2.npy", "--norms", tmp_path / "n.npy", "--run", run, "--force")
    assert res.exit_code == 0, res.output
    report = value_estimate(store=run)
    report.select(budget=5)  # untargeted methods do not read the target
    with pytest.raises(StoreError, match="another reference or projector"):
        report.select(budget=5, method="less")
    res = invoke("select", "--run", run, "--budget", 5, "--method", "tive-target")
    assert res.exit_code == 2 and "another reference or projector" in res.output
    # a target of another width
    np.save(tmp_path / "t5.npy", np.ones((8, 5), np.float32))
    res = invoke("import", "--target-features", tmp_path / "t5.npy", "--target-data",
                 tmp_path / "val" / "mix.json", "--run", run, "--force")
    assert res.exit_code == 2 and "expected (8, 32)" in res.output
    res = invoke("import", "--target-features", tmp_path / "t.npy", "--run", run)
    assert res.exit_code == 2 and "go together" in res.output
    assert Store.open(run / "target").n_records == 8  # the first target is untouched


def test_targeted_values_stream_in_chunks_equal_one_chunk():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 8)).astype(np.float16)
    means = rng.normal(size=(3, 8))
    valid = rng.uniform(size=50) > 0.2
    whole = tg.alignment(feats, valid, means)
    np.testing.assert_allclose(tg.alignment(feats, valid, means, chunk_rows=7), whole,
                               rtol=0, atol=TOL32)
    assert np.isnan(whole[~valid]).all() and np.isfinite(whole[valid]).all()


def test_report_and_page_show_each_tasks_alignment_and_nearest_target_example(tmp_path):
    run, tasks = known_answer(tmp_path)
    res = invoke("report", "--run", run)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "target (bench):" in res.output
    line = [x for x in res.output.splitlines() if x.startswith("b ")][-1]  # the target table
    assert "bench" in line and " → v" in line and "cos 0.9" in line
    res = invoke("report", "--run", run, "--json")
    aim = json.loads(res.output)["target"]
    assert aim["target_tasks"] == ["bench"] and set(aim["tasks"]) == {"a", "b", "c"}
    b = aim["tasks"]["b"]
    assert b["serves"] == "bench" and b["alignment"] > 0.9 and len(b["top"]) == 3
    assert all(t["id"].startswith("r") and t["nearest"]["id"].startswith("v")
               and t["nearest"]["task"] == "bench" and t["nearest"]["cosine"] > 0.9
               for t in b["top"])
    assert abs(aim["tasks"]["a"]["alignment"]) < 0.1
    res = invoke("select", "--run", run, "--budget", 12, "--method", "tive-target")
    assert res.exit_code == 0, res.output
    assert "alignment" in res.output.splitlines()[0]
    saved = json.loads((run / "subset-tive-target-12.report.json").read_text())["tasks"]
    assert saved["b"]["alignment"] == pytest.approx(b["alignment"]) and saved["b"]["quota"] == 12
    res = invoke("report", "--run", run)
    assert res.output.splitlines()[-4].split() == ["task", "alignment", "quota", "selected"]
    res = invoke("report", "--run", run, "--html")
    assert res.exit_code == 0, res.output + repr(res.exception)
    page = (run / "subset-tive-target-12.html").read_text()
    assert "<h2>Target</h2>" in page and "serves target task" in page
    assert b["top"][0]["nearest"]["id"] in page
    # a stale target is said, and the rest of the report stands
    meta = json.loads((run / "target" / "meta.json").read_text())
    meta["reference"]["source"] = "elsewhere"
    (run / "target" / "meta.json").write_text(json.dumps(meta))
    res = invoke("report", "--run", run)
    assert res.exit_code == 0 and "target: " in res.output
    assert "another reference or projector" in res.output
