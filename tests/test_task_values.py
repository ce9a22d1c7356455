"""``--task-value``: the authors' ``norm`` and the two variants, against brute-force pairwise
computations, through the API, the CLI and a store's cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TOL, TOL32
from hypothesis import given, settings
from hypothesis import strategies as st

from tive import value_estimate
from tive.cli.commands import main
from tive.errors import ConfigError
from tive.selection import values as val


def pair_means(features: np.ndarray, norms: np.ndarray, codes: np.ndarray, valid: np.ndarray,
               n_tasks: int) -> tuple[np.ndarray, np.ndarray]:
    """O(N²) by hand: per task, the mean over ordered pairs i≠j of valid records of
    cos(φ_i, φ_j) (coherence) and of ‖g_i‖‖g_j‖cos(φ_i, φ_j) (mean-gradient², then √), both
    clipped at 0; 0 for one record, NaN for none."""
    f = features.astype(np.float64)
    fn = np.linalg.norm(f, axis=1)
    coherence, mean_grad = np.full(n_tasks, np.nan), np.full(n_tasks, np.nan)
    for t in range(n_tasks):
        rows = np.flatnonzero(valid & (codes == t))
        if len(rows) == 0:
            continue
        cos, dots = [], []
        for i in rows:
            for j in rows:
                if i != j:
                    c = 0.0 if fn[i] * fn[j] == 0 else float(f[i] @ f[j]) / (fn[i] * fn[j])
                    cos.append(c)
                    dots.append(norms[i] * norms[j] * c)
        coherence[t] = max(0.0, np.mean(cos)) if cos else 0.0
        mean_grad[t] = np.sqrt(max(0.0, np.mean(dots))) if dots else 0.0
    return coherence, mean_grad


@st.composite
def problems(draw):
    n, k, t = draw(st.integers(1, 30)), draw(st.integers(1, 10)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    shift = draw(st.floats(0, 3))  # 0: unrelated directions; larger: coherent tasks
    codes = rng.integers(0, t, size=n)
    centres = rng.normal(size=(t, k)) * shift
    feats = centres[codes] + rng.normal(size=(n, k))
    if draw(st.booleans()):
        feats[rng.integers(0, n)] = 0.0  # a zero row: cosine 0 with everything
    norms = rng.uniform(0.1, 5.0, size=n)  # a zero feature may come with a non-zero norm
    if draw(st.booleans()):
        norms[np.linalg.norm(feats, axis=1) == 0] = 0.0
    valid = rng.random(n) > 0.2
    return feats, norms, codes, valid, t


@given(problems())
@settings(max_examples=60, deadline=None)
def test_variants_equal_brute_force_pairwise_means(problem):
    feats, norms, codes, valid, t = problem
    want_c, want_m = pair_means(feats, norms, codes, valid, t)
    counts = np.bincount(codes[valid], minlength=t)
    got_c = val.coherence_values(*val.weighted_unit_sums(feats, np.ones(len(feats)), codes, t,
                                                         valid, chunk_rows=7), counts)
    sums, squares = val.weighted_unit_sums(feats, norms, codes, t, valid, chunk_rows=7)
    got_m = val.mean_gradient_values(sums, squares, counts)
    scale_m = max(1.0, float(np.nanmax(np.abs(want_m), initial=0)))
    np.testing.assert_allclose(got_c, want_c, rtol=0, atol=1e-8, equal_nan=True)
    np.testing.assert_allclose(got_m, want_m, rtol=0, atol=1e-6 * scale_m, equal_nan=True)


def test_variants_by_hand_on_three_records():
    # task 0: φ = (1,0), (1,0), (0,1) with norms 1, 2, 3; task 1: a single record
    feats = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 5.0], [1.0, 1.0]])
    norms = np.array([1.0, 2.0, 3.0, 4.0])
    codes, valid = np.array([0, 0, 0, 1]), np.ones(4, dtype=bool)
    ones = val.weighted_unit_sums(feats, np.ones(4), codes, 2, valid)
    coherence = val.coherence_values(*ones, np.array([3, 1]))
    # pairs (0,1) cos 1, (0,2) 0, (1,2) 0, each twice: 2/6
    np.testing.assert_allclose(coherence, [2 / 6, 0.0], atol=TOL)
    sums, squares = val.weighted_unit_sums(feats, norms, codes, 2, valid)
    mg = val.mean_gradient_values(sums, squares, np.array([3, 1]))
    # Σ_{i≠j} ‖g_i‖‖g_j‖cos = 2·(1·2·1) = 4 over 6 ordered pairs
    np.testing.assert_allclose(mg, [np.sqrt(4 / 6), 0.0], atol=TOL)
    np.testing.assert_allclose(val.task_values(norms, codes, 2, valid), [2.0, 4.0], atol=TOL)


def unlearnable_mixture(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``hard``: large gradients in unrelated directions (a task the model cannot learn);
    ``easy``: small gradients that agree; ``mid``: between."""
    rng = np.random.default_rng(seed)
    k = 256  # projected directions of unrelated records have cosines of about ±1/√k
    direction = {t: rng.normal(size=k) for t in ("easy", "mid")}
    rows, norms, tasks = [], [], []
    for t, n, norm, spread in (("hard", 20, 30.0, None), ("easy", 40, 2.0, 0.3),
                               ("mid", 40, 5.0, 1.0)):
        for _ in range(n):
            noise = rng.normal(size=k)
            rows.append(noise if spread is None else direction[t] + spread * noise)
            norms.append(norm * rng.uniform(0.9, 1.1))
            tasks.append(t)
    return np.array(rows, dtype=np.float32), np.array(norms), tasks


