"""`tive score --target`: the target's features with the store's reference and projector,
refusal of a target from another, and resume after kill -9 to the same bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_close_to_scale
from test_score import _tive, invoke, kill_when_done, reference, text_mixture
from zoo import save_llava_folder

from tive import value_estimate
from tive.errors import StoreError
from tive.store.format import Store
from tive.store.target import reference_identity

ARRAYS = ("features", "norms", "loss", "ntokens", "done", "skipped")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    save_llava_folder(folder)
    return folder


def args(model_dir: Path, data: Path, ref: Path, *more) -> list:
    return ["score", "--model", model_dir, "--data", data, "--reference", ref, "--batch-size",
            2, "--proj-dim", 64, "--max-length", 256, "--quiet", *more]


def target_bytes(run: Path) -> dict[str, bytes]:
    return {name: (run / "target" / f"{name}.npy").read_bytes() for name in ARRAYS}


def test_target_is_scored_like_the_store_and_a_foreign_one_refused(tmp_path, model_dir):
    data = text_mixture(tmp_path / "data", 18)
    val = text_mixture(tmp_path / "val", 6)  # the same generator: the store's first 6 records
    ref = reference(model_dir, data, tmp_path / "ref", 0.3)
    run = tmp_path / "run"
    res = invoke(*args(model_dir, data, ref, "--run", run, "--target", val))
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "target: scored 6 of 6 records" in res.output and "scored 18 of 18" in res.output
    store, target = Store.open(run), Store.open(run / "target")
    assert target.complete and target.dim == store.dim == 64
    assert reference_identity(target.meta) == reference_identity(store.meta)
    assert target.meta["data"]["fingerprint"] != store.meta["data"]["fingerprint"]
    assert [e.task for e in target.index()] == ["alpha", "beta", "gamma"] * 2
    # a record's features are the same whether it is a training or a target record
    assert_close_to_scale(np.asarray(target.features, np.float64),
                          np.asarray(store.features[:6], np.float64), rel=2e-3)
    assert_close_to_scale(target.array("norms"), store.array("norms")[:6], rel=1e-4)
    chosen = value_estimate(store=run).select(budget=6, method="less")
    assert len(chosen.indices) == 6
    # again: nothing to compute for either
    before = target_bytes(run)
    res = invoke(*args(model_dir, data, ref, "--run", run, "--target", val))
    assert res.exit_code == 0 and "target: scored 6 of 6 records (already complete" in res.output
    assert target_bytes(run) == before
    # a target scored with another projection (seed) is refused, by score and by select
    other = tmp_path / "other"
    res = invoke(*args(model_dir, data, ref, "--run", other, "--target", val, "--seed", 7))
    assert res.exit_code == 0, res.output
    shutil.rmtree(run / "target")
    shutil.copytree(other / "target", run / "target")
    res = invoke(*args(model_dir, data, ref, "--run", run, "--target", val))
    assert res.exit_code == 2 and "started with other settings (projector" in res.output
    with pytest.raises(StoreError, match=r"another reference or projector .*\(projector"):
        value_estimate(store=run).select(budget=6, method="tive-target")
    # --force scores it again with the store's settings
    res = invoke(*args(model_dir, data, ref, "--run", run, "--target", val, "--force"))
    assert res.exit_code == 0, res.output
    assert target_bytes(run) == before
    assert not (run / ".target.replaced").exists()


def test_kill_9_while_scoring_the_target_then_resume_is_bit_identical(tmp_path, model_dir):
    data = text_mixture(tmp_path / "data", 12)
    val = text_mixture(tmp_path / "val", 900)  # several seconds of commits: the kill lands
    ref = reference(model_dir, data, tmp_path / "ref", 0.5)
    env = {"OMP_NUM_THREADS": "1"}
    whole = _tive([*args(model_dir, data, ref, "--target", val), "--run", tmp_path / "whole"],
                  env)
    assert whole.wait(timeout=600) == 0, whole.stderr.read()

    run = tmp_path / "killed"
    proc = _tive([*args(model_dir, data, ref, "--target", val), "--run", run], env)
    kill_when_done(proc, run / "target" / "done.npy", 140)  # past the first grouping window
    done = np.load(run / "target" / "done.npy")
    assert 0 < done.sum() < len(done), "the kill must land mid-target"
    assert json.loads((run / "target" / "meta.json").read_text())["complete"] is False
    with pytest.raises(StoreError, match="only partly scored"):
        value_estimate(store=run).select(budget=3, method="less")
    again = _tive([*args(model_dir, data, ref, "--target", val), "--run", run], env)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert f"target: scored 900 of 900 records ({900 - int(done.sum()):,} in this run" in out
    assert target_bytes(run) == target_bytes(tmp_path / "whole")


def test_adam_direction_by_hand():
    from tive.warmup.moments import adam_direction

    g = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    m = torch.tensor([1.0, 0.0], dtype=torch.float64)
    v = torch.tensor([4.0, 0.0], dtype=torch.float64)
    # m' = 0.9·1 + 0.1·2 = 1.1, v' = 0.999·4 + 0.001·4 = 4 → 1.1 / √(4 + 1e-8)
    # m' = 0.1·(−1) = −0.1, v' = 0.001·1 = 0.001 → −0.1 / √(0.001 + 1e-8)
    want = [1.1 / (4 + 1e-8) ** 0.5, -0.1 / (0.001 + 1e-8) ** 0.5]
    np.testing.assert_allclose(adam_direction(g, m, v).numpy()[0], want, rtol=1e-15)


def test_optimizer_aware_features_are_each_records_adam_direction():
    from test_gradients import REL, items, peft_model
    from test_gradients import reference as one_by_one

    from tive.models.encoding import collate
    from tive.projection.projectors import Identity
    from tive.scoring.gradients import GradientFeatures
    from tive.warmup.lora import key_parameters

    model, records = peft_model("llama"), items("llama")
    keys = key_parameters(model)
    rng = np.random.default_rng(0)
    moments = [(torch.from_numpy(rng.normal(size=k.numel) * 1e-3),
                torch.from_numpy(rng.uniform(0, 1e-6, size=k.numel))) for k in keys]
    g = one_by_one(model, records)["grads"]  # (B, d) plain per-record gradients
    m = np.concatenate([a.numpy() for a, _ in moments])
    v = np.concatenate([b.numpy() for _, b in moments])
    want = (0.9 * m + 0.1 * g) / np.sqrt(0.999 * v + 0.001 * g ** 2 + 1e-8)
    with GradientFeatures(model, Identity([k.numel for k in keys]), moments=moments) as gf:
        batch = {k: v.double() if v is not None and v.is_floating_point() else v
                 for k, v in collate(records, 0).items()}
        res = gf(batch)
    for i in range(len(want)):
        assert np.linalg.norm(res.features[i] - want[i]) <= REL * np.linalg.norm(want[i])
    np.testing.assert_allclose(res.norms, np.linalg.norm(want, axis=1), rtol=REL)


def test_warmup_saves_its_moments_and_optimizer_aware_scoring_uses_them(tmp_path, model_dir):
    from safetensors.torch import load_file

    data = text_mixture(tmp_path / "data", 12)
    val = text_mixture(tmp_path / "val", 4)
    ref = reference(model_dir, data, tmp_path / "ref", 0.5)
    saved = load_file(str(ref / "optimizer.safetensors"))
    names = {n.rsplit(".", 1)[0] for n in saved}
    assert names and all(".lora_" in n for n in names)
    assert all(f"{n}.exp_avg" in saved and f"{n}.exp_avg_sq" in saved for n in names)
    assert any(float(t.abs().max()) > 0 for t in saved.values())
    plain, adam = tmp_path / "plain", tmp_path / "adam"
    for run, more in ((plain, ()), (adam, ("--optimizer-aware",))):
        res = invoke(*args(model_dir, data, ref, "--run", run, "--target", val, *more))
        assert res.exit_code == 0, res.output + repr(res.exception)
    a, p = Store.open(adam), Store.open(plain)
    assert a.meta["identity"]["gradients"] == "adam" and "moments" in a.meta["identity"]
    assert p.meta["identity"]["gradients"] == "sgd"
    assert not np.allclose(np.asarray(a.features, float), np.asarray(p.features, float))
    assert target_bytes(adam) == target_bytes(plain)  # LESS: target gradients stay plain
    value_estimate(store=adam).select(budget=4, method="less")  # same reference: accepted
    # continuing a plain store with --optimizer-aware is refused, and so is an adapter
    # without moments
    res = invoke(*args(model_dir, data, ref, "--run", plain, "--optimizer-aware"))
    assert res.exit_code == 2 and "gradients: sgd → adam" in res.output
    (ref / "optimizer.safetensors").unlink()
    res = invoke(*args(model_dir, data, ref, "--run", tmp_path / "none", "--optimizer-aware"))
    assert res.exit_code == 2 and "no AdamW moments" in res.output


def test_checkpoints_give_the_learning_rate_weighted_mean_of_their_cosines(tmp_path,
                                                                           model_dir):
    data = text_mixture(tmp_path / "data", 8)
    val = text_mixture(tmp_path / "val", 3)
    res = invoke("warmup", "--model", model_dir, "--data", data, "--run", tmp_path / "w",
                 "--fraction", 1, "--global-batch", 2, "--checkpoints", 2, "--lora-r", 4,
                 "--lora-alpha", 8, "--max-length", 256, "--lr", 1e-2, "--quiet")
    assert res.exit_code == 0, res.output + repr(res.exception)
    ref = tmp_path / "w" / "reference"
    listed = json.loads((ref / "reference.json").read_text())["checkpoints"]
    assert [c["step"] for c in listed] == [2, 4] and listed[0]["path"] == "checkpoints/step-2"
    assert listed[1]["path"] == "." and all(c["lr"] > 0 for c in listed)
    lr = np.array([c["lr"] for c in listed])
    w = lr / lr.sum()
    # each checkpoint alone: the earlier one as saved, the last copied without reference.json
    alone = [ref / "checkpoints" / "step-2", tmp_path / "last"]
    alone[1].mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(ref / name, alone[1] / name)
    f32 = ("--feature-dtype", "float32", "--target", val)
    runs = []
    for i, adapter in enumerate(alone):
        res = invoke(*args(model_dir, data, adapter, "--run", tmp_path / f"c{i}", *f32))
        assert res.exit_code == 0, res.output + repr(res.exception)
        runs.append((Store.open(tmp_path / f"c{i}"), Store.open(tmp_path / f"c{i}" / "target")))
    res = invoke(*args(model_dir, data, ref, "--run", tmp_path / "both", *f32))
    assert res.exit_code == 0, res.output + repr(res.exception)
    both = Store.open(tmp_path / "both")
    assert both.dim == 2 * 64 and len(both.meta["identity"]["checkpoints"]) == 2
    feats = np.asarray(both.features, np.float64)
    per = [np.asarray(s.features, np.float64) for s, _ in runs]  # unit rows
    cos = [p @ p.T for p in per]
    # by hand: the row dot products are Σ_c w_c cos_c, the norms Σ_c w_c ‖g_c‖
    assert_close_to_scale(feats @ feats.T, w[0] * cos[0] + w[1] * cos[1], rel=1e-5)
    assert_close_to_scale(both.array("norms"),
                          w[0] * runs[0][0].array("norms") + w[1] * runs[1][0].array("norms"))
    np.testing.assert_array_equal(both.array("loss"), runs[1][0].array("loss"))
    assert not np.allclose(cos[0], cos[1])  # the checkpoints differ: the test can tell
    # LESS's alignment with the target is the weighted mean of each checkpoint's
    tasks = [e.task for e in both.index()]
    got = value_estimate(store=tmp_path / "both").targeted().alignment
    each = [value_estimate(features=per[c], norms=np.ones(8), tasks=tasks,
                           target=(np.asarray(t.features), [e.task for e in t.index()]))
            .targeted().alignment for c, (_, t) in enumerate(runs)]
    assert_close_to_scale(got, w[0] * each[0] + w[1] * each[1], rel=1e-5)
