"""Every file of a run folder damaged in every way: one clean error or a correct result, never
a traceback, a hang, or a change outside the run.

The run folder is one made by ``tive import`` and ``tive select`` (store, caches, a selection's
four files, the lock). Each file is truncated, bit-flipped, given JSON of the wrong type,
replaced by a symlink to a file outside the run, a FIFO (under an alarm: opening one must not
block) or a character device; then ``tive select`` and ``tive report --html`` run on it. A
damaged cache or a damaged earlier selection gives the same subset as an intact run; a damaged
store file gives one line naming the file and the fix; ``tive import --force`` and ``tive
score --force`` replace a damaged store.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_hostile_outputs import make_special, no_hang, one_line_error, snapshot

from tive.cli.commands import main

DAMAGES = ("truncate", "bitflip", "json-type", "symlink", "fifo", "device")
STORE = ("meta.json", "features.npy", "norms.npy", "loss.npy", "ntokens.npy", "done.npy",
         "skipped.npy", "index.jsonl")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An imported run with one selection made (store, caches, four outputs), and its subset."""
    import conftest

    folder = tmp_path_factory.mktemp("hostile")
    records = conftest.llava_records()
    data = conftest.write_mixture(folder / "data", records)
    feats, norms = conftest.task_features([r["id"].rsplit("-", 1)[0] for r in records])
    np.save(folder / "features.npy", feats.astype(np.float32))
    np.save(folder / "norms.npy", norms)
    run = folder / "run"
    res = invoke("import", "--data", data, "--features", folder / "features.npy", "--norms",
                 folder / "norms.npy", "--run", run)
    assert res.exit_code == 0, res.output
    res = invoke("select", "--run", run, "--budget", "0.5")
    assert res.exit_code == 0, res.output
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert {f"store/{n}" for n in STORE} <= set(files) and any(
        f.startswith("cache/mixture-") for f in files) and any(
        f.startswith("cache/values-") for f in files) and ".lock" in files
    return {"folder": folder, "data": data, "run": run, "files": files,
            "subset": (run / "subset-tive-0.5.json").read_bytes()}


