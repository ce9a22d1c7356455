"""`tive score` end to end: store contents, resume after kill -9, refusal, torchrun sharding."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import assert_close_to_scale
from hypothesis import given, settings
from hypothesis import strategies as st
from test_warmup import image_mixture
from zoo import save_llava_folder

from tive.cli.commands import main
from tive.models.skips import BY_CODE as SKIP_REASONS
from tive.store.format import Store

ARRAYS = ("features", "norms", "loss", "ntokens", "done", "skipped")
SMALL = ["--lora-r", "4", "--lora-alpha", "8", "--warmup-fraction", "1", "--max-length", "256",
         "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    save_llava_folder(folder)
    return folder


def text_mixture(folder: Path, n: int) -> Path:
    """``n`` text records of three tasks and varied lengths."""
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog red blue image answer".split()
    records = []
    for i in range(n):
        q = " ".join(rng.choice(words, size=int(rng.integers(2, 8))))
        a = " ".join(rng.choice(words, size=int(rng.integers(1, 12))))
        records.append({"id": str(i), "task": ("alpha", "beta", "gamma")[i % 3],
                        "conversations": [{"from": "human", "value": q},
                                          {"from": "gpt", "value": a}]})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mix.json").write_text(json.dumps(records))
    return folder / "mix.json"


def invoke(*args: str):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res


def store_bytes(run: Path) -> dict[str, bytes]:
    return {name: (run / "store" / f"{name}.npy").read_bytes() for name in ARRAYS}


def test_score_writes_a_complete_store_and_select_reads_it(tmp_path, model_dir):
    data = image_mixture(tmp_path / "data", n_per_task=4)
    (tmp_path / "data" / "gqa" / "1.png").unlink()  # one missing image: skipped, run goes on
    records = json.loads(data.read_text())  # one image without <image>: scored as text
    records[2]["conversations"][0]["value"] = records[2]["conversations"][0]["value"].replace(
        "<image>\n", "")
    data.write_text(json.dumps(records))
    run = tmp_path / "run"
    res = invoke("score", "--model", model_dir, "--data", data, "--run", run, "--batch-size", 5,
                 "--proj-dim", 256, *SMALL)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "trained on" in res.output and "scored 11 of 12 records" in res.output
    assert "skipped: 1 missing-image" in res.output
    assert "1 record has an image but no <image> in the text: scored as text" in res.output
    assert re.search(r"\(12 in this run, \d+\.\d s, \d+\.\d\d records/s\)", res.output)
    store = Store.open(run)
    assert store.complete and store.dim == 256 and store.meta["projector"]["type"] == "sparse-jl"
    assert store.meta["key_parameters"]["gradient_dim"] > 0
    skipped = store.array("skipped")
    assert [SKIP_REASONS.get(c) for c in skipped[skipped > 0]] == ["missing-image"]
    norms, feats = store.array("norms"), np.asarray(store.features, dtype=np.float64)
    ok = skipped == 0
    assert np.isfinite(norms[ok]).all() and (norms[ok] > 0).all()
    assert (store.array("ntokens")[ok] > 0).all() and np.isfinite(store.array("loss")[ok]).all()
    # rows are stored at unit length (directions; the exact norm is norms.npy)
    np.testing.assert_allclose(np.linalg.norm(feats[ok], axis=1), 1, atol=2e-3)
    assert (feats[~ok] == 0).all() and np.isnan(norms[~ok]).all()
    res = invoke("select", "--run", run, "--budget", "0.5")
    assert res.exit_code == 0, res.output
    assert "1 missing-image" in res.output
    # scoring again finds everything done, reuses the reference, computes nothing
    before = store_bytes(run)
    res = invoke("score", "--model", model_dir, "--data", data, "--run", run, "--batch-size", 5,
                 "--proj-dim", 256, *SMALL)
    assert res.exit_code == 0 and "already trained" in res.output
    assert "already complete" in res.output and store_bytes(run) == before


def test_batch_size_does_not_change_the_features(tmp_path, model_dir):
    data = image_mixture(tmp_path / "data", n_per_task=3)
    invoke("warmup", "--model", model_dir, "--data", data, "--run", tmp_path / "ref",
           "--fraction", "1", "--lora-r", "4", "--lora-alpha", "8", "--quiet")
    stores = []
    for size, grouping in ((1, "--group-by-length"), (4, "--group-by-length"),
                           (4, "--no-group-by-length"), (9, "--group-by-length")):
        run = tmp_path / f"run{size}{grouping}"
        res = invoke("score", "--model", model_dir, "--data", data, "--run", run,
                     "--reference", tmp_path / "ref" / "reference", "--batch-size", size,
                     "--proj-dim", 128, "--feature-dtype", "float32", "--max-length", 256,
                     grouping, "--quiet")
        assert res.exit_code == 0, res.output + repr(res.exception)
        stores.append(Store.open(run))
    for other in stores[1:]:
        assert_close_to_scale(other.features, stores[0].features)
        np.testing.assert_allclose(other.array("norms"), stores[0].array("norms"), rtol=1e-5)
        assert other.array("skipped").tolist() == stores[0].array("skipped").tolist()


def test_other_settings_or_data_are_refused_with_both_versions(tmp_path, model_dir):
    data = text_mixture(tmp_path / "data", 12)
    run = tmp_path / "run"
    base = ["score", "--model", model_dir, "--data", data, "--run", run, *SMALL]
    assert invoke(*base, "--proj-dim", 64).exit_code == 0
    res = invoke(*base, "--proj-dim", 32)
    assert res.exit_code == 2
    assert "started with other settings" in res.stderr and "64" in res.stderr
    assert "32" in res.stderr and "--force" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = invoke(*base, "--proj-dim", 64, "--feature-dtype", "float32")
    assert res.exit_code == 2 and "feature_dtype: float16 → float32" in res.stderr
    other = text_mixture(tmp_path / "other", 13)
    res = invoke("score", "--model", model_dir, "--data", other, "--run", run, "--reference",
                 run / "reference", "--proj-dim", 64, "--max-length", 64, "--quiet")
    assert res.exit_code == 2 and "12 records, fingerprint" in res.stderr  # as select says it
    assert f"{other} has 13 records, fingerprint" in res.stderr and str(data) in res.stderr
    res = invoke(*base, "--proj-dim", 64, "--image-root", data.parent)  # the default, written out
    assert res.exit_code == 0 and "already complete" in res.output, res.stderr
    res = invoke(*[a for a in base if a != "--quiet"], "--proj-dim", 64, "--force")
    assert res.exit_code == 0 and "already complete" in res.output  # --force kept the work
    assert "0 in this run" not in res.output and "score:" not in res.stderr  # no empty bar
    res = invoke(*base, "--proj-dim", 32, "--force")
    assert res.exit_code == 0 and Store.open(run).dim == 32 and "12 in this run" in res.output
    res = invoke(*base, "--projector", "none", "--proj-dim", 8)
    assert res.exit_code == 2 and "--proj-dim does not apply to --projector none" in res.stderr


def test_an_incomplete_store_is_not_selected_from(tmp_path, model_dir):
    data = text_mixture(tmp_path / "data", 12)
    run = tmp_path / "run"
    assert invoke("score", "--model", model_dir, "--data", data, "--run", run, "--proj-dim", 16,
                  *SMALL).exit_code == 0
    meta = json.loads((run / "store" / "meta.json").read_text())
    (run / "store" / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    done = np.load(run / "store" / "done.npy")
    done[5:] = False
    np.save(run / "store" / "done.npy", done)
    res = invoke("select", "--run", run, "--budget", "0.5")
    assert res.exit_code == 2 and "only 5 of 12 records are scored" in res.stderr
    assert "same `tive score` command" in res.stderr


def _tive(args: list, env: dict | None = None, **kw) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("tive")
    base = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    return subprocess.Popen([str(exe), *map(str, args)], env={**base, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)



def kill_when_done(proc, done_file: Path, rows: int) -> None:
    """``kill -9`` the scoring process ``proc`` once ``done_file`` marks more than ``rows - 1``
    rows done (or after 300 s, or when it ended by itself)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if int(np.load(done_file).sum()) >= rows:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_9_mid_run_then_resume_is_bit_identical(tmp_path, model_dir):
    data = text_mixture(tmp_path / "data", 600)
    ref = reference(model_dir, data, tmp_path / "ref", 0.05)
    args = ["score", "--model", model_dir, "--data", data, "--reference", ref,
            "--batch-size", 2, "--proj-dim", 64, "--max-length", 256, "--quiet"]
    env = {"OMP_NUM_THREADS": "1"}
    whole = _tive([*args, "--run", tmp_path / "whole"], env)
    assert whole.wait(timeout=600) == 0, whole.stderr.read()

    run = tmp_path / "killed"
    proc = _tive([*args, "--run", run], env)
    kill_when_done(proc, run / "store" / "done.npy", 140)  # past the first grouping window
    done = np.load(run / "store" / "done.npy")
    assert 0 < done.sum() < len(done), "the kill must land mid-run"
    assert not Store.open(run).complete
    again = _tive([*args, "--run", run], env)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert f"{len(done) - int(done.sum()):,} in this run" in out
    assert store_bytes(run) == store_bytes(tmp_path / "whole")


