"""Health checks (`tive check`, and the same checks inside `tive select` and `tive report`):
each condition flagged on a store built to have it, silence on a healthy one, `--strict`, and
`--stability`'s Jaccard overlaps against sets counted by hand."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import llava_records, task_features, write_mixture

import tive
from tive.cli.commands import main
from tive.health.findings import HealthError
from tive.health.stability import chance_overlap, jaccard
from tive.health.value_checks import COLLAPSE, mean_pairwise_cosines
from tive.store.format import Store


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def build(tmp_path: Path, records=None, edit=None) -> dict:
    """A store imported from synthetic features (``edit(features, norms, tasks)`` changes
    them first); returns its paths."""
    records = records if records is not None else llava_records()
    data = write_mixture(tmp_path / "data", records)
    tasks = [r["id"].rsplit("-", 1)[0] for r in records]
    features, norms = task_features(tasks)
    if edit is not None:
        edit(features, norms, np.array(tasks))
    np.save(tmp_path / "features.npy", features.astype(np.float32))
    np.save(tmp_path / "norms.npy", norms)
    res = run("import", "--data", data, "--features", tmp_path / "features.npy", "--norms",
              tmp_path / "norms.npy", "--run", tmp_path / "run")
    assert res.exit_code == 0, res.output
    return {"data": data, "run": tmp_path / "run", "records": records, "tasks": tasks}


def edit_meta(run_dir: Path, change) -> None:
    path = run_dir / "store" / "meta.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def lines(output: str, kind: str = "warning") -> list[str]:
    return [line for line in output.splitlines() if line.startswith(f"{kind}: ")]


def check_lines(run_dir: Path, kind: str = "warning") -> list[str]:
    res = run("check", "--run", run_dir)
    assert res.exit_code == 0, res.output
    return lines(res.output, kind)


def test_a_healthy_store_is_silent_in_check_select_and_report(tmp_path):
    s = build(tmp_path)
    res = run("check", "--run", s["run"])
    assert res.exit_code == 0 and res.output.strip().endswith("no problem found")
    assert run("check", "--run", s["run"], "--strict").exit_code == 0
    for args in (("select", "--budget", "0.3"), ("report",), ("report", "--json")):
        res = run(*args, "--run", s["run"], "--strict")
        assert res.exit_code == 0, res.output
        assert not re.search(r"^(warning|note|error): ", res.output, re.M), res.output
    assert tive.check(s["run"]) == [] and tive.check(s["run"], strict=True) == []


def test_each_finding_is_one_line_with_its_fix(tmp_path):
    s = build(tmp_path, edit=lambda f, n, t: f.__setitem__(3, 0))
    res = run("check", "--run", s["run"])
    found = lines(res.output)
    assert len(found) == 1 and all("; fix: " in line for line in found)
    assert res.output.strip().endswith("store: 1 warning, 0 notes")


def test_zero_and_non_finite_feature_rows_are_flagged(tmp_path):
    def edit(features, norms, tasks):
        features[[4, 20]] = 0
        features[7, 2] = np.nan
        norms[9] = np.inf

    s = build(tmp_path, edit=edit)
    found = check_lines(s["run"])
    zero = [x for x in found if "zero feature row" in x]
    assert len(zero) == 1 and "2 of 34 valid records" in zero[0]
    assert "first: row 4, id 'llava_instruct-4'" in zero[0]
    assert any("1 records have NaN or Inf features" in x for x in found)
    assert any("1 records have NaN or Inf exact gradient norms" in x for x in found)


def test_a_zero_gradient_norm_is_flagged_even_with_a_feature(tmp_path):
    s = build(tmp_path, edit=lambda f, n, t: n.__setitem__(5, 0.0))
    assert any("1 of 36 valid records have a zero feature row or gradient norm" in x
               for x in check_lines(s["run"]))


def test_mean_pairwise_cosine_from_instance_values_equals_the_pairs_counted():
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(40, 6)) + np.array([2.0, 0, 0, 0, 0, 0])
    feats[[3, 17]] = 0  # zero rows: cosine 0 with everything, themselves included
    codes = rng.integers(0, 3, size=40)
    valid = np.ones(40, dtype=bool)
    valid[[5, 30]] = False
    unit = np.where(np.linalg.norm(feats, axis=1, keepdims=True) > 0,
                    feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-300), 0)
    values = np.full(40, np.nan)
    for t in range(3):
        rows = np.flatnonzero(valid & (codes == t))
        values[rows] = unit[rows] @ unit[rows].mean(axis=0)
    got = mean_pairwise_cosines(values, codes, 3, valid, np.any(feats != 0, axis=1))
    for t in range(3):
        rows = np.flatnonzero(valid & (codes == t))
        pairs = [unit[i] @ unit[j] for i, j in itertools.permutations(rows, 2)]
        assert got[t] == pytest.approx(np.mean(pairs), abs=1e-12)


def test_a_collapsed_task_is_flagged(tmp_path):
    def edit(features, norms, tasks):
        rows = np.flatnonzero(tasks == "gqa")
        features[rows] = features[rows[0]] + 1e-3 * np.random.default_rng(0).normal(
            size=(len(rows), features.shape[1]))

    s = build(tmp_path, edit=edit)
    found = [x for x in check_lines(s["run"]) if x.startswith("warning: collapse:")]
    assert len(found) == 1 and "task 'gqa': its 7 records" in found[0]
    assert float(re.search(r"cosine (\S+) ", found[0]).group(1)) >= COLLAPSE


def test_an_outlier_task_value_asks_whether_it_is_learnable(tmp_path):
    s = build(tmp_path, edit=lambda f, n, t: n.__setitem__(t == "vg", n[t == "vg"] * 20))
    found = [x for x in check_lines(s["run"]) if x.startswith("warning: task-value:")]
    assert len(found) == 1 and "task 'vg'" in found[0] and "is it learnable?" in found[0]
    res = run("select", "--run", s["run"], "--budget", "0.2")
    assert res.exit_code == 0
    assert any("task 'vg'" in x and "takes" in x for x in lines(res.output))


def test_quotas_larger_than_their_task_are_flagged_in_select_and_after(tmp_path):
    s = build(tmp_path, edit=lambda f, n, t: n.__setitem__(t == "vg", n[t == "vg"] * 20))
    res = run("select", "--run", s["run"], "--budget", "0.5")
    assert res.exit_code == 0
    quota = [x for x in lines(res.output) if x.startswith("warning: quota:")]
    assert len(quota) == 1 and "task 'vg': quota" in quota[0] and "3 valid records" in quota[0]
    later = [x for x in check_lines(s["run"]) if x.startswith("warning: quota:")]
    assert len(later) == 1 and "subset-tive-0.5.report.json: task 'vg'" in later[0]
    res = run("select", "--run", s["run"], "--budget", "0.5", "--no-oversample")
    assert not [x for x in lines(res.output) if x.startswith("warning: quota:")]


def test_task_labels_made_from_image_folders_are_flagged(tmp_path):
    records = llava_records()
    for r in records[:10]:
        if "image" in r:
            r["image"] = r["image"].replace("coco/", "charts/")
    s = build(tmp_path, records=records)
    found = [x for x in check_lines(s["run"]) if x.startswith("warning: tasks:")]
    assert len(found) == 1 and "charts (10)" in found[0] and "--task-field" in found[0]
    res = run("select", "--run", s["run"], "--budget", "0.3")
    assert any(x.startswith("warning: tasks:") for x in lines(res.output))
    # the same records with a task field: nothing inferred, nothing said
    for r in records:
        r["task"] = r["id"].rsplit("-", 1)[0]
    s = build(tmp_path / "field", records=records)
    assert not [x for x in check_lines(s["run"]) if x.startswith("warning: tasks:")]


def test_a_store_whose_records_no_longer_match_the_data_is_flagged(tmp_path):
    s = build(tmp_path)
    records = json.loads(s["data"].read_text())
    records[5]["conversations"][1]["value"] = "edited"
    s["data"].write_text(json.dumps(records))
    found = [x for x in check_lines(s["run"]) if x.startswith("warning: data:")]
    assert len(found) == 1
    assert "1 of the store's 36 records no longer match it (first: row 5" in found[0]
    s["data"].unlink()
    assert any(x.startswith("note: data:") and "is gone" in x
               for x in check_lines(s["run"], "note"))


def _adapter(folder: Path, b_value: float) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"m.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 8),
               "m.layers.0.self_attn.q_proj.lora_B.weight": torch.full((8, 4), b_value)},
              str(folder / "adapter_model.safetensors"))
    (folder / "reference.json").write_text(json.dumps({"recipe": {"steps": 1}}))
    return folder


def test_an_untrained_reference_is_flagged_with_its_steps(tmp_path):
    s = build(tmp_path)
    adapter = _adapter(tmp_path / "reference", 0.0)
    edit_meta(s["run"], lambda m: m.update(adapter={"path": str(adapter)}))
    found = [x for x in check_lines(s["run"]) if x.startswith("warning: reference:")]
    assert len(found) == 1 and "every LoRA B matrix is 0 (1 optimizer step recorded" in found[0]
    trained = _adapter(tmp_path / "trained", 1e-6)
    edit_meta(s["run"], lambda m: m.update(adapter={"path": str(trained)}))
    assert check_lines(s["run"]) == []


def test_key_parameters_not_hooked_are_flagged_by_modules_and_parameters(tmp_path):
    s = build(tmp_path)
    coverage = {"expected": {"modules": 8, "parameters": 2048},
                "hooked": {"modules": 6, "parameters": 1024}, "missing": ["a.q", "a.k"],
                "key_layers": None}
    edit_meta(s["run"], lambda m: m.update(source="tive score",
                                           key_parameters={"coverage": coverage}))
    found = [x for x in check_lines(s["run"]) if x.startswith("warning: coverage:")]
    assert len(found) == 1
    assert "6 of 8 attention projections hooked (75% of the modules, 50% of the key " \
           "parameters); not hooked: a.q, a.k" in found[0]
    edit_meta(s["run"], lambda m: m["key_parameters"]["coverage"].update(key_layers="last:1"))
    assert check_lines(s["run"]) == []
    assert any("--key-layers last:1" in x for x in check_lines(s["run"], "note"))
    edit_meta(s["run"], lambda m: m["key_parameters"].pop("coverage"))
    assert any("coverage cannot be checked" in x for x in check_lines(s["run"], "note"))
    for args in (("select", "--budget", "0.3"), ("report",)):  # notes are tive check's
        res = run(*args, "--run", s["run"], "--strict")
        assert res.exit_code == 0 and "note:" not in res.output


def test_a_trak_projection_without_fast_jl_on_a_gpu_is_flagged(tmp_path):
    s = build(tmp_path)
    edit_meta(s["run"], lambda m: m.update(projector={"type": "trak", "dim": 24, "seed": 0,
                                                      "kernel": "cpu", "device": "cuda"}))
    found = check_lines(s["run"])
    assert len(found) == 1 and found[0].startswith("warning: projection:")
    assert "fast_jl" in found[0] and "tive doctor" in found[0]
    edit_meta(s["run"], lambda m: m["projector"].update(kernel="cuda"))
    assert check_lines(s["run"]) == []


def test_strict_makes_warnings_errors_and_select_writes_nothing(tmp_path):
    s = build(tmp_path, edit=lambda f, n, t: f.__setitem__(3, 0))
    res = run("check", "--run", s["run"], "--strict")
    assert res.exit_code == 2 and lines(res.output, "error")
    assert "1 health check failed (--strict" in res.output
    res = run("select", "--run", s["run"], "--budget", "0.3", "--strict")
    assert res.exit_code == 2 and not list(s["run"].glob("subset-*"))
    res = run("select", "--run", s["run"], "--budget", "0.3")
    assert res.exit_code == 0 and list(s["run"].glob("subset-*"))
    assert lines(res.stderr) and not lines(res.stdout)  # warnings on stderr, table on stdout
    assert run("report", "--run", s["run"], "--strict").exit_code == 2
    res = run("report", "--run", s["run"], "--html", "--strict")
    assert res.exit_code == 2 and not list(s["run"].glob("values.html"))
    assert run("report", "--run", s["run"]).exit_code == 0
    found = tive.check(s["run"])
    assert [f.check for f in found] == ["features"] and "; fix: " in found[0].line()
    with pytest.raises(HealthError, match="zero feature row"):
        tive.check(s["run"], strict=True)


def test_jaccard_is_the_overlap_of_distinct_rows():
    assert jaccard(np.array([1, 2, 3, 3]), np.array([2, 3, 4])) == 0.5
    assert jaccard(np.array([], dtype=int), np.array([], dtype=int)) == 1.0
    assert jaccard(np.array([1]), np.array([2])) == 0.0


def _printed(output: str) -> dict[str, list[float]]:
    table = output[output.index("stability:"):].splitlines()[2:]
    return {row.split()[0]: [float(x) for x in row.split()[1:]] for row in table}


def _by_hand(selections: list[np.ndarray], tasks: np.ndarray) -> dict[str, float]:
    """Mean pairwise Jaccard, counted with Python sets."""
    def j(a: set, b: set) -> float:
        return len(a & b) / len(a | b) if a | b else 1.0

    pairs = list(itertools.combinations(selections, 2))
    out = {t: np.mean([j({i for i in a if tasks[i] == t}, {i for i in b if tasks[i] == t})
                       for a, b in pairs]) for t in set(tasks)}
    out["overall"] = np.mean([j(set(a), set(b)) for a, b in pairs])
    return out


def test_stability_prints_the_overlaps_counted_by_hand(tmp_path):
    s = build(tmp_path)
    res = run("check", "--run", s["run"], "--stability", 3, "--budget", "0.3",
              "--temperature", "0.05")
    assert res.exit_code == 0, res.output
    printed = _printed(res.output)
    report = tive.value_estimate(store=s["run"])
    chosen = [report.select(0.3, seed=k, temperature=0.05).indices.tolist() for k in range(3)]
    want = _by_hand(chosen, np.array(s["tasks"]))
    assert set(printed) == set(want)
    for name, value in want.items():  # columns: across seeds, random (≈)
        assert printed[name][0] == pytest.approx(value, abs=5e-4)
    assert printed["overall"][0] < 1  # the draws differ
    assert "across seeds  random (≈)" in res.output and "across stores" not in res.output
    sizes = {t: s["tasks"].count(t) for t in set(s["tasks"])}
    distinct = report.select(0.3, seed=0, temperature=0.05).quotas  # no task oversampled here
    assert all(distinct[t] <= sizes[t] for t in sizes)
    for t in sizes:
        assert printed[t][1] == pytest.approx(chance_overlap([distinct[t]], [sizes[t]]),
                                              abs=5e-4)


def test_the_chance_overlap_is_that_of_uniform_draws():
    assert chance_overlap([5, 4], [10, 4]) == pytest.approx(6.5 / 11.5)  # 25/10 + 16/4
    assert chance_overlap([100], [1000]) == pytest.approx(0.1 / 1.9)  # p / (2 - p)
    assert chance_overlap([0], [10]) == 1.0
    rng = np.random.default_rng(0)
    draws = [(rng.choice(1000, 100, replace=False), rng.choice(1000, 100, replace=False))
             for _ in range(400)]
    assert np.mean([jaccard(a, b) for a, b in draws]) == pytest.approx(0.1 / 1.9, abs=4e-3)


def test_stability_across_two_stores_compares_the_same_seeds(tmp_path):
    s = build(tmp_path)
    features = np.load(tmp_path / "features.npy")
    projected = features @ np.random.default_rng(1).normal(size=(24, 12))  # another k
    np.save(tmp_path / "small.npy", projected.astype(np.float32))
    res = run("import", "--data", s["data"], "--features", tmp_path / "small.npy", "--norms",
              tmp_path / "norms.npy", "--run", tmp_path / "run12")
    assert res.exit_code == 0
    res = run("check", "--run", s["run"], "--stability", 2, "--budget", "0.3", "--strategy",
              "top", "--compare", tmp_path / "run12")
    assert res.exit_code == 0, res.output
    assert "across stores" in res.output and "across seeds" not in res.output  # top: no draw
    a = set(tive.value_estimate(store=s["run"]).select(0.3, strategy="top").indices.tolist())
    b = set(tive.value_estimate(store=tmp_path / "run12").select(0.3, strategy="top")
            .indices.tolist())
    assert _printed(res.output)["overall"] == [pytest.approx(len(a & b) / len(a | b), abs=5e-4)]


def test_stability_refuses_what_it_cannot_compare(tmp_path):
    s = build(tmp_path)
    res = run("check", "--run", s["run"], "--stability", 3, "--budget", "0.3", "--strategy",
              "top")
    assert res.exit_code == 2 and "draws nothing at random" in res.output
    res = run("check", "--run", s["run"], "--stability", 3)
    assert res.exit_code == 2 and "--budget" in res.output
    res = run("check", "--run", s["run"], "--budget", "0.3")
    assert res.exit_code == 2 and "go with --stability" in res.output


def test_a_scored_store_records_its_coverage_and_an_untrained_reference_is_flagged(tmp_path):
    """A real `tive score` with a fresh (never trained) adapter: peft starts every LoRA B
    matrix at 0, which is what a warm-up that took no effective step leaves."""
    from peft import get_peft_model
    from test_score import text_mixture
    from zoo import save_llava_folder

    from tive.models.load import load_model
    from tive.models.registry import resolve
    from tive.warmup.lora import lora_config

    save_llava_folder(tmp_path / "model")
    loaded = load_model(resolve(str(tmp_path / "model")), dtype="fp32", device="cpu")
    peft_model = get_peft_model(loaded.model, lora_config(loaded.model, r=4, alpha=8))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    data = text_mixture(tmp_path / "data", 12)
    common = ["--model", tmp_path / "model", "--data", data, "--reference", tmp_path / "adapter",
              "--proj-dim", 64, "--max-length", 128, "--batch-size", 4, "--quiet"]
    res = run("score", *common, "--run", tmp_path / "run")
    assert res.exit_code == 0, res.output
    coverage = Store.open(tmp_path / "run").meta["key_parameters"]["coverage"]
    assert coverage["expected"] == coverage["hooked"] and coverage["missing"] == []
    assert coverage["expected"]["modules"] == 8 and coverage["key_layers"] is None
    found = check_lines(tmp_path / "run")
    assert len(found) == 1 and found[0].startswith("warning: reference: ")
    assert "every LoRA B matrix is 0 (reference.json records no step count)" in found[0]
    res = run("score", *common, "--run", tmp_path / "last", "--key-layers", "last:1")
    assert res.exit_code == 0, res.output
    notes = [x for x in check_lines(tmp_path / "last", "note") if x.startswith("note: coverage")]
    assert len(notes) == 1 and "4 of 8 attention projections hooked (50% of the modules, " \
                               "50% of the key parameters)" in notes[0]
