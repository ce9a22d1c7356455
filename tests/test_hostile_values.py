"""Hostile values: each case of the fault campaign that used to end in a traceback, a silent
wrong result, a hang or an unclear message, now one clean error (naming what, where and the
fix) or a correct result.

CLI cases run through click's runner (a traceback shows as an exception that is not
``SystemExit``); API cases assert a :class:`~tive.errors.TiveError` or the result the same
input gives on the command line.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import llava_records, task_features, write_mixture
from test_hostile_outputs import no_hang, one_line_error

import tive
from tive.cli.commands import main
from tive.errors import TiveError


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def clean(res):
    """Exit 0, or one clean error line (exit 2): never a traceback."""
    if res.exit_code != 0:
        one_line_error(res)
    return res


def import_run(d, features=None, norms=None, run=None, *extra):
    return invoke("import", "--data", d["data"], "--features", features or d["dir"] / "features.npy",
                  "--norms", norms or d["dir"] / "norms.npy", "--run", run or d["run"], *extra)


# --- text, ids and tasks ------------------------------------------------------------------------

def _surrogate_mixture(tmp_path, field):
    records = llava_records()
    if field == "text":
        records[0]["conversations"][1]["value"] = "bad \ud800 answer"
    elif field == "id":
        records[0]["id"] = "id-\udfff"
    else:
        for r in records[:4]:
            r["task"] = "t\ud800"
        for r in records[4:]:
            r["task"] = "plain"
    data = write_mixture(tmp_path / "data", [])
    data.write_text(json.dumps(records), encoding="utf-8")  # ensure_ascii: \ud800 escapes
    for r in records:
        if "image" in r:
            (tmp_path / "data" / r["image"]).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "data" / r["image"]).write_bytes(b"\x89PNG")
    feats, norms = task_features([str(i % 3) for i in range(len(records))])
    np.save(tmp_path / "f.npy", feats)
    np.save(tmp_path / "n.npy", norms)
    return data


@pytest.mark.parametrize("field", ["text", "id", "task"])
def test_a_lone_surrogate_anywhere_gives_a_selection(tmp_path, field):
    data = _surrogate_mixture(tmp_path, field)
    assert invoke("tasks", data).exit_code == 0
    run = tmp_path / "run"
    res = invoke("import", "--data", data, "--features", tmp_path / "f.npy", "--norms",
                 tmp_path / "n.npy", "--run", run)
    assert res.exit_code == 0, (res.output, res.exception)
    res = invoke("select", "--run", run, "--budget", "0.5")
    assert res.exit_code == 0, (res.output, res.exception)
    subset = json.loads((run / "subset-tive-0.5.json").read_text(encoding="utf-8"))
    report = json.loads((run / "subset-tive-0.5.report.json").read_text(encoding="utf-8"))
    assert subset and report["selected"] == len(subset)
    assert invoke("report", "--run", run).exit_code == 0
    res = invoke("report", "--run", run, "--html", "-o", tmp_path / "p.html")
    assert res.exit_code == 0, (res.output, res.exception)


def test_huge_integers_in_the_data_are_one_line(tmp_path):
    records = llava_records()
    data = write_mixture(tmp_path / "data", records)
    text = data.read_text()
    data.write_text(text.replace('"id": "vg-0"', '"id": "vg-0", "n": ' + "9" * 5000, 1))
    clean(invoke("tasks", data))


def test_an_image_name_over_255_bytes_is_one_line(mixture_run):
    records = json.loads(mixture_run["data"].read_text())
    records[0]["image"] = "coco/" + "x" * 300 + ".png"
    mixture_run["data"].write_text(json.dumps(records))
    one_line_error(import_run(mixture_run), "fix:")
    clean(invoke("tasks", mixture_run["data"], "--check-images"))


# --- arrays and ids given to tive import ----------------------------------------------------------

def test_float64_features_too_large_for_the_store_are_refused_not_stored_as_inf(mixture_run):
    feats = np.array(mixture_run["features"], dtype=np.float64)
    feats[3] *= 1e200
    np.save(mixture_run["dir"] / "big.npy", feats)
    one_line_error(import_run(mixture_run, mixture_run["dir"] / "big.npy"), "row 3",
                   "float32")
    res = import_run(mixture_run, mixture_run["dir"] / "big.npy", None, None,
                     "--feature-dtype", "float32")
    one_line_error(res, "row 3")


def test_norms_of_1e308_give_a_selection_or_one_line(mixture_run):
    norms = np.array(mixture_run["norms"])
    norms[:] = 1e308
    np.save(mixture_run["dir"] / "huge.npy", norms)
    assert import_run(mixture_run, None, mixture_run["dir"] / "huge.npy").exit_code == 0
    res = clean(invoke("select", "--run", mixture_run["run"], "--budget", "0.5"))
    if res.exit_code == 0:
        assert "selected 18 of 36" in res.output


def test_token_counts_too_large_name_the_value(mixture_run):
    np.save(mixture_run["dir"] / "t.npy", np.full(36, 1e30))
    res = import_run(mixture_run, None, None, None, "--ntokens", mixture_run["dir"] / "t.npy")
    one_line_error(res, "--ntokens", "1e+30")


def test_ids_nested_deep_are_one_line(mixture_run):
    path = mixture_run["dir"] / "ids.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    one_line_error(import_run(mixture_run, None, None, None, "--ids", path), "--ids")


def _authors(folder, chunks):
    import torch

    folder.mkdir()
    for c, block in enumerate(chunks):
        torch.save([torch.tensor(block, dtype=torch.float32)], folder / f"output_{c}")
        (folder / f"output_norm_{c}.json").write_text(json.dumps([1.0] * len(block)))


@pytest.mark.parametrize("case", ["nested", "not-utf8", "folder", "other-k", "garbage"])
def test_damaged_authors_outputs_are_one_line(mixture_run, case):
    folder = mixture_run["dir"] / "authors"
    _authors(folder, [np.ones((20, 8)), np.ones((16, 8 if case != "other-k" else 6))])
    norm = folder / "output_norm_1.json"
    if case == "nested":
        norm.write_text("[" * 100_000 + "]" * 100_000)
    elif case == "not-utf8":
        norm.write_bytes(b"[1.0, \xff\xfe]")
    elif case == "folder":
        norm.unlink()
        norm.mkdir()
    elif case == "garbage":
        (folder / "output_1").write_bytes(os.urandom(300))
    res = invoke("import", "--data", mixture_run["data"], "--tive-outputs", folder, "--run",
                 mixture_run["run"])
    err = one_line_error(res)
    assert "weights_only" not in err


def test_a_fifo_given_as_features_does_not_hang(mixture_run):
    os.mkfifo(mixture_run["dir"] / "fifo.npy")
    with no_hang():
        res = import_run(mixture_run, mixture_run["dir"] / "fifo.npy")
    one_line_error(res, "--features", "FIFO")


def test_a_fifo_given_as_an_image_does_not_hang(imported):
    image = next((imported["dir"] / "data" / "coco").iterdir())
    image.unlink()
    os.mkfifo(image)
    with no_hang():
        clean(invoke("select", "--run", imported["run"], "--budget", "0.5"))
        clean(invoke("report", "--run", imported["run"], "--html"))
        clean(invoke("tasks", imported["data"], "--check-images"))


# --- damaged store values -------------------------------------------------------------------------

def test_negative_norms_in_a_store_are_not_task_values(imported):
    path = imported["run"] / "store" / "norms.npy"
    norms = np.load(path)
    norms[:5] = -1.0
    np.save(path, norms)
    res = invoke("report", "--run", imported["run"], "--json")
    if res.exit_code == 0:
        values = [t["value"] for t in json.loads(res.output)["tasks"].values()]
        assert all(v is None or v >= 0 for v in values)
    else:
        one_line_error(res, "norms.npy", "fix:")


def test_unknown_skip_codes_are_not_counted_as_scored(imported):
    path = imported["run"] / "store" / "skipped.npy"
    codes = np.load(path)
    codes[:3] = 99
    np.save(path, codes)
    res = invoke("select", "--run", imported["run"], "--budget", "0.5")
    if res.exit_code == 0:
        assert "3 left out" in res.output
    else:
        one_line_error(res, "skipped.npy", "fix:")


@pytest.mark.parametrize("settings", [[1, 2], "a string", {"image_root": 3},
                                      {"task_field": ["x"]}])
def test_meta_settings_of_the_wrong_type_are_one_line(imported, settings):
    path = imported["run"] / "store" / "meta.json"
    meta = json.loads(path.read_text())
    meta["settings"] = settings
    path.write_text(json.dumps(meta))
    one_line_error(invoke("select", "--run", imported["run"], "--budget", "0.5"), "meta.json",
                   "settings")


def test_a_non_utf8_index_is_one_line(imported):
    path = imported["run"] / "store" / "index.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"\xff" + lines[0][1:] + b"".join(lines[1:]))
    one_line_error(invoke("report", "--run", imported["run"]), "index.jsonl", "line 1")


def test_an_empty_mixture_cache_is_recomputed_and_said(imported):
    assert invoke("select", "--run", imported["run"], "--budget", "0.5").exit_code == 0
    want = (imported["run"] / "subset-tive-0.5.json").read_bytes()
    for cache in (imported["run"] / "cache").glob("*.npz"):
        cache.write_bytes(b"")
    res = invoke("select", "--run", imported["run"], "--budget", "0.5")
    assert res.exit_code == 0, res.output
    assert "damaged cache" in res.stderr and "Aborted" not in res.output
    assert (imported["run"] / "subset-tive-0.5.json").read_bytes() == want


@pytest.mark.parametrize("how", ["truncate", "bitflip", "out-of-range", "extra-key"])
def test_a_damaged_cache_is_recomputed_and_said(imported, how):
    from tive.util.sealed import read_sealed, write_sealed

    run = imported["run"]
    args = ("select", "--run", run, "--budget", "0.5", "--method", "kmeans", "--clusters", "2")
    assert invoke(*args).exit_code == 0
    want = (run / "subset-kmeans-0.5.json").read_bytes()
    for cache in (run / "cache").glob("*.npz"):
        body = cache.read_bytes()
        if how == "truncate":
            cache.write_bytes(body[: len(body) // 2])
        elif how == "bitflip":
            cache.write_bytes(body[:200] + bytes([body[200] ^ 1]) + body[201:])
        else:  # edited and sealed again: caught by the schema, not the seal
            arrays, _ = read_sealed(cache)
            if how == "extra-key":
                arrays["extra"] = np.zeros(1)
            else:
                name = "codes" if "codes" in arrays else next(iter(arrays))
                arrays[name] = arrays[name] + 10**6 if arrays[name].dtype.kind in "iu" else \
                    arrays[name][:1]
            cache.unlink()
            write_sealed(cache, arrays)
    res = invoke(*args)
    assert res.exit_code == 0, (res.output, res.exception)
    assert "damaged cache" in res.stderr
    assert (run / "subset-kmeans-0.5.json").read_bytes() == want


# --- the Python API: one validation with the CLI --------------------------------------------------

@pytest.fixture
def arrays(mixture_run):
    return mixture_run["features"], mixture_run["norms"], mixture_run["tasks"]


@pytest.mark.parametrize("budget", [np.float64(0.25), np.float32(0.25), np.int64(9),
                                    *np.linspace(0.1, 0.5, 3)])
def test_numpy_scalar_budgets_are_numbers(arrays, budget):
    f, n, t = arrays
    r = tive.value_estimate(features=f, norms=n, tasks=t)
    plain = budget.item()
    assert np.array_equal(r.select(budget).indices, r.select(plain).indices)


def test_numpy_scalar_seeds_and_temperatures_are_numbers(arrays):
    f, n, t = arrays
    r = tive.value_estimate(features=f, norms=n, tasks=t)
    assert np.array_equal(r.select(0.5, seed=np.int64(3), temperature=np.float32(10)).indices,
                          r.select(0.5, seed=3, temperature=10.0).indices)


@pytest.mark.parametrize("change", [
    {"features": "complex"}, {"ntokens": "fractional"}, {"ntokens": "negative"},
    {"features": "strings"}, {"norms": "ragged"}, {"norms": "negative"}, {"loss": "complex"},
    {"features": "1d"},
])
def test_bad_api_arrays_are_tive_errors(arrays, change):
    f, n, t = arrays
    kw = {"features": f, "norms": n, "tasks": t}
    (what, how), = change.items()
    kw[what] = {
        "complex": lambda: (f if what == "features" else n) * (1 + 1j),
        "fractional": lambda: np.full(len(n), 2.5),
        "negative": lambda: -np.ones(len(n)),
        "strings": lambda: np.full(f.shape, "x"),
        "ragged": lambda: [1.0, [2.0, 3.0]],
        "1d": lambda: f[:, 0],
    }[how]()
    with pytest.raises(TiveError):
        tive.value_estimate(**kw)


@pytest.mark.parametrize("options", [{"temperature": "hot"}, {"seed": 1.5}, {"seed": "x"},
                                     {"exclude": [1]}, {"budget": "lots"}, {"budget": None},
                                     {"method": 3}, {"clusters": 2.5, "method": "kmeans"}])
def test_bad_api_options_are_tive_errors(arrays, options):
    f, n, t = arrays
    r = tive.value_estimate(features=f, norms=n, tasks=t)
    options = {"budget": 0.5, **options}
    with pytest.raises(TiveError):
        r.select(**options)


def test_exclude_as_one_string_is_one_task(arrays):
    f, n, t = arrays
    r = tive.value_estimate(features=f, norms=n, tasks=t)
    assert np.array_equal(r.select(0.5, exclude="vg").indices,
                          r.select(0.5, exclude=["vg"]).indices)
    with pytest.raises(TiveError, match="ab"):
        r.select(0.5, exclude="ab")  # not tasks "a" and "b"


def test_wrong_types_for_value_estimate_are_tive_errors(arrays):
    f, n, t = arrays
    for kw in ({"features": f, "norms": n, "tasks": 5}, {"store": 5},
               {"features": f, "norms": n, "tasks": t, "chunk_rows": "x"},
               {"features": object(), "norms": n, "tasks": t}):
        with pytest.raises(TiveError):
            tive.value_estimate(**kw)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_a_full_disk_while_the_adapter_is_saved_is_one_error(tmp_path):
    from safetensors import SafetensorError

    from tive.errors import OutputError
    from tive.warmup.reference import save_reference

    class Model:
        def save_pretrained(self, folder):
            (tmp_path / "half").write_bytes(b"x")
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                                  "StorageFull, message: \"No space left on device\" })")

    with pytest.raises(OutputError, match="saving the adapter failed.*No space left.*fix:"):
        save_reference(tmp_path / "run", Model(), {})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no temporary left


def test_paper_names_the_flag_the_user_wrote(tmp_path):
    from tive.settings import cli_names
    from tive.warmup.settings import WarmupConfig

    with cli_names(), pytest.raises(TiveError, match=r"^--lora-r 4: --paper trains"):
        WarmupConfig(paper=True, r=4)


def test_hand_edited_labels_in_the_index_are_not_trusted(imported):
    path = imported["run"] / "store" / "index.jsonl"
    path.write_text(path.read_text().replace('"task": "vg"', '"task": "renamed"'))
    one_line_error(invoke("report", "--run", imported["run"]), "index.jsonl", "changed since",
                   "fix:")


def test_a_store_without_its_data_path_asks_for_data(imported):
    path = imported["run"] / "store" / "meta.json"
    meta = json.loads(path.read_text())
    meta["data"]["path"] = None
    path.write_text(json.dumps(meta))
    one_line_error(invoke("select", "--run", imported["run"], "--budget", "0.5"), "data.path",
                   "--data")
    res = invoke("select", "--run", imported["run"], "--budget", "0.5", "--data",
                 imported["data"])
    assert res.exit_code == 0, res.output