def _torchrun(n: int, args: list, env: dict) -> subprocess.CompletedProcess:
    """``tive ARGS`` in ``n`` CPU processes under torchrun."""
    torchrun = Path(sys.executable).with_name("torchrun")
    base = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    # "--" keeps torchrun's own parser off tive's options (it would read --run as --run-path)
    tive = str(Path(sys.executable).with_name("tive"))
    return subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", str(n),
                           "--no-python", "--", tive, *map(str, args)], env={**base, **env},
                          capture_output=True, text=True, timeout=600, check=False)


def reference(model_dir: Path, data: Path, run: Path, fraction: float) -> Path:
    """A small warm-up reference (LoRA r = 4) trained on ``fraction`` of ``data``."""
    res = invoke("warmup", "--model", model_dir, "--data", data, "--run", run, "--fraction",
                 fraction, "--lora-r", "4", "--lora-alpha", "8", "--max-length", "256",
                 "--quiet")
    assert res.exit_code == 0, res.output + repr(res.exception)
    return run / "reference"


def one_then_two_processes(args: list, tmp_path: Path) -> subprocess.CompletedProcess:
    """``tive ARGS`` with ``--run tmp_path/one`` in one process, then with
    ``--run tmp_path/two`` in two under torchrun (the latter's result)."""
    env = {"OMP_NUM_THREADS": "1"}
    one = _tive([*args, "--run", tmp_path / "one"], env)
    assert one.wait(timeout=600) == 0, one.stderr.read()
    res = _torchrun(2, [*args, "--run", tmp_path / "two"], env)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_torchrun_two_processes_equal_one(tmp_path, model_dir):
    data = text_mixture(tmp_path / "data", 41)
    ref = reference(model_dir, data, tmp_path / "ref", 0.5)
    args = ["score", "--model", model_dir, "--data", data, "--reference", ref,
            "--batch-size", 3, "--proj-dim", 64, "--max-length", 256, "--device", "cpu",
            "--quiet"]
    res = one_then_two_processes(args, tmp_path)
    assert res.stdout.count("scored 41 of 41 records") == 1  # rank 0 alone reports
    assert not (tmp_path / "two" / "store" / "parts").exists()
    assert store_bytes(tmp_path / "two") == store_bytes(tmp_path / "one")
    assert Store.open(tmp_path / "two").complete


