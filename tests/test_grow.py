"""Incremental scoring (`tive score` on a store of other data), record keys, and their
refusals: docs/design.md, "Record keys" and "Incremental scoring"."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from test_score import _tive, invoke, kill_when_done, text_mixture
from zoo import save_llava_folder

from tive.data.keys import record_keys
from tive.data.mixture import load_mixture
from tive.data.tasks import label_tasks
from tive.store.format import Store

FILES = ("features.npy", "norms.npy", "loss.npy", "ntokens.npy", "done.npy", "skipped.npy",
         "index.jsonl", "keys.npy")
SMALL = ["--lora-r", "4", "--lora-alpha", "8", "--warmup-fraction", "1", "--max-length", "256",
         "--batch-size", "1", "--proj-dim", "64", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    save_llava_folder(folder)
    return folder


def changed(data: Path, out: Path, seed: int = 1, change: float = 0.1,
            words: int = 1) -> tuple[Path, int]:
    """``data`` with ``change`` of its records removed, as many new ones added (answers of
    ``words`` words), shuffled; the number added."""
    records = json.loads(data.read_text())
    rng = random.Random(seed)
    n = max(1, round(change * len(records)))
    kept = rng.sample(records, len(records) - n)
    new = [{"id": f"new{i}", "task": ("alpha", "beta", "gamma")[i % 3],
            "conversations": [{"from": "human", "value": f"new question {i} about a fox"},
                              {"from": "gpt", "value": f"a new answer {i}" + " fox" * (words - 1)}]}
           for i in range(n)]
    mixed = kept + new
    rng.shuffle(mixed)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(mixed))
    return out, n


def files(run: Path) -> dict[str, bytes]:
    return {name: (run / "store" / name).read_bytes() for name in FILES}


def test_changed_mixture_computes_only_new_records_and_equals_a_fresh_store(tmp_path,
                                                                          model_dir):
    mix1 = text_mixture(tmp_path / "one", 40)
    mix2, added = changed(mix1, tmp_path / "two" / "mix.json")
    run = tmp_path / "run"
    assert invoke("score", "--model", model_dir, "--data", mix1, "--run", run,
                  *SMALL).exit_code == 0
    first = files(run)
    res = invoke("score", "--model", model_dir, "--data", mix2, "--run", run, *SMALL)
    assert res.exit_code == 0, res.output + res.stderr
    assert f"({added} in this run" in res.output
    assert (f"incremental: {40 - added} rows reused from the previous store, {added} computed, "
            f"{added} dropped") in res.output
    fresh = tmp_path / "fresh"
    res = invoke("score", "--model", model_dir, "--data", mix2, "--run", fresh, "--reference",
                 run / "reference", *SMALL[6:])
    assert res.exit_code == 0, res.output + res.stderr
    assert files(run) == files(fresh)  # row for row, byte for byte (batch size 1)
    assert first != files(run) and not (run / ".store.next").exists()
    assert not (run / ".store.previous").exists()
    # a reordered mixture reuses every row; the same command again computes nothing
    records = json.loads(mix2.read_text())[::-1]
    mix3 = tmp_path / "three" / "mix.json"
    mix3.parent.mkdir()
    mix3.write_text(json.dumps(records))
    res = invoke("score", "--model", model_dir, "--data", mix3, "--run", run, *SMALL)
    assert res.exit_code == 0, res.output + res.stderr
    assert "incremental: 40 rows reused from the previous store, 0 computed, 0 dropped" \
        in res.output and "every row reused" in res.output
    res = invoke("score", "--model", model_dir, "--data", mix3, "--run", run, *SMALL)
    assert res.exit_code == 0 and "already complete" in res.output, res.output + res.stderr
    res = invoke("select", "--run", run, "--budget", "0.5", "-o", tmp_path / "s.json")
    assert res.exit_code == 0, res.output + res.stderr
    # the manifest's keys (the store's) are those tive apply computes from the mixture
    res = invoke("apply", tmp_path / "s.manifest.json", "--data", mix3, "-o", tmp_path / "a.json")
    assert res.exit_code == 0, res.output + res.stderr
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "s.json").read_bytes()


def test_other_settings_are_refused_and_the_old_store_stays(tmp_path, model_dir):
    mix1 = text_mixture(tmp_path / "one", 12)
    mix2, _ = changed(mix1, tmp_path / "two" / "mix.json")
    run = tmp_path / "run"
    assert invoke("score", "--model", model_dir, "--data", mix1, "--run", run,
                  *SMALL).exit_code == 0
    before = files(run)
    res = invoke("score", "--model", model_dir, "--data", mix2, "--run", run,
                 *[a if a != "64" else "32" for a in SMALL])
    assert res.exit_code == 2 and "projector" in res.stderr and "64" in res.stderr
    assert "12 records, fingerprint" in res.stderr and "grown for other data only with its " \
        "own settings" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = invoke("score", "--model", model_dir, "--data", mix2, "--run", run,
                 *[a if a != "8" else "16" for a in SMALL])  # another warm-up: other reference
    assert res.exit_code == 2 and "alpha: 8 → 16" in res.stderr, res.stderr
    assert files(run) == before and not (run / ".store.next").exists()


def test_a_store_without_record_keys_still_selects_and_gets_them_from_its_own_data(tmp_path,
                                                                                model_dir):
    mix1 = text_mixture(tmp_path / "one", 12)
    mix2, _ = changed(mix1, tmp_path / "two" / "mix.json")
    run = tmp_path / "run"
    assert invoke("score", "--model", model_dir, "--data", mix1, "--run", run,
                  *SMALL).exit_code == 0
    keys = (run / "store" / "keys.npy").read_bytes()
    (run / "store" / "keys.npy").unlink()  # as written before record keys existed
    assert invoke("select", "--run", run, "--budget", "0.5").exit_code == 0
    res = invoke("score", "--model", model_dir, "--data", mix2, "--run", run, *SMALL)
    assert res.exit_code == 2 and "no record keys" in res.stderr and str(mix1) in res.stderr
    res = invoke("score", "--model", model_dir, "--data", mix1, "--run", run, *SMALL)
    assert res.exit_code == 0 and "already complete" in res.output
    assert (run / "store" / "keys.npy").read_bytes() == keys


def test_record_keys_follow_content_task_and_image_bytes_not_id_or_position(tmp_path):
    folder = tmp_path / "d"
    (folder / "img").mkdir(parents=True)
    (folder / "img" / "a.png").write_bytes(b"one")
    (folder / "img" / "b.png").write_bytes(b"one")  # same bytes, another name
    conv = [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "this"}]
    records = [{"id": "x", "task": "t", "image": "img/a.png", "conversations": conv},
               {"id": "y", "task": "t", "image": "img/b.png", "conversations": conv},
               {"id": "z", "task": "u", "image": "img/a.png", "conversations": conv},
               {"id": "w", "task": "t", "image": "img/gone.png", "conversations": conv},
               {"id": "v", "task": "t", "image": "img/a.png", "conversations": conv[:1] + [
                   {"from": "gpt", "value": "that"}]}]
    path = folder / "mix.json"
    path.write_text(json.dumps(records))
    mixture = load_mixture(path)
    keys = record_keys(mixture, label_tasks(mixture).tasks)
    assert keys.dtype == np.dtype("S32") and len(set(keys.tolist())) == 4
    assert keys[0] == keys[1]  # the id and the file name do not enter, the bytes do
    (folder / "img" / "b.png").write_bytes(b"two")
    again = record_keys(mixture, label_tasks(mixture).tasks)
    assert again[0] == keys[0] and again[1] != keys[1]
    assert record_keys(mixture, label_tasks(mixture).tasks, rows=[3, 0]).tolist() == \
        [keys[3], keys[0]]


def test_kill_9_during_an_incremental_run_then_resume_equals_a_fresh_store(tmp_path,
                                                                         model_dir):
    from test_score import reference

    mix1 = text_mixture(tmp_path / "one", 300)
    mix2, added = changed(mix1, tmp_path / "two" / "mix.json", change=0.4,
                          words=200)  # 120 long new records: several commits of work
    ref = reference(model_dir, mix1, tmp_path / "ref", 0.05)
    args = ["score", "--model", model_dir, "--reference", ref, *SMALL[6:]]
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    assert invoke(*args, "--data", mix1, "--run", run).exit_code == 0
    assert invoke(*args, "--data", mix2, "--run", fresh).exit_code == 0
    first = files(run)
    env = {"OMP_NUM_THREADS": "1"}
    proc = _tive([*args, "--data", mix2, "--run", run], env)
    done_file = run / ".store.next" / "done.npy"
    reused = 300 - added
    kill_when_done(proc, done_file, reused + 11)  # copied, and new rows being computed
    done = int(np.load(done_file).sum())
    assert reused < done < 300, "the kill must land while new records are computed"
    assert files(run) == first and not Store.open(run / ".store.next").complete
    again = _tive([*args, "--data", mix2, "--run", run], env)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert f"({300 - done:,} in this run" in out and f"{reused:,} rows reused" in out
    assert files(run) == files(fresh)


def test_a_swap_a_crash_interrupted_is_finished(tmp_path):
    from tive.scoring.grow import NEXT_DIR, PREVIOUS_DIR, recover
    from tive.store.format import IndexEntry
    from tive.store.writers import write_store

    def store(folder: Path, n: int) -> None:
        write_store(folder, features=np.eye(n, 4), norms=np.ones(n),
                    index=[IndexEntry(str(i), "t", i) for i in range(n)],
                    meta={"data": {"path": "x.json", "fingerprint": "f" * 32}})

    run = tmp_path / "run"
    store(run / PREVIOUS_DIR, 3)  # killed between the two renames: no store
    store(run / NEXT_DIR, 2)
    recover(run)
    assert Store.open(run).n_records == 2 and not (run / NEXT_DIR).exists()
    assert not (run / PREVIOUS_DIR).exists()
    store(run / PREVIOUS_DIR, 3)  # killed while deleting the previous store
    recover(run)
    assert Store.open(run).n_records == 2 and not (run / PREVIOUS_DIR).exists()


def test_duplicate_records_count_as_dropped_only_when_no_copy_is_left(tmp_path, model_dir):
    """Records with one content share a key: an old row whose record is gone but whose copy
    stays is reused, not dropped (the example mixture repeats records)."""
    mix1 = text_mixture(tmp_path / "one", 6)
    records = json.loads(mix1.read_text())
    twin = {**records[0], "id": "twin"}  # the same content under another id
    mix1.write_text(json.dumps([*records, twin]))
    mix2 = tmp_path / "two" / "mix.json"
    mix2.parent.mkdir()
    mix2.write_text(json.dumps([twin, *records[1:5]]))  # records[0] and records[5] gone
    run = tmp_path / "run"
    assert invoke("score", "--model", model_dir, "--data", mix1, "--run", run,
                  *SMALL).exit_code == 0
    res = invoke("score", "--model", model_dir, "--data", mix2, "--run", run, *SMALL)
    assert res.exit_code == 0, res.output + res.stderr
    # records[0]'s row has the twin's key: only records[5]'s row is dropped
    assert "incremental: 5 rows reused from the previous store, 0 computed, 1 dropped" \
        in res.output, res.output


def test_rows_of_another_adapter_are_never_copied(tmp_path, model_dir):
    """The store of MIX1 was scored with adapter X: scoring MIX2 with adapter Y in the same run
    must not copy X's rows as Y's (the identity before loading has no adapter)."""
    from test_score import reference

    mix1 = text_mixture(tmp_path / "one", 12)
    mix2, _ = changed(mix1, tmp_path / "two" / "mix.json")
    x = reference(model_dir, mix1, tmp_path / "x", 0.5)
    y = reference(model_dir, mix1, tmp_path / "y", 1.0)
    run = tmp_path / "run"
    assert invoke("score", "--model", model_dir, "--data", mix1, "--run", run, "--reference", x,
                  *SMALL[6:]).exit_code == 0
    first = files(run)
    res = invoke("score", "--model", model_dir, "--data", mix2, "--run", run, "--reference", y,
                 *SMALL[6:])
    assert res.exit_code == 2 and "adapter" in res.output + res.stderr, res.output + res.stderr
    assert files(run) == first


def test_a_damaged_keys_file_is_one_error_for_growing_and_recomputed_for_a_manifest(tmp_path,
                                                                                  model_dir):
    mix1 = text_mixture(tmp_path / "one", 8)
    mix2, _ = changed(mix1, tmp_path / "two" / "mix.json", change=0.25)
    run = tmp_path / "run"
    assert invoke("score", "--model", model_dir, "--data", mix1, "--run", run,
                  *SMALL).exit_code == 0
    res = invoke("select", "--run", run, "--budget", "0.5", "-o", tmp_path / "a.json")
    assert res.exit_code == 0, res.output + res.stderr
    (run / "store" / "keys.npy").write_bytes(b"")  # emptied: np.load raises EOFError
    res = invoke("select", "--run", run, "--budget", "0.5", "-o", tmp_path / "b.json")
    assert res.exit_code == 0, res.output + res.stderr
    assert json.loads((tmp_path / "b.manifest.json").read_text())["records"] == \
        json.loads((tmp_path / "a.manifest.json").read_text())["records"]
    res = invoke("score", "--model", model_dir, "--data", mix2, "--run", run, *SMALL)
    assert res.exit_code == 2 and "keys.npy: unreadable" in res.output + res.stderr, \
        res.output + res.stderr