def test_variants_do_not_reward_a_task_whose_gradients_disagree():
    feats, norms, tasks = unlearnable_mixture()
    quotas = {kind: value_estimate(features=feats, norms=norms, tasks=tasks, task_value=kind)
              .select(budget=30, seed=0).quotas for kind in ("norm", "coherence", "mean-gradient")}
    assert quotas["norm"]["hard"] > 15  # the authors' values give it most of the budget
    for kind in ("coherence", "mean-gradient"):
        q = quotas[kind]
        assert q["hard"] <= 5 and q["hard"] < min(q["easy"], q["mid"]), (kind, q)


def test_norm_is_todays_selection_exactly(mixture_run):
    kwargs = dict(features=mixture_run["features"], norms=mixture_run["norms"],
                  data=mixture_run["data"])
    plain = value_estimate(**kwargs)
    named = value_estimate(**kwargs, task_value="norm")
    assert plain.task_value == named.task_value == "norm"
    assert plain.task_values == named.task_values
    for budget, extra in ((0.5, {}), (20, {"strategy": "top"}), (0.3, {"seed": 3}),
                          (0.8, {"oversample": False})):
        want = plain.select(budget=budget, **extra)
        for got in (plain.select(budget=budget, task_value="norm", **extra),
                    named.select(budget=budget, **extra),
                    value_estimate(**kwargs, task_value="coherence")
                    .select(budget=budget, task_value="norm", **extra)):
            assert got.indices.tolist() == want.indices.tolist()
            assert got.quotas == want.quotas
    # and the quotas are the authors' V(t) = mean norm, shared by largest remainder
    s = plain.select(budget=0.5)
    means = {t: mixture_run["norms"][np.array(mixture_run["tasks"]) == t].mean()
             for t in plain.task_names}
    total = sum(means.values())
    assert all(abs(q - len(s.indices) * means[t] / total) < 1 for t, q in s.quotas.items())


def test_selection_weighs_by_the_report_kind_and_records_it(mixture_run, tmp_path):
    r = value_estimate(features=mixture_run["features"], norms=mixture_run["norms"],
                       data=mixture_run["data"], task_value="coherence")
    s = r.select(budget=0.5)
    assert s.config.task_value == "coherence"
    total = sum(r.task_values.values())
    assert all(abs(q - len(s.indices) * r.task_values[t] / total) < 1
               for t, q in s.quotas.items())
    saved = s.save(tmp_path / "subset.json")
    d = json.loads(saved["report"].read_text())
    assert d["settings"]["task_value"] == "coherence"
    assert {t: e["value"] for t, e in d["tasks"].items()} == pytest.approx(r.task_values)
    assert "value (coherence)" in r.table()
    other = r.select(budget=0.5, task_value="mean-gradient")
    assert other.report.task_value == "mean-gradient"
    assert other.report.task_values == r.values_of("mean-gradient")


@pytest.mark.parametrize("call, fragment", [
    (lambda r: r.select(budget=0.5, method="random", task_value="coherence"),
     "does not apply to method=random"),
    (lambda r: r.select(budget=0.5, method="kmeans", task_value="coherence"),
     "quota=value"),
    (lambda r: r.select(budget=0.5, paper=True, task_value="coherence"), "paper"),
    (lambda r: r.select(budget=0.5, task_value="nrom"), "norm, coherence, mean-gradient"),
])
def test_task_value_refusals(mixture_run, call, fragment):
    r = value_estimate(features=mixture_run["features"], norms=mixture_run["norms"],
                       data=mixture_run["data"])
    with pytest.raises(ConfigError, match=fragment):
        call(r)


def test_value_estimate_paper_refuses_another_task_value(mixture_run):
    with pytest.raises(ConfigError, match="paper=True"):
        value_estimate(features=mixture_run["features"], norms=mixture_run["norms"],
                       data=mixture_run["data"], paper=True, task_value="mean-gradient")


def test_kmeans_value_quotas_follow_the_task_value(mixture_run):
    r = value_estimate(features=mixture_run["features"], norms=mixture_run["norms"],
                       data=mixture_run["data"])
    s = r.select(budget=0.5, method="kmeans", quota="value", task_value="mean-gradient")
    values = r.values_of("mean-gradient")
    total = sum(values.values())
    assert all(abs(q - len(s.indices) * values[t] / total) < 1 for t, q in s.quotas.items())