def test_torchrun_warmup_trains_what_one_process_does(tmp_path, model_dir):
    """Without --reference, `tive score` under torchrun trains the warm-up data-parallel (each
    step's records cut into one share per rank, a split batch weighted by tokens, gradients
    summed): the same adapter and features as one process, up to float rounding."""
    from safetensors.numpy import load_file

    data = text_mixture(tmp_path / "data", 40)
    args = ["score", "--model", model_dir, "--data", data, "--warmup-fraction", "0.5",
            "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--warmup-lr", "0.01",
            "--warmup-batch-size", "2", "--warmup-global-batch", "6", "--warmup-epochs", "2",
            "--max-length", 256, "--batch-size", 3, "--proj-dim", 64, "--feature-dtype",
            "float32", "--device", "cpu", "--quiet"]
    res = one_then_two_processes(args, tmp_path)
    assert res.stdout.count("trained on") == 1  # rank 0 alone reports
    refs = [json.loads((tmp_path / r / "reference" / "reference.json").read_text())
            for r in ("one", "two")]
    assert refs[0]["sample"] == refs[1]["sample"]
    assert (refs[0]["processes"], refs[1]["processes"]) == (1, 2)
    # each step's 6 records split 3 + 3 (each rank's 3 in batches of 2 + 1, token-weighted)
    assert refs[1]["records_per_process"] == [20, 20]
    assert refs[0]["records_per_process"] == [40]
    assert refs[0]["loss"]["steps"] == refs[1]["loss"]["steps"] == 8  # 6+6+6+2, both epochs
    assert (refs[0]["recipe"]["accumulation"], refs[1]["recipe"]["accumulation"]) == (3, 2)
    assert refs[0]["recipe"]["global_batch"] == refs[1]["recipe"]["global_batch"] == 6
    for key in ("first", "last"):
        assert refs[1]["loss"][key] == pytest.approx(refs[0]["loss"][key], rel=1e-5)
    weights = [load_file(tmp_path / r / "reference" / "adapter_model.safetensors")
               for r in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    moved = max(np.abs(w).max() for k, w in weights[0].items() if "lora_B" in k)
    assert moved > 1e-3  # the warm-up trained B away from its zero start
    for k in weights[0]:  # a tolerance relative to each tensor's scale: summing the ranks'
        # gradients in another order rounds differently, and Adam's division by √v turns that
        # into differences of about 1e-5 of the tensor's scale on elements near zero (4.7e-8
        # on one AVX-512 CPU where an absolute 1e-6 · moved held elsewhere)
        assert_close_to_scale(weights[1][k], weights[0][k])
    stores = [Store.open(tmp_path / r) for r in ("one", "two")]
    np.testing.assert_allclose(np.asarray(stores[1].features), np.asarray(stores[0].features),
                               atol=1e-4)
    np.testing.assert_allclose(stores[1].array("norms"), stores[0].array("norms"), rtol=1e-4)


def test_value_estimate_with_a_model_scores_then_reports(tmp_path, model_dir):
    import tive
    from tive.errors import ConfigError

    data = image_mixture(tmp_path / "data", n_per_task=3)
    kwargs = dict(data=data, model=str(model_dir), run=tmp_path / "run",
                  score={"batch_size": 4, "proj_dim": 64, "max_length": 256},
                  warmup={"fraction": 1.0, "r": 4, "alpha": 8}, progress=False)
    report = tive.value_estimate(**kwargs)
    assert set(report.task_values) == {"llava_instruct", "gqa", "sharegpt"}
    assert report.valid.all() and np.isfinite(report.instance_values).all()
    subset = report.select(budget=0.5)
    assert len(subset.indices) == 5  # 0.5 × 9, rounded half up
    store = Store.open(tmp_path / "run")
    np.testing.assert_allclose(report.norms, store.array("norms"))
    again = tive.value_estimate(**kwargs)  # resumes: nothing to do, same values
    np.testing.assert_array_equal(again.instance_values, report.instance_values)
    with pytest.raises(ConfigError, match="score= has no setting 'batch'"):
        tive.value_estimate(data=data, model=str(model_dir), score={"batch": 4})
    with pytest.raises(ConfigError, match="model= computes the features; leave out store="):
        tive.value_estimate(data=data, model=str(model_dir), store=tmp_path / "run")
    with pytest.raises(ConfigError, match="score=, device= apply only with model="):
        tive.value_estimate(store=tmp_path / "run", score={"batch_size": 2}, device="cpu")


def test_score_then_select_on_the_shipped_example_from_a_fresh_shell(tmp_path, model_dir):
    """As a new user types it: default run folder, the example mixture, then select."""
    example = Path(__file__).resolve().parents[1] / "examples" / "llava_mini" / "mix.json"
    score = _tive(["score", "--model", model_dir, "--data", example, "--lora-r", 4,
                   "--lora-alpha", 8, "--max-length", 512, "--proj-dim", 256, "--batch-size", 16],
                  cwd=tmp_path)
    out, err = score.communicate(timeout=600)
    assert score.returncode == 0, err[-2000:]
    assert "trained on" in out and "of 210 records" in out and "store: " in out
    assert "rec/s" in err and "210/210" in err  # the progress bar, with its rate and ETA
    select = _tive(["select", "--budget", "0.15"], cwd=tmp_path)
    out, err = select.communicate(timeout=600)
    assert select.returncode == 0, err
    assert "selected 32 of 210 records" in out
    subset = json.loads((tmp_path / "tive-out" / "subset-tive-0.15.json").read_text())
    originals = {json.dumps(r, sort_keys=True) for r in json.loads(example.read_text())}
    assert len(subset) == 32 and all(json.dumps(r, sort_keys=True) in originals for r in subset)


def test_parts_left_by_a_crash_are_folded_in_and_half_made_parts_ignored(tmp_path):
    from tive.store.format import IndexEntry
    from tive.store.writers import create_part, create_store, fold_parts

    meta = {"projector": {"type": "sparse-jl"}, "data": {"path": "-", "fingerprint": "-"}}
    store = create_store(tmp_path / "store", n=10, k=4, meta=meta,
                         index=[IndexEntry(str(i), "t", i) for i in range(10)])
    writer = create_part(store, 1, np.array([2, 3, 6, 7]))
    feats = np.arange(8, dtype=np.float32).reshape(2, 4)
    writer.write(np.array([6, 7]), feats, np.array([1.0, 2.0]), np.array([0.5, 0.25]),
                 np.array([3, 4]), np.zeros(2, np.int8))
    writer.commit()  # rows 6, 7 done; rows 2, 3 never computed (the rank was killed)
    half = tmp_path / "store" / "parts" / "rank-0"
    half.mkdir()
    (half / "features.npy").write_bytes(b"")  # killed while creating its part: no rows.npy
    assert fold_parts(store) == 2
    done = store.array("done")
    assert done.tolist() == [i in (6, 7) for i in range(10)]
    np.testing.assert_array_equal(store.features[6:8], feats)
    assert store.array("ntokens")[6:8].tolist() == [3, 4]
    assert not (tmp_path / "store" / "parts").exists()
    assert fold_parts(store) == 0  # nothing left; folding again is harmless


def test_rows_written_out_of_order_land_where_they_belong_and_bad_ones_are_named(tmp_path):
    from tive.errors import StoreError
    from tive.store.format import IndexEntry
    from tive.store.writers import RowWriter, create_store

    meta = {"projector": {"type": "sparse-jl"}, "data": {"path": "-", "fingerprint": "-"}}
    store = create_store(tmp_path / "store", n=10, k=4, meta=meta,
                         index=[IndexEntry(str(i), "t", i) for i in range(10)])
    writer = RowWriter(store.root)
    feats = np.arange(12, dtype=np.float32).reshape(3, 4)
    writer.write(np.array([7, 2, 5]), feats, np.array([1.0, 2.0, 3.0]), np.ones(3),
                 np.array([3, 4, 5]), np.zeros(3, np.int8))
    writer.commit()
    np.testing.assert_array_equal(store.features[[7, 2, 5]], feats)
    assert store.array("ntokens")[[7, 2, 5]].tolist() == [3, 4, 5]
    assert np.flatnonzero(store.array("done")).tolist() == [2, 5, 7]
    huge = np.ones((2, 4), np.float32)
    huge[1] = 1e6  # overflows float16: the message names store row 4, not the batch position
    with pytest.raises(StoreError, match="features row 4 "):
        writer.write(np.array([9, 4]), huge, np.ones(2), np.ones(2), np.ones(2, int),
                     np.zeros(2, np.int8))


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 700), batch_size=st.integers(1, 9), grouped=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_batch_plan_covers_every_row_once_and_groups_lengths_within_windows(n, batch_size,
                                                                           grouped, seed):
    from tive.scoring.plan import GROUP_WINDOW, plan_batches

    lengths = np.random.default_rng(seed).integers(0, 6, size=n)  # many ties
    plan = plan_batches(n, batch_size, lengths if grouped else None)
    rows = np.concatenate(plan) if plan else np.zeros(0, int)
    assert sorted(rows.tolist()) == list(range(n))
    assert all(0 < len(b) <= batch_size for b in plan)
    window = GROUP_WINDOW * batch_size
    if not grouped:
        assert rows.tolist() == list(range(n))
        return
    for start in range(0, n, window):  # a window keeps its rows, longest first, ties in order
        part = rows[start:start + window]
        assert sorted(part.tolist()) == list(range(start, min(start + window, n)))
        keys = list(zip(-lengths[part], part))
        assert keys == sorted(keys)
    short = [i for i, b in enumerate(plan) if len(b) < batch_size]  # only a window's last
    assert all((sum(len(b) for b in plan[:i + 1]) % window == 0) or i == len(plan) - 1
               for i in short)


