"""Nothing outside the run is harmed by what tive writes.

Every output path (the subset, its ``.report.json``, ``.png`` and ``.html``, ``tive report
--html -o``, ``RUN/.lock``, the caches) is tried as a character device, a FIFO, a socket and a
symlink to a file outside the run; each case ends in one clean error or a correct result, and
a snapshot of everything outside the run (modes, device numbers, bytes, link targets) is the
same afterwards. Temporaries of killed runs are deleted only when tive can tell they are its
own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_faults import one_line_error  # noqa: F401  (shared with test_hostile_runs, _values)

from tive.cli.commands import main
from tive.util import files as fileio

KINDS = ("device", "fifo", "socket", "symlink")
FULL = (1, 7)  # /dev/full: a device that is not the null device, harmless if written
NULL = (1, 3)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@contextlib.contextmanager
def no_hang(seconds: int = 20):
    """Fail (instead of hanging the suite) when the block blocks, e.g. on opening a FIFO."""
    def fail(*_):
        raise TimeoutError(f"hung for {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def make_special(path: Path, kind: str, victim: Path | None = None,
                 device: tuple[int, int] = FULL) -> None:
    """``path`` made a device node, FIFO, socket or a symlink to ``victim``."""
    if kind == "device":
        try:
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(*device))
        except PermissionError:
            pytest.skip("mknod needs root")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        with contextlib.chdir(path.parent):  # a socket's path is at most 107 bytes
            s = socket.socket(socket.AF_UNIX)
            s.bind(path.name)
            s.close()
    else:
        path.symlink_to(victim)


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder``, not following symlinks: mode, device, bytes, target."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = os.lstat(p)
        body = (p.read_bytes() if stat.S_ISREG(st.st_mode)
                else os.readlink(p) if stat.S_ISLNK(st.st_mode) else None)
        out[str(p.relative_to(folder))] = (st.st_mode, st.st_rdev, body, st.st_mtime_ns)
    return out


@pytest.fixture
def world(imported, tmp_path):
    """An imported run, an output folder ``out`` and a folder ``outside`` with a victim file."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    return {**imported, "out": out, "outside": outside, "victim": outside / "victim"}


SLOTS = {"subset": "s.json", "report": "s.report.json", "chart": "s.png", "html": "s.html",
         "manifest": "s.manifest.json"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("slot", SLOTS)
def test_select_never_writes_over_a_special_file_or_through_a_symlink(world, slot, kind):
    out, outside = world["out"], world["outside"]
    make_special(out / SLOTS[slot], kind, world["victim"])
    before_out, before_outside = snapshot(out), snapshot(outside)
    with no_hang():
        res = invoke("select", "--run", world["run"], "--budget", "0.5", "-o", out / "s.json")
    assert snapshot(outside) == before_outside
    if kind == "symlink":  # the link is replaced by the file; what it pointed to is untouched
        assert res.exit_code == 0, res.output
        assert sorted(p.name for p in out.iterdir()) == sorted(SLOTS.values())
        assert all(not p.is_symlink() and p.is_file() for p in out.iterdir())
    else:
        one_line_error(res, str(out / SLOTS[slot]), "not a regular file", "nothing was written",
                       "fix:")
        assert snapshot(out) == before_out  # not even the other three


@pytest.mark.parametrize("kind", KINDS)
def test_report_html_never_writes_over_a_special_file(world, kind):
    out, outside = world["out"], world["outside"]
    make_special(out / "page.html", kind, world["victim"])
    before_out, before_outside = snapshot(out), snapshot(outside)
    with no_hang():
        res = invoke("report", "--run", world["run"], "--html", "-o", out / "page.html")
    assert snapshot(outside) == before_outside
    if kind == "symlink":
        assert res.exit_code == 0, res.output
        assert (out / "page.html").is_file() and not (out / "page.html").is_symlink()
    else:
        one_line_error(res, "page.html", "not a regular file", "fix:")
        assert snapshot(out) == before_out


def test_the_null_device_discards_every_output(world):
    out = world["out"]
    make_special(out / "null", "device", device=NULL)
    before = snapshot(out)
    res = invoke("select", "--run", world["run"], "--budget", "0.5", "-o", out / "null")
    assert res.exit_code == 0, res.output
    assert snapshot(out) == before  # still the device; no null.report.json, .png, .html
    assert "discarded" in res.output
    res = invoke("report", "--run", world["run"], "--html", "-o", out / "null")
    assert res.exit_code == 0, res.output
    assert snapshot(out) == before


@pytest.mark.parametrize("kind", KINDS)
def test_the_lock_is_never_followed_nor_written_over(world, kind):
    run, outside = world["run"], world["outside"]
    (run / ".lock").unlink()
    make_special(run / ".lock", kind, world["victim"])
    before = snapshot(outside)
    d = world["dir"]
    with no_hang():
        res = invoke("import", "--data", world["data"], "--features", d / "features.npy",
                     "--norms", d / "norms.npy", "--run", run, "--force")
    one_line_error(res, ".lock", "fix:")
    assert snapshot(outside) == before
    assert world["victim"].read_text() == "precious\n"


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)


