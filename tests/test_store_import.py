"""The store: import from .npy and from the TIVE authors' outputs, identity checks, atomicity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_mixture

from tive import value_estimate
from tive.data.mixture import load_mixture
from tive.data.tasks import label_tasks
from tive.errors import DataError, OutputError, StoreError
from tive.store.external import import_store, read_authors_outputs, reorder_by_ids
from tive.store.format import Store


def _import(mixture_run, **kw):
    mixture = load_mixture(mixture_run["data"])
    arrays = {"features": mixture_run["features"], "norms": mixture_run["norms"], **kw}
    return import_store(mixture_run["run"], mixture, label_tasks(mixture), arrays,
                        source="test", settings={})


def test_imported_store_has_the_named_files_and_reads_as_memmap(mixture_run):
    store = _import(mixture_run, loss=np.linspace(0, 1, 36))
    names = {p.name for p in store.root.iterdir()}
    assert names == {"meta.json", "features.npy", "norms.npy", "loss.npy", "ntokens.npy",
                     "done.npy", "skipped.npy", "index.jsonl"}
    feats = np.load(store.root / "features.npy", mmap_mode="r")
    assert isinstance(feats, np.memmap) and feats.dtype == np.float16
    np.testing.assert_array_equal(feats, mixture_run["features"].astype(np.float16))
    np.testing.assert_array_equal(store.array("norms"), mixture_run["norms"])
    assert store.array("ntokens").tolist() == [-1] * 36 and store.array("done").all()
    meta = json.loads((store.root / "meta.json").read_text())
    assert meta["data"]["records"] == 36 and meta["projector"]["dim"] == 24
    assert [e.task for e in store.index()] == mixture_run["tasks"]
    assert [e.id for e in store.index()] == [r["id"] for r in mixture_run["records"]]


def test_store_report_equals_array_report(mixture_run):
    _import(mixture_run)
    from_store = value_estimate(store=mixture_run["run"])
    feats16 = mixture_run["features"].astype(np.float16)
    from_arrays = value_estimate(features=feats16, norms=mixture_run["norms"],
                                 data=mixture_run["data"])
    np.testing.assert_array_equal(from_store.instance_values, from_arrays.instance_values)
    assert from_store.select(budget=0.3).indices.tolist() == \
        from_arrays.select(budget=0.3).indices.tolist()


def test_store_refuses_other_data_showing_both_identities(mixture_run, tmp_path):
    _import(mixture_run)
    records = mixture_run["records"]
    edited = [dict(r) for r in records]
    edited[3]["conversations"] = [{"from": "human", "value": "changed"},
                                  {"from": "gpt", "value": "x"}]
    other = write_mixture(tmp_path / "edited", edited)
    with pytest.raises(StoreError) as e:
        value_estimate(store=mixture_run["run"], data=other)
    msg = str(e.value)
    fp = json.loads((mixture_run["run"] / "store/meta.json").read_text())["data"]["fingerprint"]
    assert fp[:12] in msg and load_mixture(other).fingerprint[:12] in msg
    assert "fix:" in msg and "\n" not in msg
    shorter = write_mixture(tmp_path / "short", records[:-1])
    with pytest.raises(StoreError, match="36 records.*35 records"):
        value_estimate(store=mixture_run["run"], data=shorter)


def test_import_refuses_wrong_row_count_and_writes_nothing(mixture_run):
    with pytest.raises(DataError, match=r"--loss: shape \(35,\), but .* has 36 records"):
        _import(mixture_run, loss=np.zeros(35))
    assert not mixture_run["run"].exists()


def test_store_interrupted_while_writing_leaves_nothing_behind(mixture_run, monkeypatch):
    real_save = np.save

    def failing_save(path, arr, *a, **k):
        if str(path).endswith("loss.npy"):
            raise OSError("disk full")
        return real_save(path, arr, *a, **k)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OutputError, match="disk full"):
        _import(mixture_run)
    assert list(mixture_run["run"].iterdir()) == []  # no store, no temporary folder


def test_existing_store_is_not_overwritten_without_force(mixture_run):
    _import(mixture_run)
    with pytest.raises(StoreError, match="already exists"):
        _import(mixture_run)


def test_damaged_store_is_refused(mixture_run):
    store = _import(mixture_run)
    np.save(store.root / "norms.npy", np.zeros(5))
    with pytest.raises(StoreError, match="norms.npy: shape"):
        Store.open(mixture_run["run"])
    (store.root / "meta.json").unlink()
    with pytest.raises(StoreError, match="no feature store here"):
        Store.open(mixture_run["run"])


def test_authors_outputs_concatenate_chunks_in_order(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(10, 8)).astype(np.float16)
    norms = rng.uniform(1, 2, size=10)
    chunks = [(0, 4), (4, 8), (8, 10)]  # authors: ceil(N / chunks) rows per chunk
    for c, (a, b) in enumerate(chunks):
        torch.save([torch.from_numpy(feats[a:min(a + 3, b)]), torch.from_numpy(feats[a + 3:b])],
                   tmp_path / f"output_{c}")
        (tmp_path / f"output_norm_{c}.json").write_text(json.dumps(norms[a:b].tolist()))
    got = read_authors_outputs(tmp_path)
    assert got["features"].shape == (10, 8)
    np.testing.assert_array_equal(got["norms"], norms)
    for step in (1, 3, 10):  # slices across chunk boundaries, as the store copies them
        rows = np.concatenate([got["features"][a:a + step] for a in range(0, 10, step)])
        np.testing.assert_array_equal(rows, feats.astype(np.float32))
    (tmp_path / "output_norm_1.json").write_text("[1.0, 1.0, 1.0]")
    with pytest.raises(DataError, match="3 norms for 4 feature rows"):
        read_authors_outputs(tmp_path)["features"][0:10]
    (tmp_path / "output_1").unlink()
    with pytest.raises(DataError, match="a chunk is missing"):
        read_authors_outputs(tmp_path)


def test_rows_matched_by_ids_and_duplicate_ids_refused(mixture_run, tmp_path):
    mixture = load_mixture(mixture_run["data"])
    perm = np.random.default_rng(1).permutation(36)
    ids = [mixture.ids[i] for i in perm]
    arrays = {"features": mixture_run["features"][perm], "norms": mixture_run["norms"][perm]}
    back = reorder_by_ids(mixture, ids, arrays, "ids.json")
    for step in (5, 36):  # read lazily, slice by slice, as the store copies it
        rows = np.concatenate([back["features"][a:a + step] for a in range(0, 36, step)])
        np.testing.assert_array_equal(rows, mixture_run["features"])
    with pytest.raises(DataError, match="appears twice"):
        reorder_by_ids(mixture, ids[:-1] + ids[:1], arrays, "ids.json")
    records = mixture_run["records"] + [dict(mixture_run["records"][0], image="coco/x.png")]
    dup = load_mixture(write_mixture(tmp_path / "dup", records))
    with pytest.raises(DataError, match="used by more than one record"):
        reorder_by_ids(dup, dup.ids, {"features": np.zeros((37, 2))}, "ids.json")


@pytest.mark.parametrize("name, value, message", [
    ("norms", np.float64(3.0), r"--norms: shape \(\)"),
    ("norms", np.ones((36, 2)), r"--norms: shape \(36, 2\)"),
    ("norms", -np.ones(36), "row 0 is -1.0; expected exact gradient norms"),
    ("ntokens", np.full(36, np.nan), "--ntokens: holds non-integral"),
    ("features", np.ones(36), r"features: shape \(36,\)"),
])
def test_import_refuses_malformed_arrays_before_writing(mixture_run, name, value, message):
    with pytest.raises(DataError, match=message):
        _import(mixture_run, **{name: value})
    assert not mixture_run["run"].exists()


@pytest.mark.parametrize("scale", [1e6, 1e-9])  # overflow to inf; underflow to zero
def test_float16_store_refuses_features_it_cannot_hold(mixture_run, scale):
    with pytest.raises(StoreError, match=r"row 0 .* does not fit float16 .*--feature-dtype float32"):
        _import(mixture_run, features=mixture_run["features"] * scale)
    assert list(mixture_run["run"].iterdir()) == []
    mixture = load_mixture(mixture_run["data"])
    store = import_store(mixture_run["run"], mixture, label_tasks(mixture),
                         {"features": mixture_run["features"] * scale,
                          "norms": mixture_run["norms"]},
                         source="test", settings={}, feature_dtype="float32")
    assert store.features.dtype == np.float32


def test_ids_file_errors_are_data_errors(mixture_run, tmp_path):
    from tive.store.external import read_ids
    bad = tmp_path / "ids.json"
    bad.write_text("[1, 2")
    with pytest.raises(DataError, match="ids.json:1:"):
        read_ids(bad)
    with pytest.raises(DataError, match="cannot read"):
        read_ids(tmp_path / "nope.txt")
    mixture = load_mixture(mixture_run["data"])
    with pytest.raises(DataError, match="3 ids for 36 feature rows"):
        reorder_by_ids(mixture, ["a", "b", "c"], {"features": mixture_run["features"],
                                                   "norms": mixture_run["norms"]}, "ids.json")