def damage(path: Path, how: str, victim: Path) -> None:
    body = path.read_bytes()
    if how == "truncate":
        path.write_bytes(body[: len(body) // 2])
    elif how == "bitflip":
        at = len(body) // 2
        path.write_bytes(body[:at] + bytes([body[at] ^ 0x10]) + body[at + 1:])
    elif how == "json-type":
        path.write_text(json.dumps(["a", 1]) if path.suffix != ".json" else '"a string"')
    else:
        path.unlink()
        make_special(path, {"symlink": "symlink", "fifo": "fifo", "device": "device"}[how],
                     victim)


def _files():
    """The files of the base run (names with the cache keys replaced by patterns)."""
    return [*(f"store/{n}" for n in STORE), "cache/mixture-*", "cache/values-*",
            "subset-tive-0.5.json", "subset-tive-0.5.report.json", "subset-tive-0.5.png",
            "subset-tive-0.5.html", ".lock"]


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", _files())
def test_every_run_file_damaged_every_way(base, tmp_path, name, how):
    run = tmp_path / "run"
    shutil.copytree(base["run"], run, symlinks=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"precious\n" * 100)
    (path,) = sorted(run.glob(name))
    damage(path, how, victim)
    before = snapshot(outside)
    in_store = name.startswith("store/")
    with no_hang():
        sel = invoke("select", "--run", run, "--budget", "0.5", "-o", tmp_path / "s.json")
        page = invoke("report", "--run", run, *(() if in_store else  # the table is cheaper
                                                 ("--html", "-o", tmp_path / "p.html")))
    assert snapshot(outside) == before
    for res in (sel, page):
        assert res.exit_code in (0, 2), (res.output, res.exception)
        if res.exit_code == 2:
            one_line_error(res, "fix:")
    if not in_store or name == "store/loss.npy" and how == "bitflip":
        # caches, earlier outputs and the lock are not inputs of a selection
        assert sel.exit_code == 0, sel.output
        assert (tmp_path / "s.json").read_bytes() == base["subset"]
    elif sel.exit_code == 2:
        one_line_error(sel, "fix:", name.split("/")[1])


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", STORE)
def test_import_force_replaces_a_damaged_store(base, tmp_path, name, how):
    run = tmp_path / "run"
    shutil.copytree(base["run"], run, symlinks=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("precious")
    damage(run / "store" / name, how, outside / "victim")
    before = snapshot(outside)
    folder = base["folder"]
    with no_hang():
        res = invoke("import", "--data", base["data"], "--features", folder / "features.npy",
                     "--norms", folder / "norms.npy", "--run", run, "--force")
        assert res.exit_code == 0, res.output
        sel = invoke("select", "--run", run, "--budget", "0.5", "-o", tmp_path / "s.json")
    assert sel.exit_code == 0, sel.output
    assert (tmp_path / "s.json").read_bytes() == base["subset"]
    assert snapshot(outside) == before


def test_a_foreign_report_json_in_the_run_does_not_break_report(base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base["run"], run, symlinks=True)
    (run / "notes.report.json").write_text('{"my": "notes"}')
    os.utime(run / "notes.report.json")  # the newest
    res = invoke("report", "--run", run, "--html", "-o", tmp_path / "p.html")
    assert res.exit_code in (0, 2), res.output
    if res.exit_code == 2:
        one_line_error(res, "notes.report.json", "fix:")
    res = invoke("report", "--run", run)
    assert res.exit_code == 0, res.output


def test_score_force_replaces_a_damaged_store(tmp_path):
    from test_score import SMALL, text_mixture
    from zoo import save_llava_folder

    from tive.store.format import Store

    model = tmp_path / "model"
    model.mkdir()
    save_llava_folder(model)
    data = text_mixture(tmp_path / "data", 6)
    run = tmp_path / "run"
    args = ["score", "--model", model, "--data", data, "--run", run, "--proj-dim", 16, *SMALL]
    assert invoke(*args).exit_code == 0
    want = {n: (run / "store" / n).read_bytes() for n in STORE if n != "meta.json"}
    for name, how in (("features.npy", "truncate"),):  # the others: import --force above
        damage(run / "store" / name, how, tmp_path / "nowhere")
        with no_hang():
            res = invoke(*args)
            one_line_error(res, name, "fix:")
            res = invoke(*args, "--force")
        assert res.exit_code == 0, res.output + repr(res.exception)
        assert Store.open(run).complete and not (run / ".store.replaced").exists()
        assert {n: (run / "store" / n).read_bytes() for n in want} == want


# --- signals ------------------------------------------------------------------------------------

@pytest.mark.parametrize("how, code, word", [("int", 130, "interrupted"),
                                             ("term", 143, "terminated")])
def test_sigint_and_sigterm_say_what_was_kept_in_one_line(base, tmp_path, monkeypatch, how,
                                                          code, word):
    import signal
    import time

    import tive.api

    def stopped(*args, **kwargs):
        if how == "int":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises at once

    monkeypatch.setattr(tive.api, "value_estimate", stopped)
    old = signal.getsignal(signal.SIGTERM)
    res = invoke("select", "--run", base["run"], "--budget", "0.5", "-o", tmp_path / "s.json")
    assert signal.getsignal(signal.SIGTERM) == old  # put back
    assert res.exit_code == code, (res.output, res.exception)
    err = res.stderr.strip()
    assert err == f"{word}: nothing was written (outputs appear whole or not at all); run the " \
                  f"same command again"
    assert "Aborted" not in res.output and not (tmp_path / "s.json").exists()


def _sigint_default() -> None:
    """In the child: SIGINT's default action, so that Python raises KeyboardInterrupt on it. A
    suite started in the background (``pytest &`` in a script) has SIGINT ignored, and an
    ignored signal is inherited: the child would never see it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_score_interrupted_says_it_resumes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from test_score import SMALL, text_mixture
    from zoo import save_llava_folder

    model = tmp_path / "model"
    model.mkdir()
    save_llava_folder(model)
    data = text_mixture(tmp_path / "data", 12)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "tive", "score", "--model", str(model),
                             "--data", str(data), "--run", str(run), "--proj-dim", "16",
                             "--batch-size", "1", *SMALL], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default)
    deadline = time.monotonic() + 120
    while not (run / ".lock").exists() and time.monotonic() < deadline:  # started: locked
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and "resume" in last and "Traceback" not in err
