"""`tive merge`: stores scored separately into one (docs/design.md, "Merging stores")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_grow import FILES, files
from test_score import invoke, reference, text_mixture
from zoo import save_llava_folder

from tive.store.format import Store

ARGS = ["--max-length", "256", "--batch-size", "1", "--proj-dim", "64", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    save_llava_folder(folder)
    return folder


def part(data: Path, rows: slice, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json.loads(data.read_text())[rows]))
    return out


@pytest.fixture(scope="module")
def scored(tmp_path_factory, model_dir) -> dict[str, Path]:
    """A mixture of 24 records, its whole store, and stores of two overlapping parts (rows
    0-13 and 10-23), each scored with one reference."""
    tmp = tmp_path_factory.mktemp("merge")
    mix = text_mixture(tmp / "data", 24)
    ref = reference(model_dir, mix, tmp / "ref", 0.5)
    out = {"mix": mix, "ref": ref, "tmp": tmp}
    for name, rows in (("whole", slice(None)), ("a", slice(0, 14)), ("b", slice(10, 24))):
        data = mix if name == "whole" else part(mix, rows, tmp / name / "part.json")
        res = invoke("score", "--model", model_dir, "--data", data, "--run", tmp / name,
                     "--reference", ref, *ARGS)
        assert res.exit_code == 0, res.output + res.stderr
        out[name] = tmp / name
    return out


def test_two_half_stores_merge_to_the_whole_store(scored, tmp_path):
    out = tmp_path / "merged"
    res = invoke("merge", scored["a"], scored["b"], "--run", out, "--data", scored["mix"])
    assert res.exit_code == 0, res.output + res.stderr
    assert "merged 24 rows from 2 stores" in res.output
    assert "4 records in more than one store, kept once" in res.output
    assert files(out) == files(scored["whole"])  # row for row, byte for byte
    store = Store.open(out)
    assert store.complete and store.meta["identity"] == Store.open(scored["whole"]).meta[
        "identity"]
    assert invoke("select", "--run", out, "--budget", "0.5").exit_code == 0
    again = invoke("merge", scored["a"], scored["b"], "--run", out, "--data", scored["mix"])
    assert again.exit_code == 2 and "a store is already there" in again.stderr


def test_a_partial_merge_is_finished_by_tive_score(scored, model_dir, tmp_path):
    out = tmp_path / "merged"
    res = invoke("merge", scored["a"], "--run", out, "--data", scored["mix"])
    assert res.exit_code == 0, res.output + res.stderr
    assert "10 records of the mixture are in none of the stores" in res.output
    assert not Store.open(out).complete
    res = invoke("score", "--model", model_dir, "--data", scored["mix"], "--run", out,
                 "--reference", scored["ref"], *ARGS)
    assert res.exit_code == 0 and "(10 in this run" in res.output, res.output + res.stderr
    assert files(out) == files(scored["whole"])


def test_other_identities_and_conflicting_rows_are_refused(scored, model_dir, tmp_path):
    other = tmp_path / "other"
    res = invoke("score", "--model", model_dir, "--data", scored["b"] / "part.json", "--run",
                 other, "--reference", scored["ref"], *ARGS[:-3], "--proj-dim", "32", "--quiet")
    assert res.exit_code == 0, res.output + res.stderr
    res = invoke("merge", scored["a"], other, "--run", tmp_path / "m1", "--data", scored["mix"])
    assert res.exit_code == 2 and "another identity" in res.stderr and "projector" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "m1" / "store").exists()
    # a row of the overlap changed in one of the stores
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(scored["b"], bad)
    norms = np.load(bad / "store" / "norms.npy")
    norms[0] *= 2  # row 0 of part b is record 10, also in part a
    np.save(bad / "store" / "norms.npy", norms)
    res = invoke("merge", scored["a"], bad, "--run", tmp_path / "m2", "--data", scored["mix"])
    assert res.exit_code == 2 and "has different rows (norm" in res.stderr, res.stderr
    assert "id 10 in" in res.stderr and not (tmp_path / "m2" / "store").exists()
    # without --data, stores of different data are refused
    res = invoke("merge", scored["a"], scored["b"], "--run", tmp_path / "m3")
    assert res.exit_code == 2 and "built from different data" in res.stderr
    assert set(FILES) <= {p.name for p in (scored["a"] / "store").iterdir()}


def test_the_merged_store_names_its_own_copy_of_the_adapter(scored, tmp_path):
    import shutil

    a = tmp_path / "a"
    shutil.copytree(scored["a"], a)
    shutil.copytree(scored["ref"], a / "reference")  # a run folder holding the adapter
    out = tmp_path / "merged"
    (out / "reference").mkdir(parents=True)
    (out / "reference" / "stale.txt").write_text("not this adapter")  # replaced whole
    res = invoke("merge", a, scored["b"], "--run", out, "--data", scored["mix"])
    assert res.exit_code == 0, res.output + res.stderr
    assert not (out / "reference" / "stale.txt").exists()
    assert (out / "reference" / "adapter_config.json").is_file()
    assert Store.open(out).meta["adapter"]["path"] == str((out / "reference").resolve())
