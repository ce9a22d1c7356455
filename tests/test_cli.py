"""The command line, as a user types it: tasks, import, select, report, and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tive.cli.commands import main


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + str(result.exception)
    return result


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err


def test_tasks_table_and_json(mixture_run):
    out = run("tasks", mixture_run["data"]).output
    assert "llava_instruct" in out and "inferred" in out and "36" in out
    counts = json.loads(run("tasks", mixture_run["data"], "--json").output)
    assert counts == {"llava_instruct": 12, "vqav2": 9, "gqa": 7, "sharegpt": 5, "vg": 3}


def test_tasks_check_images_counts_missing(mixture_run):
    (mixture_run["data"].parent / "gqa/gqa-0.png").unlink()
    out = run("tasks", mixture_run["data"], "--check-images").output
    assert "missing images" in out
    gqa = next(line for line in out.splitlines() if line.startswith("gqa"))
    assert gqa.split()[-1] == "1"


def test_select_writes_subset_report_and_chart_in_run(imported):
    res = run("select", "--run", imported["run"], "--budget", "0.25", "--seed", "4")
    subset = imported["run"] / "subset-tive-0.25.json"
    chosen = json.loads(subset.read_text())
    assert len(chosen) == 9
    originals = {r["id"]: r for r in imported["records"]}
    assert all(r == originals[r["id"]] for r in chosen)  # verbatim
    report = json.loads((imported["run"] / "subset-tive-0.25.report.json").read_text())
    assert set(report["tasks"]) == set(originals[r]["id"].rsplit("-", 1)[0] for r in originals)
    for entry in report["tasks"].values():
        assert set(entry) == {"records", "valid", "value", "excluded", "quota", "selected",
                              "unique"}
    assert sum(e["selected"] for e in report["tasks"].values()) == 9
    assert report["settings"]["seed"] == 4 and report["settings"]["temperature"] == 1000.0
    assert (imported["run"] / "subset-tive-0.25.png").read_bytes()[:4] == b"\x89PNG"
    assert "selected 9 of 36 records" in res.output


def test_select_options_reach_the_selection(imported, tmp_path):
    out = tmp_path / "top.json"
    run("select", "--run", imported["run"], "--budget", "12", "--strategy", "top",
        "--exclude-task", "vqav2", "--exclude-task", "vg", "--exclude-task", "vg",
        "--no-oversample", "-o", out)
    report = json.loads((tmp_path / "top.report.json").read_text())
    assert report["settings"] == {"budget": "12", "method": "tive", "strategy": "top",
                                  "temperature": None, "seed": None, "exclude": ["vqav2", "vg"],
                                  "oversample": False, "paper": False, "clusters": None,
                                  "quota": None, "task_value": "norm"}
    assert report["tasks"]["vqav2"]["selected"] == 0 and report["tasks"]["vg"]["excluded"]
    chosen = {r["id"] for r in json.loads(out.read_text())}
    # the same selection through the API: per-task top-k of instance values
    from tive import value_estimate
    r = value_estimate(store=imported["run"])
    want = r.select(budget=12, strategy="top", exclude=["vqav2", "vg"], oversample=False)
    assert chosen == {imported["records"][i]["id"] for i in want.indices}
    soft = r.select(budget=12, exclude=["vqav2", "vg"], seed=5)
    assert {imported["records"][i]["id"] for i in soft.indices} != chosen


@pytest.mark.parametrize("args, fragment", [
    (["--strategy", "top", "--temperature", "5"], "--temperature does not apply to --strategy top"),
    (["--strategy", "top", "--seed", "1"], "--seed does not apply to --strategy top"),
    (["--method", "gradnorm", "--seed", "1"], "--seed does not apply to --method gradnorm"),
    (["--method", "random", "--no-oversample"], "--oversample does not apply to --method random"),
    (["--method", "loss", "--strategy", "soft"], "--strategy does not apply to --method loss"),
    (["--method", "random", "--clusters", "3"], "--clusters does not apply to --method random"),
    (["--quota", "value"], "--quota does not apply to --method tive"),
    (["--method", "balanced", "--quota", "size"], "--quota does not apply to --method balanced"),
])
def test_options_a_method_does_not_use_are_refused(imported, args, fragment):
    res = run("select", "--run", imported["run"], "--budget", "5", *args, ok=False)
    assert_one_line_error(res, fragment)


def test_budget_text_names_outputs_so_count_and_fraction_do_not_collide(imported):
    run("select", "--run", imported["run"], "--budget", "1")
    run("select", "--run", imported["run"], "--budget", "100%", "--no-oversample")
    assert len(json.loads((imported["run"] / "subset-tive-1.json").read_text())) == 1
    assert len(json.loads((imported["run"] / "subset-tive-1.0.json").read_text())) == 36
    report = json.loads((imported["run"] / "subset-tive-1.0.report.json").read_text())
    assert report["budget_kind"] == "fraction" and report["budget"] == 36


def test_one_name_per_budget_and_a_small_count_says_it_is_not_a_percent(imported):
    from tive.selection.settings import Budget

    assert Budget.parse("15%").name == Budget.parse("0.15").name == "0.15"
    assert (Budget.parse("7.5%").name, Budget.parse(1).name) == ("0.075", "1")
    run("select", "--run", imported["run"], "--budget", "50%")
    out = run("select", "--run", imported["run"], "--budget", "0.5").output
    assert sorted(p.name for p in imported["run"].glob("subset-tive-*.json")) == \
        ["subset-tive-0.5.json", "subset-tive-0.5.manifest.json", "subset-tive-0.5.report.json"]
    assert "for 5 percent" not in out
    out = run("select", "--run", imported["run"], "--budget", "5").output
    assert "selected 5 of 36 records (5 distinct); 5 records, 14% of 36; for 5 percent write " \
           "5%" in out
    assert "percent" not in run("select", "--run", imported["run"], "--budget", "0.1").output


def test_report_lists_store_and_selections(imported):
    run("select", "--run", imported["run"], "--budget", "0.5", "--method", "random")
    out = run("report", "--run", imported["run"]).output
    assert "36 records" in out and "subset-random-0.5.report.json" in out
    table = json.loads(run("report", "--run", imported["run"], "--json").output)
    assert table["tasks"]["gqa"]["records"] == 7


@pytest.mark.parametrize("budget, fragment", [
    ("0", "must be positive"), ("-2", "must be positive"), ("1.2", "a fraction is below 1"),
    ("37", "more than the 36 records")])
def test_select_bad_budget_is_one_line(imported, budget, fragment):
    res = run("select", "--run", imported["run"], "--budget", budget, ok=False)
    assert_one_line_error(res, fragment, "--budget")
    assert not list(imported["run"].glob("subset-*"))


def test_select_unknown_exclude_task_is_one_line(imported):
    res = run("select", "--run", imported["run"], "--budget", "0.1", "--exclude-task", "coco",
              ok=False)
    assert_one_line_error(res, "--exclude-task 'coco'", "llava_instruct")


def test_select_without_store_is_one_line(tmp_path):
    res = run("select", "--run", tmp_path, "--budget", "0.1", ok=False)
    assert_one_line_error(res, "no feature store here", "tive score")


def test_missing_images_error_lists_them_or_skip_counts_them(mixture_run):
    d = mixture_run["dir"]
    shutil.rmtree(mixture_run["data"].parent / "gqa")
    args = ["import", "--data", mixture_run["data"], "--features", d / "features.npy",
            "--norms", d / "norms.npy", "--run", mixture_run["run"]]
    assert_one_line_error(run(*args, ok=False), "7 records reference images",
                          "record 21 (id gqa-0): gqa/gqa-0.png", "--skip-missing-images")
    assert not mixture_run["run"].exists()
    assert "7 with missing images left out" in run(*args, "--skip-missing-images").output
    run("select", "--run", mixture_run["run"], "--budget", "20", "--no-oversample")
    report = json.loads((mixture_run["run"] / "subset-tive-20.report.json").read_text())
    assert report["left_out"] == {"missing-image": 7} and report["tasks"]["gqa"]["selected"] == 0


def test_invalid_json_is_one_line_with_line_number(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n {"id": "a", "conversations": []},\n {"id": oops}\n]')
    assert_one_line_error(run("tasks", bad, ok=False), f"{bad}:3:")


def test_store_mismatch_is_one_line(imported, tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps(imported["records"][::-1]))
    res = run("select", "--run", imported["run"], "--data", other, "--budget", "0.1", ok=False)
    assert_one_line_error(res, "fingerprint", "fix:")


def test_import_authors_outputs(mixture_run):
    feats, norms = mixture_run["features"], mixture_run["norms"]
    out = mixture_run["dir"] / "authors"
    out.mkdir()
    for c, (a, b) in enumerate([(0, 18), (18, 36)]):
        torch.save([torch.from_numpy(feats[a:b]).half()], out / f"output_{c}")
        (out / f"output_norm_{c}.json").write_text(json.dumps(norms[a:b].tolist()))
    run("import", "--data", mixture_run["data"], "--tive-outputs", out, "--run",
        mixture_run["run"])
    stored = np.load(mixture_run["run"] / "store/features.npy")
    np.testing.assert_array_equal(stored, feats.astype(np.float16))


def test_import_needs_one_source(mixture_run):
    res = run("import", "--data", mixture_run["data"], ok=False)
    assert res.exit_code == 2 and "--tive-outputs" in res.output


def test_console_script_runs_from_a_fresh_shell(imported):
    exe = Path(sys.executable).with_name("tive")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    res = subprocess.run([str(exe), "select", "--budget", "0.15"], cwd=imported["run"].parent,
                         env=env, capture_output=True, text=True, timeout=120,
                         input="")
    # default --run is ./tive-out, which does not exist in that folder: a one-line error
    assert res.returncode == 2 and res.stderr.startswith("error: ") and \
        len(res.stderr.strip().splitlines()) == 1
    imported["run"].rename(imported["run"].parent / "tive-out")
    res = subprocess.run([str(exe), "select", "--budget", "0.15"], cwd=imported["run"].parent,
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (imported["run"].parent / "tive-out/subset-tive-0.15.json").exists()


def test_report_and_select_agree_on_task_values_when_features_are_not_finite(mixture_run):
    d = mixture_run["dir"]
    feats, norms = mixture_run["features"].copy(), mixture_run["norms"].copy()
    feats[30:, 0], norms[30:] = np.nan, 100.0  # sharegpt rows 30-32, every vg row
    np.save(d / "f.npy", feats.astype(np.float32))
    np.save(d / "n.npy", norms)
    run("import", "--data", mixture_run["data"], "--features", d / "f.npy", "--norms",
        d / "n.npy", "--run", mixture_run["run"])
    run("select", "--run", mixture_run["run"], "--budget", "10")
    selected = json.loads((mixture_run["run"] / "subset-tive-10.report.json").read_text())
    res = run("report", "--run", mixture_run["run"], "--json")
    shown = json.loads(res.stdout)  # the health checks' warnings go to stderr
    assert "warning: features: 6 records have NaN or Inf features" in res.stderr
    assert shown["left_out"] == selected["left_out"] == {"non-finite-feature": 6}
    for task, entry in shown["tasks"].items():
        assert entry["value"] == selected["tasks"][task]["value"]
    assert shown["tasks"]["vg"]["value"] is None and shown["tasks"]["vg"]["valid"] == 0
    assert shown["tasks"]["sharegpt"]["value"] == pytest.approx(norms[28:30].mean())


@pytest.mark.parametrize("kind", ["parquet", "hf-disk"])
def test_select_on_dataset_inputs_writes_the_same_format_with_clean_names(mixture_run, kind):
    import datasets

    ds = datasets.Dataset.from_list(mixture_run["records"])
    src = mixture_run["dir"] / ("mix.parquet" if kind == "parquet" else "mix_ds")
    ds.to_parquet(str(src)) if kind == "parquet" else ds.save_to_disk(str(src))
    (src.parent / "coco").symlink_to(mixture_run["data"].parent / "coco")
    for folder in ("gqa", "vg"):
        (src.parent / folder).symlink_to(mixture_run["data"].parent / folder)
    d = mixture_run["dir"]
    run("import", "--data", src, "--features", d / "features.npy", "--norms", d / "norms.npy",
        "--run", mixture_run["run"], "--image-root", src.parent)  # a folder's default: itself
    res = run("select", "--run", mixture_run["run"], "--budget", "0.25")
    assert "Creating parquet" not in res.stderr and "Saving the dataset" not in res.stderr
    out = mixture_run["run"] / ("subset-tive-0.25.parquet" if kind == "parquet"
                                else "subset-tive-0.25")
    back = (datasets.Dataset.from_parquet(str(out)) if kind == "parquet"
            else datasets.load_from_disk(str(out)))
    assert len(back) == 9 and back.features == ds.features
    assert (mixture_run["run"] / "subset-tive-0.25.report.json").exists()
    assert (mixture_run["run"] / "subset-tive-0.25.png").exists()


def test_tasks_json_with_image_check_is_refused(mixture_run):
    res = run("tasks", mixture_run["data"], "--json", "--check-images", ok=False)
    assert res.exit_code == 2 and "leave out --check-images" in res.output


def test_unwritable_output_paths_are_one_line_errors(imported, tmp_path):
    (tmp_path / "adir").mkdir()
    res = run("select", "--run", imported["run"], "--budget", "5", "-o", tmp_path / "adir",
              ok=False)
    assert_one_line_error(res, "is a folder")
    (tmp_path / "afile").write_text("x")
    res = run("select", "--run", imported["run"], "--budget", "5", "-o",
              tmp_path / "afile" / "x.json", ok=False)
    assert_one_line_error(res, "cannot write there")