def test_pending_batches_are_those_of_the_plan_not_yet_done():
    from tive.scoring.plan import pending_batches, plan_batches

    plan = plan_batches(10, 3, np.array([1, 9, 2, 8, 3, 7, 4, 6, 5, 0]))
    assert [b.tolist() for b in plan] == [[1, 3, 5], [7, 8, 6], [4, 2, 0], [9]]
    done = np.zeros(10, bool)
    done[[1, 3, 5, 7]] = True
    assert [b.tolist() for b in pending_batches(plan, done)] == [[8, 6], [4, 2, 0], [9]]
    # resumed with another batch size: a row already done is not scored again
    done[:] = False
    done[[1, 3, 5]] = True
    again = pending_batches(plan_batches(10, 2, np.array([1, 9, 2, 8, 3, 7, 4, 6, 5, 0])), done)
    assert [b.tolist() for b in again] == [[7], [8, 6], [4, 2], [0, 9]]


@pytest.mark.parametrize("family", ["llava", "bunny", "qwen2-vl", "causal-lm"])
def test_length_estimate_orders_records_as_their_encoded_lengths(family):
    """The sort key of grouping, from the text alone, ranks records as encoding does."""
    from scipy.stats import spearmanr
    from test_encode import encoder, picture, record

    from tive.scoring.plan import record_lengths

    enc = encoder(family, max_length=10_000)
    rng = np.random.default_rng(0)
    words = "what is in the image a red square on white which colour maybe none".split()
    records = []
    for i in range(40):
        turns = []
        for _ in range(int(rng.integers(1, 4))):
            turns += [("user", " ".join(rng.choice(words, size=int(rng.integers(1, 30))))),
                      ("assistant", " ".join(rng.choice(words, size=int(rng.integers(1, 30)))))]
        images = int(family in ("llava", "bunny") and i % 3 == 0)
        if images:
            turns[0] = ("user", "<image>\n" + turns[0][1])
        records.append(record(*turns, images=images, index=i))
    encoded = [enc.encode(r, [picture()] * len(r.images)) for r in records]
    actual = np.array([len(e.input_ids) for e in encoded])
    estimate = record_lengths(records, enc)
    assert spearmanr(estimate, actual).statistic >= 0.95
    capped = record_lengths(records, encoder(family, max_length=30))
    assert capped.max() == 30 and (capped == np.minimum(estimate, 30)).all()
    part = record_lengths(records, enc, rows=np.array([3, 5]), chunk=1)
    assert part[[3, 5]].tolist() == estimate[[3, 5]].tolist() and part.sum() == part[[3, 5]].sum()