def test_cli_select_and_report_with_task_value(imported):
    run = imported["run"]
    runner = CliRunner()
    out = run / "c.json"
    res = runner.invoke(main, ["select", "--run", str(run), "--budget", "0.5",
                               "--task-value", "coherence", "-o", str(out)])
    assert res.exit_code == 0, res.output
    d = json.loads(out.with_name("c.report.json").read_text())
    assert d["settings"]["task_value"] == "coherence"
    store = value_estimate(store=run, task_value="coherence")
    assert {t: e["value"] for t, e in d["tasks"].items()} == pytest.approx(store.task_values)
    res = runner.invoke(main, ["select", "--run", str(run), "--budget", "0.5", "--paper",
                               "--task-value", "coherence", "-o", str(run / "p.json")])
    assert res.exit_code != 0 and "--paper" in res.output and "Traceback" not in res.output
    res = runner.invoke(main, ["report", "--run", str(run), "--json",
                               "--task-value", "mean-gradient"])
    assert res.exit_code == 0, res.output
    # the health checks' warnings (quotas over their task's size) go to stderr
    shown = {t: e["value"] for t, e in json.loads(res.stdout)["tasks"].items()}
    assert shown == pytest.approx(value_estimate(store=run, task_value="mean-gradient")
                                  .task_values)
    res = runner.invoke(main, ["report", "--run", str(run)])
    assert "task value coherence" in res.output


def test_mean_gradient_is_kept_in_the_run_cache(imported, monkeypatch):
    run = imported["run"]
    first = value_estimate(store=run).values_of("mean-gradient")
    calls = []
    real = val.weighted_unit_sums
    monkeypatch.setattr(val, "weighted_unit_sums",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    second = value_estimate(store=run).values_of("mean-gradient")
    assert second == first and not calls
    assert len(list((run / "cache").glob("taskvalues-*.npz"))) == 1


def test_float32_features_match_float64(mixture_run):
    f64 = mixture_run["features"]
    r64 = value_estimate(features=f64, norms=mixture_run["norms"], tasks=mixture_run["tasks"])
    r32 = value_estimate(features=f64.astype(np.float32), norms=mixture_run["norms"],
                         tasks=mixture_run["tasks"])
    for kind in ("coherence", "mean-gradient"):
        a, b = r64.values_of(kind), r32.values_of(kind)
        scale = max(abs(v) for v in a.values())
        assert all(abs(a[t] - b[t]) <= TOL32 * scale for t in a)


@pytest.mark.parametrize("norm_of_zero_row", [0.0, 1.0])
def test_a_zero_feature_counts_as_cosine_zero_whatever_its_norm(norm_of_zero_row):
    feats = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 0.0]], dtype=np.float32)
    norms = np.array([1.0, 1.0, norm_of_zero_row])
    r = value_estimate(features=feats, norms=norms, tasks=["a"] * 3)
    cos = float(feats[0] @ feats[1]) / np.linalg.norm(feats[0]) / np.linalg.norm(feats[1])
    assert r.values_of("coherence")["a"] == pytest.approx(2 * cos / 6, rel=1e-6)


def test_a_non_norm_report_selects_baselines_and_the_papers_way(mixture_run):
    r = value_estimate(features=mixture_run["features"], norms=mixture_run["norms"],
                       data=mixture_run["data"], task_value="coherence")
    assert r.select(budget=0.5, method="random").config.task_value is None
    assert r.select(budget=0.5, method="kmeans").config.task_value is None
    assert r.select(budget=0.5, method="kmeans", quota="value").config.task_value == "coherence"
    paper = r.select(budget=0.5, paper=True)  # the authors' values, not the report's
    plain = value_estimate(features=mixture_run["features"], norms=mixture_run["norms"],
                           data=mixture_run["data"]).select(budget=0.5, paper=True)
    assert paper.config.task_value == "norm" and paper.quotas == plain.quotas


def test_report_html_refuses_a_task_value_beside_a_selection(imported, tmp_path):
    run = imported["run"]
    runner = CliRunner()
    res = runner.invoke(main, ["select", "--run", str(run), "--budget", "0.5",
                               "--task-value", "coherence", "-o", str(run / "c.json")])
    assert res.exit_code == 0, res.output
    page = tmp_path / "page.html"
    res = runner.invoke(main, ["report", "--run", str(run), "--html", "-o", str(page)])
    assert res.exit_code == 0, res.output
    assert "value (coherence)" in page.read_text()
    res = runner.invoke(main, ["report", "--run", str(run), "--html", "--task-value",
                               "mean-gradient", "-o", str(page)])
    assert res.exit_code != 0 and "--task-value mean-gradient" in res.output
    assert "Traceback" not in res.output
