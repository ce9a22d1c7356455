"""The HTML page of a selection: self-contained, complete, and rendered by a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
from click.testing import CliRunner

from tive.cli.commands import main
from tive.output.page import CHOSEN, EXAMPLES, write_html

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def cli(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + str(result.exception)
    return result


def chromium() -> str:
    """Debian's chromium, installed with apt-get when absent (as root); else the test skips."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if shutil.which("chromium"):
            return shutil.which("chromium")
    pytest.skip("no Chromium and it cannot be installed here (apt-get as root)")


@pytest.fixture
def selected(mixture_run):
    """A store of the conftest mixture with real (decodable) PNG images, and a selection
    excluding one task, written by `tive select` (which writes the page beside it)."""
    from PIL import Image

    for png in mixture_run["data"].parent.rglob("*.png"):
        shade = sum(png.name.encode()) % 200
        Image.new("RGB", (40, 30), (shade, 80, 255 - shade)).save(png)
    d = mixture_run["dir"]
    cli("import", "--data", mixture_run["data"], "--features", d / "features.npy",
        "--norms", d / "norms.npy", "--run", mixture_run["run"])
    cli("select", "--run", mixture_run["run"], "--budget", "30%", "--exclude-task", "vg")
    return {**mixture_run, "html": mixture_run["run"] / "subset-tive-0.3.html"}


def test_select_writes_a_self_contained_page(selected):
    page = selected["html"].read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", page)  # nothing from a network
    assert "<tr class=excluded><td>vg</td>" in page and "vg (excluded)" in page
    for task in ("llava_instruct", "vqav2", "gqa", "sharegpt", "vg"):
        assert f"<h3>{task}" in page
    assert page.count("<svg") == 5  # a histogram per task
    assert page.count("data:image/png;base64,") == 1  # the bar chart
    # images: every card of an image task has its thumbnail (selected, 5 highest, 5 lowest)
    cards = 0
    for task in ("llava_instruct", "vqav2", "gqa", "vg"):
        cards += page.split(f"<h3>{task}")[1].split("<div class=task>")[0].count("class='rec ")
    assert cards > 10 + 9 + 7 + 3 and page.count("data:image/jpeg;base64,") == cards
    report = json.loads((selected["run"] / "subset-tive-0.3.report.json").read_text())
    shown = sum(int(n) for n in re.findall(r"selected: all (\d+)", page))
    assert 0 < shown == sum(t["unique"] for t in report["tasks"].values())
    assert page.count("class='rec kept'") >= shown
    assert "Describe the image in detail." in page  # the conversation as trained
    assert report["source"]["image_root"] == str(selected["data"].parent.resolve())


def test_examples_are_the_highest_and_lowest_values(selected):
    from tive.api import value_estimate

    report = value_estimate(store=selected["run"])
    sel = report.select(budget="30%", exclude=["vg"])
    out = selected["run"] / "again.html"
    report.features = None  # the page never reads the features
    write_html(report, sel, out)
    page = out.read_text(encoding="utf-8")
    rows = report.members("llava_instruct")
    order = rows[np.argsort(-report.instance_values[rows], kind="stable")]
    section = page.split("<h3>llava_instruct")[1].split("<div class=task>")[0]
    shown = [int(r) for r in re.findall(r"row (\d+), id", section)]
    chosen = [int(r) for r in order if r in set(sel.indices.tolist())]  # all, highest first
    assert 0 < len(chosen) <= CHOSEN and f"selected: all {len(chosen)}" in section
    assert shown == chosen + list(order[:EXAMPLES]) + list(order[-EXAMPLES:])