def test_only_windows_with_a_pending_row_are_measured():
    from tive.scoring.plan import GROUP_WINDOW, open_window_rows

    window = GROUP_WINDOW * 2
    done = np.ones(3 * window + 5, dtype=bool)
    assert len(open_window_rows(done, 2)) == 0
    done[window + 7] = False  # second window open
    done[-1] = False  # the short last window open
    assert open_window_rows(done, 2).tolist() == [*range(window, 2 * window),
                                                  *range(3 * window, 3 * window + 5)]


def test_unit_rows_keep_tiny_gradients_in_float16():
    from tive.scoring.loop import unit_rows
    from tive.store.writers import _cast_rows

    tiny = np.random.default_rng(0).normal(size=(3, 8192)) * 1e-9  # ‖g‖ ≈ 1e-7
    tiny[1] = 0
    rows = unit_rows(tiny)
    stored = _cast_rows(rows, np.dtype("float16"), np.arange(3))
    np.testing.assert_allclose(np.linalg.norm(stored.astype(float), axis=1), [1, 0, 1],
                               atol=1e-3)


def test_every_image_missing_stops_unless_asked_to_score_text_only(tmp_path, model_dir):
    data = image_mixture(tmp_path / "data", n_per_task=2)
    for p in (tmp_path / "data").glob("*/*.png"):
        p.unlink()
    base = ["score", "--model", model_dir, "--data", data, "--run", tmp_path / "run",
            "--proj-dim", 16, *SMALL]
    res = invoke(*base)
    assert res.exit_code == 2 and "none of the 4 records with images finds its image" in res.stderr
    assert "--image-root" in res.stderr and not (tmp_path / "run").exists()
    res = invoke(*base, "--skip-missing-images")
    assert res.exit_code == 0, res.output
    assert "scored 2 of 6 records" in res.output and "4 missing-image" in res.output


