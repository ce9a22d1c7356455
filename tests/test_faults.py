"""Nothing lost under faults: full disks, damaged stores, concurrent runs, hostile files.

Each group of the fault report has its tests here: (1) a full disk is one clear error, never a
signal, and leaves nothing behind; (2) ``-o`` never lands on an input; (3) the outputs of one
selection are all new or all old; (4) hostile files and damaged stores give one line, never a
traceback (property-based for random damage); (5) one writer per run folder, stable adapter
identities; (6) ``--force`` keeps the old store until the new one is complete, and temporaries
of killed runs are removed; (7) values that used to be accepted silently are refused.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tive.cli.commands import main
from tive.data.mixture import load_mixture
from tive.data.tasks import label_tasks
from tive.errors import ConfigError, DataError, OutputError, TiveError
from tive.util import files as fileio

FAST = settings(max_examples=30, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(res, *fragments):
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    return err


def imported(mixture_run) -> Path:
    d = mixture_run["dir"]
    res = invoke("import", "--data", mixture_run["data"], "--features", d / "features.npy",
                 "--norms", d / "norms.npy", "--run", mixture_run["run"])
    assert res.exit_code == 0, res.output
    return mixture_run["run"]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- (1) full disk -----------------------------------------------------------------------------

def test_no_space_for_the_features_is_one_error_and_leaves_nothing(mixture_run, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    d = mixture_run["dir"]
    res = invoke("import", "--data", mixture_run["data"], "--features", d / "features.npy",
                 "--norms", d / "norms.npy", "--run", mixture_run["run"])
    one_line_error(res, "the features (36 × 24) needs", "free", "fix:")
    assert [p.name for p in mixture_run["run"].iterdir()] == [".lock"]  # no store, no temp


def test_free_space_is_checked_before_starting(tmp_path):
    with pytest.raises(OutputError, match=r"needs 1024\.0 GB in .*, .* free; fix:"):
        fileio.check_space(tmp_path / "run", 1 << 40, "the store")
    fileio.check_space(tmp_path / "run", 1 << 10, "the store")


def _tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                         capture_output=True)
    return res.returncode == 0


def test_a_tiny_tmpfs_gives_clear_errors_no_signal_nothing_left_old_outputs_intact(
        mixture_run, tmp_path):
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "256k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        exe = Path(sys.executable).with_name("tive")
        rng = np.random.default_rng(0)
        big = tmp_path / "big.npy"  # 36 × 8192 float32 → 576 KiB of float16: does not fit
        np.save(big, rng.normal(size=(36, 8192)).astype(np.float32))
        d = mixture_run["dir"]
        res = subprocess.run([str(exe), "import", "--data", str(mixture_run["data"]),
                              "--features", str(big), "--norms", str(d / "norms.npy"),
                              "--run", str(disk / "run")], capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 2, (res.returncode, res.stderr)  # not 135 (SIGBUS)
        assert "needs" in res.stderr and "free" in res.stderr and "Traceback" not in res.stderr
        assert sorted(p.name for p in (disk / "run").iterdir()) == [".lock"]
        # a small store fits; its selection's outputs are then kept whole when a later
        # selection runs out of space half way
        res = subprocess.run([str(exe), "import", "--data", str(mixture_run["data"]),
                              "--features", str(d / "features.npy"), "--norms",
                              str(d / "norms.npy"), "--run", str(disk / "run")],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        sel = [str(exe), "select", "--run", str(disk / "run"), "--budget", "0.5"]
        assert subprocess.run(sel, capture_output=True, timeout=300).returncode == 0
        before = tree(disk / "run")
        try:  # fill what is left of the disk
            with open(disk / "filler", "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        except OSError:
            pass
        res = subprocess.run(sel + ["--seed", "1"], capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and "nothing was written" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        assert tree(disk / "run") == before  # old outputs intact, no temporaries left
        (disk / "filler").unlink(missing_ok=True)
        # tive score: the store (36 × 8192 float32 = 1.2 MB) cannot fit after the warm-up
        from zoo import save_llava_folder

        save_llava_folder(tmp_path / "model")
        text = tmp_path / "text.json"
        text.write_text(json.dumps([{"id": str(i), "task": "ab"[i % 2], "conversations": [
            {"from": "human", "value": f"question {i}?"}, {"from": "gpt", "value": "yes"}]}
            for i in range(36)]))
        res = subprocess.run([str(exe), "score", "--model", str(tmp_path / "model"), "--data",
                              str(text), "--run", str(disk / "scored"), "--lora-r", "2",
                              "--lora-alpha", "4", "--proj-dim", "8192", "--feature-dtype",
                              "float32", "--max-length", "512", "--quiet"],
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
        assert "needs" in res.stderr and "free" in res.stderr and "Traceback" not in res.stderr
        assert sorted(p.name for p in (disk / "scored").iterdir()) == [".lock", "reference"]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# --- (2) -o never lands on an input --------------------------------------------------------------

def test_select_refuses_to_write_onto_the_input_mixture(mixture_run):
    run = imported(mixture_run)
    data = mixture_run["data"]
    before = data.read_bytes()
    res = invoke("select", "--run", run, "--budget", "0.25", "-o", data)
    one_line_error(res, f"{data}: is an input of this selection", "fix:")
    assert data.read_bytes() == before
    link = mixture_run["dir"] / "alias.json"
    os.link(data, link)  # the same file under another name
    one_line_error(invoke("select", "--run", run, "--budget", "0.25", "-o", link),
                   "is an input")
    features = run / "store" / "features.npy"
    res = invoke("select", "--run", run, "--budget", "0.25", "-o", run / "store" / "x.json")
    assert res.exit_code == 0  # a new name inside the store folder is not an input
    (run / "store" / "x.json").unlink()
    (run / "store" / "x.report.json").unlink()
    (run / "store" / "x.png").unlink()
    shutil.copy(features, mixture_run["dir"] / "keep.npy")
    res = invoke("select", "--run", run, "--budget", "0.25", "-o",
                 run / "store" / "features.npy")
    one_line_error(res, "features.npy: is an input")
    assert features.read_bytes() == (mixture_run["dir"] / "keep.npy").read_bytes()


# --- (3) all new or all old ----------------------------------------------------------------------

def test_outputs_of_one_selection_are_replaced_together_or_not_at_all(mixture_run,
                                                                     monkeypatch):
    from tive.output import saving

    run = imported(mixture_run)
    assert invoke("select", "--run", run, "--budget", "0.25").exit_code == 0
    before = tree(run)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(saving, "write_chart", no_space)
    res = invoke("select", "--run", run, "--budget", "0.25", "--seed", "7")
    one_line_error(res, "nothing was written")
    assert tree(run) == before


# --- (4) hostile files and damaged stores ---------------------------------------------------------

def test_deeply_nested_json_is_one_line(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 6000 + "]" * 6000)
    one_line_error(invoke("tasks", deep), "nested too deeply")
    deep.write_text('[{"id": "a", "conversations": ' + "[" * 6000 + "]" * 6000 + "}]")
    one_line_error(invoke("tasks", deep), "nested too deeply")


def test_a_lone_surrogate_does_not_stop_the_length_estimate(tmp_path):
    from zoo import save_llava_folder

    from tive.models.load import load_model
    from tive.models.registry import resolve
    from tive.scoring.plan import record_lengths

    data = tmp_path / "mix.json"
    data.write_text('[{"id": "a", "conversations": [{"from": "human", "value": "bad \\ud800"},'
                    ' {"from": "gpt", "value": "ok"}]}, {"id": "b", "conversations": ['
                    '{"from": "human", "value": "fine"}, {"from": "gpt", "value": "ok"}]}]')
    mixture = load_mixture(data)
    save_llava_folder(tmp_path / "model")
    encoder = load_model(resolve(str(tmp_path / "model")), "fp32", "cpu").encoder(512)
    lengths = record_lengths(mixture, encoder)
    assert (lengths > 0).all()
    from tive.models.encoding import encode_row

    assert encode_row(encoder, mixture, 0) == "error"  # skipped and counted when scored
    assert not isinstance(encode_row(encoder, mixture, 1), str)


@pytest.mark.parametrize("make, fragment", [
    (lambda d: np.save(d / "f.npy", np.zeros((36, 0), np.float32)), "has no columns"),
    (lambda d: np.save(d / "f.npy", np.full((36, 4), "x")), "holds strings"),
    (lambda d: np.save(d / "f.npy", np.ones((36, 4), np.complex64)), "holds complex numbers"),
    (lambda d: np.savez(open(d / "f.npy", "wb"), a=np.ones((36, 4))), "an .npz archive"),
    (lambda d: (d / "f.npy").write_text("1 2 3\n4 5 6\n"), "not a .npy file (no NumPy header"),
    (lambda d: (d / "f.npy").write_bytes(b""), "not a .npy file"),
    (lambda d: (d / "f.npy").write_bytes(b"\x93NUMPY\x01\x00garbage"), "a damaged .npy file"),
])
def test_bad_feature_files_are_one_line(mixture_run, make, fragment):
    d = mixture_run["dir"]
    make(d)
    res = invoke("import", "--data", mixture_run["data"], "--features", d / "f.npy", "--norms",
                 d / "norms.npy", "--run", mixture_run["run"])
    one_line_error(res, fragment)
    assert not (mixture_run["run"] / "store").exists()


def test_string_norms_and_negative_token_counts_are_refused(mixture_run):
    d = mixture_run["dir"]
    np.save(d / "s.npy", np.array(["1.0"] * 36))
    res = invoke("import", "--data", mixture_run["data"], "--features", d / "features.npy",
                 "--norms", d / "s.npy", "--run", mixture_run["run"])
    one_line_error(res, "--norms: holds strings")
    np.save(d / "t.npy", np.full(36, -3))
    res = invoke("import", "--data", mixture_run["data"], "--features", d / "features.npy",
                 "--norms", d / "norms.npy", "--ntokens", d / "t.npy", "--run",
                 mixture_run["run"])
    one_line_error(res, "--ntokens: row 0 is -3; expected supervised token counts (≥ 0)")


def test_a_record_id_that_is_not_a_name_is_refused(tmp_path):
    data = tmp_path / "mix.jsonl"
    data.write_text('{"id": NaN, "conversations": [{"from": "human", "value": "q"}, '
                    '{"from": "gpt", "value": "a"}]}\n')
    one_line_error(invoke("tasks", data), "record 0 has id nan; expected a string or an integer")


def _meta(run):
    return run / "store" / "meta.json"


DAMAGE = {  # the damaged-store cases of the fault report, and the words of their error
    "meta without keys": (lambda r: _meta(r).write_text('{"format_version": 1}'),
                          "data.records is None"),
    "meta a list": (lambda r: _meta(r).write_text("[1, 2]"), "a JSON list, expected an object"),
    "records many": (lambda r: _meta(r).write_text(json.dumps(
        {**json.loads(_meta(r).read_text()), "data": {
            **json.loads(_meta(r).read_text())["data"], "records": "many"}})),
        "data.records is 'many'"),
    "truncated features": (lambda r: _truncate(r / "store/features.npy", 0.5), "truncated"),
    "garbage features": (lambda r: (r / "store/features.npy").write_bytes(os.urandom(4000)),
                         "not a .npy array"),
    "zero-byte features": (lambda r: (r / "store/features.npy").write_bytes(b""),
                           "not a .npy array"),
    "truncated index": (lambda r: _truncate(r / "store/index.jsonl", 0.5), "index.jsonl"),
    "missing index": (lambda r: (r / "store/index.jsonl").unlink(), "index.jsonl: missing"),
    "short index": (lambda r: (r / "store/index.jsonl").write_text(
        "".join((r / "store/index.jsonl").read_text().splitlines(True)[:-3])),
        "33 rows, meta.json says 36"),
    "garbage index": (lambda r: (r / "store/index.jsonl").write_text("not json\n" * 36),
                      "line 1 is damaged"),
    "garbage meta": (lambda r: _meta(r).write_bytes(b"\xff\xfe{"), "meta.json: damaged"),
    "unparsable header": (lambda r: _unclose_header(r / "store/done.npy"), "not a .npy array"),
}


def _unclose_header(path: Path) -> None:
    """A header whose literal never closes (numpy raises tokenize.TokenError, found by the
    random-damage test below)."""
    data = path.read_bytes()
    end = data.index(b"}")
    path.write_bytes(data[:end + 1] + b" (" + data[end + 3:])


def _truncate(path: Path, share: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * share)])


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_every_damaged_store_is_one_line(mixture_run, case):
    run = imported(mixture_run)
    damage, fragment = DAMAGE[case]
    damage(run)
    one_line_error(invoke("report", "--run", run), fragment)
    res = invoke("select", "--run", run, "--budget", "0.25")
    if case != "garbage index":  # select reads the data, not the index's lines
        one_line_error(res, fragment)


@FAST
@given(target=st.sampled_from(["meta.json", "features.npy", "norms.npy", "loss.npy",
                               "ntokens.npy", "done.npy", "skipped.npy", "index.jsonl"]),
       how=st.sampled_from(["truncate", "garbage", "flip", "delete", "json"]),
       where=st.floats(0, 1), junk=st.binary(min_size=1, max_size=64),
       value=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(
                              st.text(max_size=5), c, max_size=3), max_leaves=8))
def test_random_damage_to_a_store_gives_a_tive_error_or_works(mixture_run, target, how, where,
                                                             junk, value):
    from tive import value_estimate

    run = mixture_run["run"]
    if not (run / "store").exists():
        imported(mixture_run)
    pristine = mixture_run["dir"] / "pristine"
    if not pristine.exists():
        shutil.copytree(run / "store", pristine)
    shutil.rmtree(run / "store")
    shutil.copytree(pristine, run / "store")
    path = run / "store" / target
    data = path.read_bytes()
    at = int(len(data) * where)
    if how == "truncate":
        path.write_bytes(data[:at])
    elif how == "garbage":
        path.write_bytes(data[:at] + junk)
    elif how == "flip":
        path.write_bytes(data[:at] + junk + data[at + len(junk):])
    elif how == "delete":
        path.unlink()
    else:
        path.write_text(json.dumps(value))
    try:
        value_estimate(store=run).select(0.25)
    except TiveError:
        pass  # one clear line; any other exception type fails the test


@FAST
@given(text=st.text(max_size=60) | st.binary(max_size=60).map(
    lambda b: b.decode("latin-1")), suffix=st.sampled_from([".json", ".jsonl"]))
def test_random_malformed_json_gives_a_data_error(tmp_path, text, suffix):
    path = tmp_path / f"mix{suffix}"
    path.write_text(text, encoding="utf-8")
    try:
        load_mixture(path)
    except DataError:
        pass


@FAST
@given(value=st.recursive(st.none() | st.booleans() | st.floats() | st.integers() |
                          st.text(max_size=8),
                          lambda c: st.lists(c, max_size=4) | st.dictionaries(
                              st.sampled_from(["id", "conversations", "from", "value", "image",
                                               "messages", "role", "content", "task", "x"]),
                              c, max_size=4), max_leaves=12))
def test_random_json_structures_give_a_data_error_or_a_mixture(tmp_path, value):
    path = tmp_path / "mix.json"
    path.write_text(json.dumps([value]), encoding="utf-8")
    try:
        load_mixture(path)
    except DataError:
        pass


@FAST
@given(cells=st.lists(st.one_of(st.none(), st.integers(), st.text(max_size=6)), min_size=1,
                      max_size=5))
def test_random_parquet_columns_give_a_data_error_or_a_mixture(tmp_path, cells):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "mix.parquet"
    pq.write_table(pa.table({"conversations": [str(c) if c is not None else None
                                               for c in cells]}), path)
    try:
        load_mixture(path)
    except DataError:
        pass


# --- (5) one writer per run folder ----------------------------------------------------------------

def test_a_second_writer_is_refused_naming_the_holder_and_readers_do_not_block(mixture_run):
    run = imported(mixture_run)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tive.util.files import run_lock\n"
         f"with run_lock({str(run)!r}, 'tive score'):\n"
         "    print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        d = mixture_run["dir"]
        res = invoke("import", "--data", mixture_run["data"], "--features", d / "features.npy",
                     "--norms", d / "norms.npy", "--run", run, "--force")
        one_line_error(res, f"{run}: in use by `tive score` (pid {holder.pid}", "fix: wait")
        assert invoke("select", "--run", run, "--budget", "0.25").exit_code == 0  # a reader
        assert invoke("report", "--run", run).exit_code == 0
    finally:
        holder.kill()
        holder.wait()
    res = invoke("import", "--data", mixture_run["data"], "--features",
                 mixture_run["dir"] / "features.npy", "--norms", mixture_run["dir"] / "norms.npy",
                 "--run", run, "--force")
    assert res.exit_code == 0, res.output  # the lock died with its process


def test_ranks_of_one_job_share_the_lock(tmp_path):
    from tive.util.dist import Dist

    with Dist(rank=0, world=1).exclusive(tmp_path / "run", "tive score"):
        with pytest.raises(ConfigError, match="in use by `tive score`"):
            with fileio.run_lock(tmp_path / "run", "tive warmup"):
                pass
        with fileio.run_lock(tmp_path / "run", "rank 1", take=False):  # other ranks: no lock
            pass


def test_adapter_identity_does_not_depend_on_the_order_of_names(tmp_path):
    from tive.scoring.identity import adapter_sha256

    for name, targets in (("a", ["q_proj", "v_proj", "k_proj"]), ("b", ["k_proj", "q_proj",
                                                                      "v_proj"])):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(
            {"r": 8, "target_modules": targets, "lora_alpha": 16}))
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
    assert adapter_sha256(tmp_path / "a") == adapter_sha256(tmp_path / "b")
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps(
        {"r": 4, "target_modules": ["q_proj"], "lora_alpha": 16}))
    assert adapter_sha256(tmp_path / "a") != adapter_sha256(tmp_path / "b")


# --- (6) replace windows and stale temporaries ----------------------------------------------------

def test_force_keeps_the_old_store_until_the_new_one_is_complete(mixture_run, monkeypatch):
    from tive.scoring import identity as score

    run = imported(mixture_run)
    old = tree(run / "store")
    mixture = load_mixture(mixture_run["data"])

    def dies(*args, **kwargs):
        raise OSError(errno.EIO, "killed while creating")

    monkeypatch.setattr(score, "create_store", dies)
    with pytest.raises(OSError):
        score.open_or_create(run / "store", {"identity": {"other": 1}}, mixture,
                             label_tasks(mixture).tasks, 8, "float16", force=True)
    assert tree(run / score.REPLACED_DIR) == old  # kept beside, not lost
    monkeypatch.undo()
    fresh = score.open_or_create(run / "store", {"identity": {"other": 1}, "projector": {},
                                                 "data": {"path": "x", "fingerprint": "f"}},
                                 mixture, label_tasks(mixture).tasks, 8, "float16", force=True)
    assert not fresh.complete and (run / score.REPLACED_DIR).exists()
    score.finish_replacement(fresh.root)
    assert not (run / score.REPLACED_DIR).exists()


def test_temporaries_of_killed_runs_are_removed_and_said(mixture_run):
    run = imported(mixture_run)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = run / f".subset-tive-0.25.json.pid{dead}.abc123.tmp"
    stale.mkdir()
    (stale / "subset-tive-0.25.json").write_text("[half")
    (stale / fileio.MARKER).write_bytes(b"")  # what atomic_path puts in every temporary
    mine = run / f".other.pid{os.getpid()}.xyz.tmp"  # a live process's: kept
    mine.mkdir()
    res = invoke("select", "--run", run, "--budget", "0.25")
    assert res.exit_code == 0, res.output
    assert "removed 1 temporary file(s) left by killed runs" in res.output
    assert not stale.exists() and mine.exists()