def test_the_settings_line_the_draw_note_and_a_baselines_columns(selected):
    page = selected["html"].read_text(encoding="utf-8")
    settings = re.search(r"<th>settings</th><td>([^<]*)</td>", page).group(1)
    assert "seed 0" in settings and "exclude vg" in settings and "[" not in settings
    note = re.search(r"<th>within-task draw</th><td>([^<]*)</td>", page).group(1)
    assert note.startswith("τ = 1000: within a task the weights exp(v/τ) of the most and the "
                           "least valuable record differ by at most 0.")
    assert "nearly uniform" in note
    cli("select", "--run", selected["run"], "--budget", "30%", "--method", "random")
    page = (selected["run"] / "subset-random-0.3.html").read_text(encoding="utf-8")
    header = re.search(r"<h2>Tasks</h2><table><tr>(.*?)</tr>", page).group(1)
    assert re.findall(r"<th>([^<]*)</th>", header) == [
        "task", "records", "valid", "selected", "distinct", "share before → after"]
    assert "within-task draw" not in page
    cli("select", "--run", selected["run"], "--budget", "30%", "--temperature", "0.01")
    page = (selected["run"] / "subset-tive-0.3.html").read_text(encoding="utf-8")
    note = re.search(r"<th>within-task draw</th><td>([^<]*)</td>", page).group(1)
    assert note.startswith("τ = 0.01: ") and "nearly uniform" not in note


def test_many_selected_records_are_shown_spread_over_their_values(selected, monkeypatch):
    from tive.api import value_estimate
    from tive.output import page as page_module

    monkeypatch.setattr(page_module, "CHOSEN", 4)  # the tasks here are small

    report = value_estimate(store=selected["run"])
    sel = report.select(budget="90%", method="random", seed=1)
    out = selected["run"] / "many.html"
    write_html(report, sel, out)
    page = out.read_text(encoding="utf-8")
    rows = report.members("llava_instruct")
    chosen = rows[np.isin(rows, sel.indices)]
    order = chosen[np.argsort(-report.instance_values[chosen], kind="stable")]
    assert len(order) > 4
    section = page.split("<h3>llava_instruct")[1].split("<div class=task>")[0]
    assert f"selected: {4} of {len(order)}, evenly spaced" in section
    shown = [int(r) for r in re.findall(r"row (\d+), id", section)][:4]
    assert shown[0] == order[0] and shown[-1] == order[-1] and len(set(shown)) == 4


def test_report_html_rebuilds_the_selection_page(selected, tmp_path):
    out = tmp_path / "page.html"
    cli("report", "--run", selected["run"], "--html", "-o", out)
    strip = lambda p: p.read_text(encoding="utf-8").replace("\n", "")  # noqa: E731
    assert strip(out) == strip(selected["html"])
    res = cli("report", "--run", selected["run"], "-o", out, ok=False)
    assert res.exit_code == 2 and "--html" in res.output


def test_report_html_without_a_selection_shows_values(mixture_run, tmp_path):
    d = mixture_run["dir"]
    cli("import", "--data", mixture_run["data"], "--features", d / "features.npy",
        "--norms", d / "norms.npy", "--run", mixture_run["run"])
    cli("report", "--run", mixture_run["run"], "--html")
    page = (mixture_run["run"] / "values.html").read_text(encoding="utf-8")
    assert "<h3>gqa" in page and "not selected" in page and "quota" not in page


def test_the_page_renders_in_chromium_with_images_and_no_console_error(selected, tmp_path):
    browser = chromium()
    url = selected["html"].resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        res = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                              "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
                              "--dump-dom", url], capture_output=True, text=True, timeout=180)
    body = re.search(r"<body[^>]*>", res.stdout)
    assert body, res.stderr[-2000:]
    loaded = re.search(r'data-images-loaded="(\d+)"', body.group(0))
    broken = re.search(r'data-images-broken="(\d+)"', body.group(0))
    assert loaded and broken, body.group(0)  # the page's script ran
    page = selected["html"].read_text(encoding="utf-8")  # the chart and every thumbnail
    assert int(broken.group(1)) == 0
    assert int(loaded.group(1)) == 1 + page.count("data:image/jpeg;base64,") > 1 + 10 + 9 + 7 + 3
    console = [line for line in res.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    shot = tmp_path / "page.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                        f"--screenshot={shot}", "--window-size=1280,2000", url],
                       capture_output=True, timeout=180)
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000