def test_rows_that_cannot_be_scored_keep_their_reason_and_the_run_goes_on(tmp_path):
    """score_batches puts each verdict on its own row, batches out of row order included: an
    encoder skip, a non-finite gradient and a record with nothing supervised are recorded with
    their reason, and the other records of their batches are written."""
    from types import SimpleNamespace

    from tive.data.mixture import load_mixture
    from tive.models.segments import Encoded, Skipped
    from tive.scoring.gradients import BatchFeatures
    from tive.scoring.loop import score_batches
    from tive.scoring.settings import ScoreConfig
    from tive.store.format import IndexEntry
    from tive.store.writers import RowWriter, create_store

    mixture = load_mixture(text_mixture(tmp_path / "data", 8))
    index = {mixture[i].id: i for i in range(len(mixture))}

    class Encoder:  # a record's tokens name its row; rows 1 and 3 cannot be encoded
        def encode(self, record, images):
            row = index[record.id]
            if row in (1, 3):
                reason = "image-count-mismatch" if row == 1 else "too-long-for-image"
                return Skipped(row, record.id, reason)
            return Encoded([row + 10] * (row + 2), [row + 10] * (row + 2), 0, None)

    class Verdicts:  # row 5's gradient is not finite, row 6 has nothing supervised
        projector = SimpleNamespace(dim=3)

        def __call__(self, batch):
            rows = batch["input_ids"][:, 0].numpy() - 10
            features = np.stack([np.full(3, r + 1.0) for r in rows])
            norms, ntokens = rows + 1.0, np.full(len(rows), 4)
            norms[rows == 5] = np.inf
            ntokens[rows == 6] = 0
            return BatchFeatures(features, norms, np.ones(len(rows)), ntokens)

    n = len(mixture)
    store = create_store(tmp_path / "store", n=n, k=3,
                         meta={"projector": {"type": "none"}, "data": {"fingerprint": "-"}},
                         index=[IndexEntry(str(i), "t", i) for i in range(n)],
                         feature_dtype="float32")
    writer = RowWriter(store.root)
    work = [np.array([1, 5, 7]), np.array([3, 6, 0]), np.array([4, 2])]
    assert score_batches(Verdicts(), Encoder(), 0, mixture, work, writer, ScoreConfig()) == n
    writer.close()
    store = Store.open(store.root)
    reasons = [SKIP_REASONS.get(int(c), "") for c in store.array("skipped")]
    assert reasons == ["", "image-count-mismatch", "", "too-long-for-image", "", "non-finite",
                       "no-supervised-token", ""]
    assert store.array("done").all()
    ok = [0, 2, 4, 7]
    np.testing.assert_allclose(store.array("norms")[ok], np.array(ok) + 1.0)
    np.testing.assert_allclose(np.asarray(store.features)[ok], 1 / np.sqrt(3), rtol=1e-6)
    assert (store.array("ntokens")[ok] == 4).all() and store.array("ntokens")[1] == -1


