"""``--paper``: the TIVE authors' run exactly, where tive otherwise has a choice.

The selection expectations are derived by hand from the authors' ``select_data_TIVE.py``:
``ds_size = V(t) / ΣV · p·N`` over the tasks other than textcaps, then ``int(ds_size)``
records (a task smaller than that: whole ``int(ds_size // |t|)`` times plus
``int(ds_size % |t|)`` drawn, which is ``int(ds_size)`` in all).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import tive
from tive.cli.commands import main
from tive.errors import ConfigError
from tive.scoring.settings import ScoreConfig
from tive.selection.settings import SelectConfig
from tive.warmup.settings import WarmupConfig

# task -> (records, exact gradient norm of each): N = 40, textcaps excluded from valuation
SIZES = {"a": (10, 1.0), "b": (10, 2.0), "c": (3, 3.0), "textcaps": (17, 9.0)}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def authors_run(tmp_path):
    """A mixture with a ``dataset`` field, imported from the authors' own output files."""
    records, norms = [], []
    for task, (n, norm) in SIZES.items():
        for j in range(n):
            records.append({"id": f"{task}-{j}", "dataset": task, "conversations": [
                {"from": "human", "value": f"Question {j} of {task}?"},
                {"from": "gpt", "value": f"Answer {j}."}]})
            norms.append(norm)
    data = tmp_path / "mix.json"
    data.write_text(json.dumps(records))
    feats = np.random.default_rng(0).normal(size=(len(records), 8)).astype(np.float32)
    out = tmp_path / "authors"
    out.mkdir()
    for c, (a, b) in enumerate([(0, 25), (25, 40)]):  # two chunks, as their 8-GPU run wrote
        torch.save([torch.from_numpy(feats[a:b]).half()], out / f"output_{c}")
        (out / f"output_norm_{c}.json").write_text(json.dumps(norms[a:b]))
    res = invoke("import", "--data", data, "--tive-outputs", out, "--run", tmp_path / "run")
    assert res.exit_code == 0, res.output
    return tmp_path / "run"


def test_select_paper_gives_the_authors_truncated_quotas(authors_run):
    res = invoke("select", "--run", authors_run, "--budget", "0.25", "--paper")
    assert res.exit_code == 0, res.output + str(res.exception)
    report = json.loads(next(authors_run.glob("*.report.json")).read_text())
    # B = 10.0; V = 1, 2, 3 over a, b, c: 10/6 → 1, 20/6 → 3, 30/6 = 5.0 → 5 (c has 3: whole
    # task once, 2 more drawn)
    assert {t: e["quota"] for t, e in report["tasks"].items() if not e["excluded"]} == \
        {"a": 1, "b": 3, "c": 5}
    assert {t: e["selected"] for t, e in report["tasks"].items()} == \
        {"a": 1, "b": 3, "c": 5, "textcaps": 0}
    assert report["tasks"]["c"]["unique"] == 3
    assert report["tasks"]["textcaps"]["excluded"] is True
    assert report["selected"] == 9 and report["budget"] == 10
    assert report["settings"]["paper"] is True
    assert report["settings"]["temperature"] == 1000.0 and report["settings"]["strategy"] == "soft"
    assert "1 short of the budget" in res.output


def test_without_paper_quotas_fill_the_budget_and_textcaps_gets_a_note(authors_run):
    res = invoke("select", "--run", authors_run, "--budget", "0.25")
    assert res.exit_code == 0, res.output
    assert "the TIVE authors left textcaps out" in res.output and "--exclude-task textcaps" \
        in res.output
    res = invoke("select", "--run", authors_run, "--budget", "0.25", "--exclude-task",
                 "textcaps", "-o", authors_run / "exact.json")
    assert res.exit_code == 0 and "authors left textcaps" not in res.output
    report = json.loads((authors_run / "exact.report.json").read_text())
    # largest remainder: 1.67, 3.33, 5 → 2, 3, 5 = B exactly
    assert {t: e["quota"] for t, e in report["tasks"].items() if not e["excluded"]} == \
        {"a": 2, "b": 3, "c": 5}
    assert report["settings"]["paper"] is False


def test_api_paper_selects_as_the_cli_does(authors_run):
    report = tive.value_estimate(store=authors_run, paper=True)
    chosen = report.select(0.25)
    assert chosen.quotas == {"a": 1, "b": 3, "c": 5} and len(chosen.indices) == 9
    assert len(report.select(0.25, paper=False, exclude=["textcaps"]).indices) == 10


