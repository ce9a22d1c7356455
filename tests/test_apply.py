"""Manifests and `tive apply`: a selection rebuilt from its manifest and the mixture alone
(docs/design.md, "Manifests")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tive.cli.commands import main
from tive.output.manifest import manifest_path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def selected(imported) -> dict:
    res = run("select", "--run", imported["run"], "--budget", "0.5", "--seed", "3")
    assert res.exit_code == 0, res.output + res.stderr
    subset = imported["run"] / "subset-tive-0.5.json"
    assert "manifest: " in res.output
    return {**imported, "subset": subset, "manifest": manifest_path(subset)}


def test_a_selection_writes_its_manifest(selected):
    m = json.loads(selected["manifest"].read_text())
    subset = json.loads(selected["subset"].read_text())
    assert [r["id"] for r in m["records"]] == [r["id"] for r in subset] and subset
    ids = [r["id"] for r in selected["records"]]
    assert all(ids[r["position"]] == r["id"] and len(r["key"]) == 32 for r in m["records"])
    assert all(isinstance(r["value"], float) for r in m["records"])
    assert m["settings"]["budget"] == "0.5" and m["settings"]["seed"] == 3
    assert m["data"]["records"] == len(ids) and len(m["data"]["fingerprint"]) == 32
    assert m["store"]["path"].endswith("store") and m["versions"]["numpy"]
    assert m["subset"]["records"] == len(subset) and len(m["subset"]["sha256"]) == 64


def test_apply_rebuilds_the_subset_byte_for_byte_from_any_order(selected, tmp_path):
    out = tmp_path / "again.json"
    res = run("apply", selected["manifest"], "--data", selected["data"], "-o", out)
    assert res.exit_code == 0, res.output + res.stderr
    assert out.read_bytes() == selected["subset"].read_bytes()
    # the records reordered, with others added, beside the same images: the same subset
    records = selected["records"][::-1] + [{"id": "extra", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    other = selected["data"].parent / "other.json"
    other.write_text(json.dumps(records))
    out2 = tmp_path / "from-other.json"
    res = run("apply", selected["manifest"], "--data", other, "-o", out2)
    assert res.exit_code == 0, res.output + res.stderr
    assert out2.read_bytes() == selected["subset"].read_bytes()


def test_apply_names_the_records_a_mixture_lacks_and_writes_nothing(selected, tmp_path):
    m = json.loads(selected["manifest"].read_text())
    gone = {m["records"][0]["id"], m["records"][-1]["id"]}
    records = [r for r in selected["records"] if r["id"] not in gone]
    path = selected["data"].parent / "lacking.json"
    path.write_text(json.dumps(records))
    out = tmp_path / "x.json"
    res = run("apply", selected["manifest"], "--data", path, "-o", out)
    assert res.exit_code == 2 and not out.exists()
    assert "records are not in this mixture" in res.stderr and "nothing was written" in res.stderr
    assert all(i in res.stderr for i in gone) and len(res.stderr.strip().splitlines()) == 1
    # an image replaced by other bytes is another record
    chosen = next(r for r in m["records"] if "image" in selected["records"][r["position"]])
    image = selected["data"].parent / selected["records"][chosen["position"]]["image"]
    image.write_bytes(b"other bytes")
    res = run("apply", selected["manifest"], "--data", selected["data"], "-o", out)
    assert res.exit_code == 2 and chosen["id"] in res.stderr and not out.exists()


def test_check_compares_a_subset_with_its_manifest(selected, tmp_path):
    res = run("apply", "--check", selected["subset"])
    assert res.exit_code == 0 and "byte for byte" in res.output, res.output + res.stderr
    records = json.loads(selected["subset"].read_text())
    reformatted = tmp_path / "subset-tive-0.5.json"
    reformatted.write_text(json.dumps(records, indent=4))
    res = run("apply", selected["manifest"], "--check", reformatted)
    assert res.exit_code == 0 and "the same" in res.output and "other bytes" in res.output
    reformatted.write_text(json.dumps(records[1:]))
    res = run("apply", selected["manifest"], "--check", reformatted)
    assert res.exit_code == 2 and "missing" in res.stderr and records[0]["id"] in res.stderr
    reformatted.write_text(json.dumps(records[::-1]))
    res = run("apply", selected["manifest"], "--check", reformatted)
    assert res.exit_code == 2 and "another order" in res.stderr
    res = run("apply", "--check", reformatted)  # no manifest beside it
    assert res.exit_code == 2 and "no such manifest" in res.stderr
    res = run("apply", selected["manifest"], "--data", selected["data"])
    assert res.exit_code == 2 and "-o SUBSET" in res.output + res.stderr


def test_a_fifo_or_a_manifest_without_its_subset_is_one_error(tmp_path):
    import os

    from tive.errors import DataError
    from tive.output.apply import read_manifest

    fifo = tmp_path / "m.manifest.json"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="is a FIFO"):
        read_manifest(fifo)  # never waits for a writer
    bare = tmp_path / "bare.manifest.json"
    bare.write_text(json.dumps({"manifest_version": 1, "record_key_version": 1, "records": []}))
    with pytest.raises(DataError, match="not a manifest"):
        read_manifest(bare)