def test_trak_projector_through_tive_score(tmp_path, model_dir, monkeypatch):
    """`--projector trak` stores TRAK's projection of each record's exact gradient (that of
    `--projector none`), and warns when its CPU projector will be slow."""
    import torch

    import tive.projection.projectors as projection

    data = text_mixture(tmp_path / "data", 10)
    ref = reference(model_dir, data, tmp_path / "ref", 0.5)
    args = ["score", "--model", model_dir, "--data", data, "--reference", ref,
            "--batch-size", 4, "--feature-dtype", "float32", "--max-length", 256, "--quiet"]
    res = invoke(*args, "--run", tmp_path / "exact", "--projector", "none")
    assert res.exit_code == 0, res.output + repr(res.exception)
    monkeypatch.setattr(projection, "SLOW_CPU_TRAK", 0)  # any size counts as slow
    with pytest.warns(UserWarning, match="TRAK's CPU projector"):
        res = invoke(*args, "--run", tmp_path / "trak", "--projector", "trak", "--proj-dim", 512)
    assert res.exit_code == 0, res.output + repr(res.exception)
    monkeypatch.undo()
    exact, trak = Store.open(tmp_path / "exact"), Store.open(tmp_path / "trak")
    assert trak.meta["projector"]["type"] == "trak" and trak.dim == 512
    dims = [int(np.prod(m["shape"])) for m in trak.meta["key_parameters"]["matrices"]]
    grads = np.asarray(exact.features, dtype=np.float64) * exact.array("norms")[:, None]
    expected = projection.project_rows(projection.make_projector("trak", dims, 512, seed=0),
                                       torch.from_numpy(grads).float(), dims).double().numpy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(trak.features), expected, atol=2e-4)
    np.testing.assert_allclose(trak.array("norms"), exact.array("norms"), rtol=1e-5)