@pytest.mark.parametrize("extra, fragment", [
    (["--method", "random"], "--method random: --paper selects as the authors did"),
    (["--strategy", "top"], "--strategy top: --paper"),
    (["--temperature", "10"], "--temperature 10.0: --paper"),
    (["--no-oversample"], "--oversample False: --paper"),
])
def test_select_paper_refuses_other_settings(authors_run, extra, fragment):
    res = invoke("select", "--run", authors_run, "--budget", "0.25", "--paper", *extra)
    assert res.exit_code == 2 and fragment in res.stderr, res.output
    assert "\n" not in res.stderr.strip()


def test_paper_settings_of_scoring_and_warmup():
    config = ScoreConfig(paper=True)
    assert (config.projector, config.proj_dim, config.seed, config.feature_dtype) == \
        ("trak", 8192, 0, "float16")
    assert ScoreConfig().projector == "sparse-jl" and ScoreConfig().feature_dtype == "float16"
    for bad, fragment in ((dict(projector="sparse-jl"), "--projector sparse-jl"),
                          (dict(proj_dim=4096), "--proj-dim 4096"), (dict(seed=1), "--seed 1"),
                          (dict(feature_dtype="float32"), "--feature-dtype float32"),
                          (dict(jl_nnz=2), "--jl-nnz")):
        with pytest.raises(ConfigError, match=fragment):
            ScoreConfig(paper=True, **bad)
    assert WarmupConfig(paper=True).bf16 is True
    assert WarmupConfig(paper=True, lr=2e-5, seed=3).seed == 3  # the seed is not the recipe's
    for bad in (dict(lr=2e-4), dict(global_batch=4), dict(r=8), dict(train_projector=False),
                dict(targets=("q_proj",)), dict(fraction=0.5)):
        with pytest.raises(ConfigError, match="--paper trains with the authors' value"):
            WarmupConfig(paper=True, **bad)
    assert SelectConfig(budget=0.1, paper=True).oversample is True


def test_paper_on_a_gpu_without_trak_kernel_is_refused_with_the_install_command(monkeypatch):
    from tive.projection import projectors as projection

    monkeypatch.setattr(projection, "_fast_jl", lambda: False)
    with pytest.raises(ConfigError, match="TORCH_CUDA_ARCH_LIST=.*pip install "
                                          "--no-build-isolation fast_jl"):
        projection.require_cuda_kernel(torch.device("cuda"))
    projection.require_cuda_kernel(torch.device("cpu"))  # CPU: TRAK's CPU projector, warned
    monkeypatch.setattr(projection, "_fast_jl", lambda: True)
    projection.require_cuda_kernel(torch.device("cuda"))


def test_score_paper_refuses_another_projector_on_the_command_line(tmp_path):
    data = tmp_path / "mix.json"
    data.write_text("[]")
    res = invoke("score", "--model", "smollm2-135m", "--data", data, "--paper", "--projector",
                 "sparse-jl")
    assert res.exit_code == 2 and "--projector sparse-jl: --paper scores with the authors' " \
        "trak" in res.stderr
    res = invoke("score", "--model", "smollm2-135m", "--data", data, "--paper",
                 "--warmup-lr", "1e-4")
    assert res.exit_code == 2 and "--paper trains with the authors' value (2e-05)" in res.stderr


def test_paper_computes_gradients_in_the_authors_float16_or_says_why_not():
    """Their finetune_lora.sh trained in bf16, their utils.py loaded the model in fp16."""
    from tive.scoring.settings import paper_dtypes

    assert paper_dtypes("auto", "cuda")[:2] == ("bf16", "fp16")
    assert paper_dtypes("fp16", "cpu")[:2] == ("bf16", "fp16")  # insisted on
    warm, score, line = paper_dtypes("auto", "cpu")
    assert (warm, score) == ("auto", "auto") and line.startswith(
        "--paper on a CPU: the weights in float32, not the authors' float16")
    for other in ("bf16", "fp32"):
        with pytest.raises(ConfigError, match=f"--dtype {other}: --paper computes the gradients "
                                              f"in the authors' float16"):
            paper_dtypes(other, "cuda")
