"""A newcomer's second hour (issue #24, part 3): what a new user tried next, each point one
test: model folders mistyped, --data checked before torch loads, the seeded methods in --help,
the example's prompts, .gitignore."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tive.cli.commands import main
from tive.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_a_mistyped_model_folder_is_said_not_to_exist(tmp_path, monkeypatch):
    from tive.models.registry import resolve

    (tmp_path / "examples" / "llava-smollm2").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for spec in ("examples/llava-smolm2", str(tmp_path / "examples/llava-smolm2"),
                 "./examples/llava-smolm2/x"):
        with pytest.raises(ConfigError) as e:
            resolve(spec)
        message = str(e.value)
        assert "does not exist" in message and "hf download" not in message, message
    assert "(it has llava-smollm2)" in message or "examples/llava-smolm2" in message
    with pytest.raises(ConfigError, match="hf download someone/model"):  # a hub id stays one
        resolve("someone/model")


def test_a_data_typo_is_reported_before_torch_loads(tmp_path):
    code = ("import sys; from tive.cli.commands import main\n"
            "try:\n    main(['score', '--model', 'smollm2-135m', '--data', 'nope.json'])\n"
            "except SystemExit as e:\n    print('torch' in sys.modules, e.code)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.stdout.split() == ["False", "2"], out.stdout + out.stderr
    assert out.stderr.strip() == ("error: nope.json: no such file or folder; expected a mixture "
                                  "(.json, .jsonl, .parquet or a datasets folder); fix: check "
                                  "the path and its spelling")


def test_select_help_names_every_seeded_method():
    from tive.selection.methods import METHODS

    res = CliRunner().invoke(main, ["select", "--help"], terminal_width=10_000)
    line = next(ln for ln in res.output.splitlines() if ln.strip().startswith("--seed"))
    named = set(re.findall(r"\b(tive-target|tive|random-per-task|random|balanced|kmeans|gradnorm|loss|"
                           r"length)\b", line))
    assert named == {m for m, spec in METHODS.items() if "seed" in spec.options}


def test_the_demo_run_folder_is_ignored():
    assert "tive-demo/" in (ROOT / ".gitignore").read_text().split()
