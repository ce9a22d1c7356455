"""What tripped a new user (issue #16): budgets, error fixes, light help, table columns."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from tive.cli.commands import WORKFLOW, main
from tive.errors import ConfigError, DataError
from tive.selection.settings import Budget


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + str(result.exception)
    return result


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("text, expected", [
    ("7.5", "write 7.5% for 7.5 percent"), ("1.0", "100% for the whole mixture, 1 for one record"),
    ("50000.0", "50000 for 50,000 records"), ("150%", "a percent is at most 100%")])
def test_a_decimal_of_one_or_more_is_refused_with_the_forms_it_may_mean(text, expected):
    with pytest.raises(ConfigError, match="--budget") as e:
        Budget.parse(text)
    assert expected in str(e.value)
    assert "fraction must be at most 1; for a record count write a fraction" not in str(e.value)


def test_the_three_budget_forms():
    assert (Budget.parse("0.15").value, Budget.parse("0.15").is_fraction) == (0.15, True)
    assert (Budget.parse("15%").value, Budget.parse("15%").is_fraction) == (0.15, True)
    assert (Budget.parse("1").value, Budget.parse("1").is_fraction) == (1.0, False)
    assert Budget.parse("100%").resolve(210) == 210


def test_budget_metavar_in_help():
    assert "--budget P|N|P%" in run("select", "--help").output


def test_oversampling_is_said(mixture_run):
    import numpy as np

    from tive.api import value_estimate

    d = mixture_run["dir"]
    report = value_estimate(features=np.load(d / "features.npy"), norms=np.load(d / "norms.npy"),
                            data=mixture_run["data"])
    sel = report.select(budget="100%")
    repeats = len(sel.indices) - len(np.unique(sel.indices))
    assert repeats > 0
    assert any(f"{repeats:,} of the 36 records are repeats" in n and "--no-oversample" in n
               for n in sel.notes)
    assert not any("repeats" in n for n in report.select(budget="100%", oversample=False).notes)


def test_random_table_has_no_value_or_quota_columns(mixture_run):
    import numpy as np

    from tive.api import value_estimate

    d = mixture_run["dir"]
    report = value_estimate(features=np.load(d / "features.npy"), norms=np.load(d / "norms.npy"),
                            data=mixture_run["data"])
    header = report.select(budget=10, method="random").table().splitlines()[0].split()
    assert header == ["task", "records", "selected", "share"]
    header = report.select(budget=10, method="random-per-task").table().splitlines()[0].split()
    assert header == ["task", "records", "quota", "selected", "share"]
    header = report.select(budget=10).table().splitlines()[0].split()
    assert header == ["task", "records", "value", "quota", "selected", "share"]


def test_an_image_given_as_data_is_named(tmp_path):
    from tive.data.mixture import load_mixture

    jpeg = tmp_path / "photo.jpg"
    jpeg.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(128, 256)) * 4)
    with pytest.raises(DataError, match="a JPEG image file, not a mixture") as e:
        load_mixture(jpeg)
    assert "UTF-8" not in str(e.value)


def test_tasks_on_a_missing_file_does_not_name_an_option(tmp_path):
    err = one_line_error(run("tasks", tmp_path / "nope.json", ok=False))
    assert "--data" not in err and "nope.json" in err and "check the path" in err


def test_doctor_names_the_cache_it_searched(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    out = run("doctor").output
    assert "pre-downloading" not in out
    assert "Hugging Face cache searched: " in out
    from huggingface_hub import constants

    assert constants.HF_HUB_CACHE in out


def test_help_lists_commands_in_workflow_order_without_cutting_them():
    out = run("--help").output
    listed = out.split("Commands:")[1].split()
    positions = [listed.index(c) for c in WORKFLOW]
    assert positions == sorted(positions)
    assert "..." not in out.split("Commands:")[1]


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; "
                          "print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["select", "--help"],
                                  ["score", "--help"]])
def test_help_and_version_do_not_import_torch_or_numpy(argv):
    loaded = _modules_after("from tive.cli.commands import main\n"
                            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass")
    assert not {"torch", "numpy", "transformers"} & loaded


def test_tasks_does_not_import_torch(mixture_run):
    loaded = _modules_after("from tive.cli.commands import main\n"
                            f"try:\n    main(['tasks', {str(mixture_run['data'])!r}])\n"
                            "except SystemExit:\n    pass")
    assert "tive.data.mixture" in loaded and "torch" not in loaded


def test_import_tive_is_light_and_still_exports():
    loaded = _modules_after("import tive")
    assert "numpy" not in loaded and "torch" not in loaded
    import tive

    assert callable(tive.value_estimate) and tive.Budget is Budget


def test_check_images_on_a_subset_uses_the_recorded_image_root(mixture_run, tmp_path):
    d = mixture_run["dir"]
    run("import", "--data", mixture_run["data"], "--features", d / "features.npy",
        "--norms", d / "norms.npy", "--run", tmp_path / "elsewhere")
    run("select", "--run", tmp_path / "elsewhere", "--budget", "0.5")
    subset = tmp_path / "elsewhere" / "subset-tive-0.5.json"
    out = run("tasks", subset, "--check-images").output
    assert f"images resolved against {mixture_run['data'].parent.resolve()}" in out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert total.split()[-1] == "0"  # no image missing
    lonely = tmp_path / "lonely.json"
    lonely.write_bytes(subset.read_bytes())
    out = run("tasks", lonely, "--check-images").output
    assert "pass --image-root FOLDER" in out


def test_warmup_progress_shows_steps_and_loading_is_quiet(tmp_path):
    import warnings

    import tive.models.load  # noqa: F401  (imported before, as in a notebook's second run)
    from test_warmup import image_mixture
    from zoo import save_llava_folder

    model_dir = tmp_path / "model"
    save_llava_folder(model_dir)
    data = image_mixture(tmp_path / "data")
    args = ["warmup", "--model", model_dir, "--data", data, "--run", tmp_path / "run",
            "--fraction", "1.0", "--global-batch", "6", "--lora-r", "4", "--lora-alpha", "8"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run(*args)
    assert "warm-up step 1/3" in res.stderr and "warm-up step 3/3" in res.stderr
    assert "loss=" in res.stderr
    assert "Loading weights" not in res.stderr  # transformers' own bar
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_scoring_bar_counts_estimated_tokens_so_longest_first_batches_do_not_skew_it():
    import io

    import numpy as np

    from tive.util.progress import TokenBar

    lengths = np.array([500, 480, 20, 10, 12, 8])
    batches = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]  # longest first
    out = io.StringIO()
    bar = TokenBar(batches, lengths, file=out, mininterval=0)
    bar.update(2)
    assert bar.bar.n == 980 and bar.bar.total == 1030  # 95% of the work, not 33% of records
    bar.update(2)
    bar.update(2)
    bar.close()
    assert bar.bar.n == 1030 and "records 6/6" in out.getvalue()
    # --batch-size auto cuts a planned batch in pieces: each advances by its share
    bar = TokenBar(batches, lengths, file=io.StringIO(), mininterval=0)
    bar.update(1)
    assert bar.bar.n == 490  # half of the first batch's 980 tokens
    bar.update(1)
    bar.update(4)
    assert bar.bar.n == 1030 and not bar._weights


@pytest.mark.parametrize("command", WORKFLOW)
def test_defaults_are_written_one_way(command):
    assert "(default" not in run(command, "--help").output


def test_report_lists_a_random_selection_without_value_or_quota(mixture_run):
    d = mixture_run["dir"]
    run("import", "--data", mixture_run["data"], "--features", d / "features.npy",
        "--norms", d / "norms.npy", "--run", mixture_run["run"])
    run("select", "--run", mixture_run["run"], "--budget", "10", "--method", "random")
    out = run("report", "--run", mixture_run["run"]).output
    listing = out.split("subset-random-10.report.json")[1].splitlines()
    assert listing[1].split() == ["task", "selected"]


def test_a_notebook_reuses_the_reference_the_cli_trained_by_a_relative_path(tmp_path,
                                                                          monkeypatch):
    from test_warmup import image_mixture
    from zoo import save_llava_folder

    import tive

    save_llava_folder(tmp_path / "model")
    data = image_mixture(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    run("score", "--model", "model", "--data", data, "--run", "out", "--lora-r", "4",
        "--lora-alpha", "8", "--warmup-global-batch", "6", "--quiet")
    features = tmp_path / "out" / "store" / "features.npy"
    scored = (features.stat().st_mtime_ns, features.read_bytes())
    with pytest.raises(tive.ConfigError, match="other settings"):  # still refused when other
        tive.value_estimate(model=str(tmp_path / "model"), data=data, run=tmp_path / "out",
                            warmup={"r": 8, "alpha": 16, "global_batch": 6}, progress=False)
    report = tive.value_estimate(model=str(tmp_path / "model"), data=data, run=tmp_path / "out",
                                 warmup={"r": 4, "alpha": 8, "global_batch": 6}, progress=False)
    assert len(report.tasks) == 18
    assert (features.stat().st_mtime_ns, features.read_bytes()) == scored  # reused, not redone