def test_only_tives_own_stale_temporaries_are_deleted(world):
    out, outside, dead = world["out"], world["outside"], _dead_pid()
    users = out / f".s.json.pid{dead}.mine.tmp"  # named like one, holds the user's data
    users.mkdir()
    (users / "thesis.tex").write_text("years of work")
    (users / "more").mkdir()
    a_file = out / f".s.json.pid{dead}.file.tmp"  # tive never makes a temporary file
    a_file.write_text("user's")
    link = out / f".s.json.pid{dead}.link.tmp"  # a symlink to a folder outside
    link.symlink_to(outside, target_is_directory=True)
    forged = out / f".s.json.pid{dead}.forged.tmp"  # the marker beside user data: not ours
    forged.mkdir()
    (forged / fileio.MARKER).write_bytes(b"")
    (forged / "a").write_text("1")
    (forged / "b").write_text("2")
    ours = out / f".s.json.pid{dead}.ours.tmp"
    ours.mkdir()
    (ours / fileio.MARKER).write_bytes(b"")
    (ours / "s.json").write_text("[half")
    empty = out / f".s.json.pid{dead}.empty.tmp"  # killed before the marker was written
    empty.mkdir()
    before = snapshot(outside)
    res = invoke("select", "--run", world["run"], "--budget", "0.5", "-o", out / "s.json")
    assert res.exit_code == 0, res.output
    assert "removed 2 temporary file(s)" in res.output
    assert not ours.exists() and not empty.exists()
    assert (users / "thesis.tex").read_text() == "years of work" and (users / "more").is_dir()
    assert a_file.read_text() == "user's" and link.is_symlink() and len(list(forged.iterdir())) == 3
    assert snapshot(outside) == before


@pytest.mark.parametrize("kind", KINDS)
def test_a_cache_file_that_is_special_is_neither_read_nor_written_through(world, kind):
    run, outside = world["run"], world["outside"]
    res = invoke("select", "--run", run, "--budget", "0.5")
    assert res.exit_code == 0, res.output
    caches = sorted((run / "cache").glob("*.npz"))
    assert caches and any(p.name.startswith("mixture-") for p in caches)
    want = (run / "subset-tive-0.5.json").read_bytes()
    for cache in caches:
        cache.unlink()
        make_special(cache, kind, world["victim"])
    before = snapshot(outside)
    with no_hang():
        res = invoke("select", "--run", run, "--budget", "0.5")
    assert res.exit_code == 0, res.output
    assert (run / "subset-tive-0.5.json").read_bytes() == want
    assert snapshot(outside) == before
    assert "damaged cache" in res.stderr


def test_an_output_name_too_long_is_one_error(world):
    res = invoke("select", "--run", world["run"], "--budget", "0.5",
                 "-o", world["out"] / ("x" * 300 + ".json"))
    one_line_error(res, "fix:")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", ["store", "cache"])
def test_the_store_and_cache_folders_as_special_files(mixture_run, tmp_path, where, kind):
    run, d = mixture_run["run"], mixture_run["dir"]
    run.mkdir()
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "folder" / "meta.json").write_text("{}")
    make_special(run / where, kind, outside / "folder")
    before = snapshot(outside)
    with no_hang():
        res = invoke("import", "--data", mixture_run["data"], "--features", d / "features.npy",
                     "--norms", d / "norms.npy", "--run", run, "--force")
        if res.exit_code == 0:
            res = invoke("select", "--run", run, "--budget", "0.5")
    if res.exit_code != 0:
        one_line_error(res, where, "fix:")
    assert snapshot(outside) == before
