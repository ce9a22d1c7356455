"""``STORE/probe.json`` (the warm-up's progress on records it did not train on) and
``--task-value progress``, against independent computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import assert_close_to_scale
from test_score import invoke, model_dir  # noqa: F401  (the module's tiny LLaVA)
from test_warmup import image_mixture

from tive import value_estimate
from tive.data.mixture import load_mixture
from tive.errors import ConfigError
from tive.models.encoding import collate, encode_row, pad_id
from tive.models.load import load_model
from tive.models.registry import resolve
from tive.scoring.probe import probe_rows
from tive.store.format import Store
from tive.store.probe import PER_TASK, progress_ratios, read_probe, write_probe


def test_probe_rows_are_outside_the_sample_per_task_and_order_free():
    tasks = np.array(["a"] * 50 + ["b"] * 5 + ["c"] * 2, dtype=object)
    keys = np.arange(57, dtype=np.uint64) * 7919 + 11
    trained = np.array([0, 1, 2, 50, 55, 56])
    rows = probe_rows(tasks, keys, trained, per_task=10)
    assert not set(rows.tolist()) & set(trained.tolist())
    counts = {t: int((tasks[rows] == t).sum()) for t in ("a", "b", "c")}
    assert counts == {"a": 10, "b": 4, "c": 0}
    perm = np.random.default_rng(0).permutation(57)  # the same records, shuffled
    moved = probe_rows(tasks[perm], keys[perm], np.flatnonzero(np.isin(perm, trained)), 10)
    assert sorted(perm[moved].tolist()) == sorted(rows.tolist())


@pytest.fixture(scope="module")
def scored(tmp_path_factory, model_dir):  # noqa: F811
    tmp = tmp_path_factory.mktemp("probe")
    data = image_mixture(tmp / "data", n_per_task=8)
    run = tmp / "run"
    res = invoke("score", "--model", model_dir, "--data", data, "--run", run,
                 "--warmup-fraction", "0.4", "--lora-r", "4", "--lora-alpha", "8",
                 "--lora-dropout", "0", "--warmup-lr", "0.01", "--warmup-global-batch", "3",
                 "--warmup-batch-size", "3", "--proj-dim", 32, "--feature-dtype", "float32",
                 "--max-length", 256, "--device", "cpu", "--quiet")
    assert res.exit_code == 0, res.output + repr(res.exception)
    return {"data": data, "run": run, "output": res.output}


def test_score_writes_the_probe_of_records_outside_the_warm_up_sample(scored, model_dir):  # noqa: F811
    run = scored["run"]
    probe = read_probe(run / "store")
    ref = json.loads((run / "reference" / "reference.json").read_text())
    rows = probe["rows"]
    assert len(rows) and not set(rows.tolist()) & set(ref["sample"]["rows"])
    mixture = load_mixture(scored["data"])
    per = {t: e["records"] for t, e in probe["tasks"].items()}
    assert sum(per.values()) == len(rows) and max(per.values()) <= PER_TASK
    assert len(per) == 3  # every task has records outside the sample
    assert "probe:" in scored["output"] and "progress" in scored["output"]
    # the reference loss is the store's own per-record loss (the same definition)
    store = Store.open(run)
    assert_close_to_scale(probe["reference"], store.array("loss")[rows], rel=1e-5)
    # the base loss: the untouched model, one record at a time, transformers' own loss
    loaded = load_model(resolve(str(model_dir)), dtype="fp32", device="cpu")
    encoder, pad = loaded.encoder(256), pad_id(loaded.tokenizer)
    want = []
    for row in rows.tolist():
        batch = collate([encode_row(encoder, mixture, row)], pad)
        with torch.no_grad():
            want.append(loaded.model(**{k: v for k, v in batch.items() if v is not None})
                        .loss.item())
    assert_close_to_scale(probe["base"], np.array(want), rel=1e-5)
    assert np.abs(probe["base"] - probe["reference"]).max() > 1e-3  # the warm-up moved it


def test_progress_values_by_hand(scored):
    run = scored["run"]
    report = value_estimate(store=run, data=False)
    got = report.values_of("progress")
    probe = read_probe(run / "store")
    names = report.tasks[probe["rows"]]
    for t, v in got.items():
        at = names == t
        drop = max(0.0, 1 - probe["reference"][at].mean() / probe["base"][at].mean())
        assert v == pytest.approx(report.task_values[t] * drop, rel=1e-12)
    r = value_estimate(store=run, task_value="progress")
    assert r.task_values == pytest.approx(got) and r.select(budget=6).config.task_value == \
        "progress"


def test_a_task_without_probe_records_takes_the_median_drop(imported):
    run = imported["run"]
    tasks = value_estimate(store=run, data=False).tasks
    names = sorted(set(tasks.tolist()))
    rows = np.concatenate([np.flatnonzero(tasks == t)[:2] for t in names[1:]])  # none of names[0]
    drops = {t: 0.1 * (i + 1) for i, t in enumerate(names[1:])}
    base = np.full(len(rows), 2.0)
    ref = np.array([2.0 * (1 - drops[tasks[r]]) for r in rows])
    write_probe(run / "store", tasks, {"rows": rows, "base": base, "reference": ref}, "x")
    report = value_estimate(store=run, data=False)
    got = report.values_of("progress")
    median = float(np.median(list(drops.values())))
    for t in names:
        assert got[t] == pytest.approx(report.task_values[t] * drops.get(t, median), rel=1e-9)


def test_progress_ratios_clip_a_loss_that_rose_and_skip_invalid_records():
    codes = np.array([0, 0, 1, 1])
    probe = {"records": 4, "rows": np.array([0, 1, 2, 3]), "base": np.array([1.0, 3.0, 1.0, 1.0]),
             "reference": np.array([0.5, 1.5, 2.0, 9.0])}
    valid = np.array([True, True, True, False])
    np.testing.assert_allclose(progress_ratios(codes, 3, valid, probe), [0.5, 0.0, np.nan])


def test_progress_is_refused_without_a_probe_and_a_damaged_probe_is_named(imported):
    run = imported["run"]
    with pytest.raises(ConfigError, match="probe.json"):
        value_estimate(store=run, task_value="progress")
    (run / "store" / "probe.json").write_text("{\"rows\": [1, 2], \"base\": [1]}")
    from tive.errors import DataError

    with pytest.raises(DataError, match="probe.json: damaged"):
        value_estimate(store=run, task_value="progress")
    value_estimate(store=run).select(budget=0.5)  # other task values do not read it


def test_scoring_a_complete_store_again_adds_only_the_probe(scored, tmp_path, model_dir):  # noqa: F811
    import shutil

    from test_score import store_bytes

    run = tmp_path / "run"
    shutil.copytree(scored["run"], run)
    before = store_bytes(run)
    probe = json.loads((run / "store" / "probe.json").read_text())
    (run / "store" / "probe.json").unlink()
    res = invoke("score", "--model", model_dir, "--data", scored["data"],
                 "--run", run, "--warmup-fraction", "0.4", "--lora-r", "4", "--lora-alpha", "8",
                 "--lora-dropout", "0", "--warmup-lr", "0.01", "--warmup-global-batch", "3",
                 "--warmup-batch-size", "3", "--proj-dim", 32, "--feature-dtype", "float32",
                 "--max-length", 256, "--device", "cpu", "--quiet")
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "reference already trained" in res.output
    assert "already complete: nothing to compute" in res.output and "probe: 14 records" in \
        res.output
    again = json.loads((run / "store" / "probe.json").read_text())
    assert again.pop("adapter") == str(run / "reference")  # where the copy's adapter is
    assert again == {k: v for k, v in probe.items() if k != "adapter"}
    assert store_bytes(run) == before


@pytest.mark.parametrize("change, fragment", [
    ({"rows": [0, -1]}, "distinct positions"),
    ({"rows": [0, 0]}, "distinct positions"),
    ({"rows": [0.5, 1]}, "distinct positions"),
    ({"records": 7}, "made for 7 records"),
])
def test_a_probe_that_does_not_fit_the_store_is_refused(imported, change, fragment):
    from tive.errors import DataError

    run = imported["run"]
    tasks = value_estimate(store=run, data=False).tasks
    write_probe(run / "store", tasks, {"rows": np.array([0, 1]), "base": np.array([2.0, 2.0]),
                                       "reference": np.array([1.0, 1.0])}, "x")
    path = run / "store" / "probe.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(DataError, match=fragment):
        value_estimate(store=run, task_value="progress")


def test_progress_without_any_probe_evidence_is_refused(imported):
    run = imported["run"]
    tasks = value_estimate(store=run, data=False).tasks
    write_probe(run / "store", tasks, {"rows": np.zeros(0, dtype=np.int64),
                                       "base": np.zeros(0), "reference": np.zeros(0)}, "x")
    with pytest.raises(ConfigError, match="no task has a probe record"):
        value_estimate(store=run, task_value="progress")
