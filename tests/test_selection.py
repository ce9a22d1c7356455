"""Quotas, within-task choice, strategies, seeds, oversampling, baselines, and their invariances."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from conftest import task_features, write_mixture
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tive import value_estimate
from tive.errors import ConfigError
from tive.selection import quotas as sel

# ---------------------------------------------------------------------------- quotas

values_sizes = st.integers(1, 8).flatmap(lambda t: st.tuples(
    st.lists(st.floats(0.01, 100.0), min_size=t, max_size=t),
    st.lists(st.integers(1, 500), min_size=t, max_size=t)))


@settings(max_examples=200, deadline=None)
@given(values_sizes, st.integers(1, 3000))
def test_quotas_sum_to_budget_and_are_proportional_within_rounding(vs, budget):
    values, sizes = map(np.array, vs)
    q = sel.quotas(values, sizes, budget, oversample=True)
    assert q.sum() == budget and (q >= 0).all()
    exact = budget * values / values.sum()
    assert np.all(np.abs(q - exact) < 1)


def water_fill(values, sizes, budget):
    """Reference: shares min(size, λ·V) with λ found by bisection so they sum to the budget."""
    lo, hi = 0.0, 1.0
    while np.minimum(sizes, hi * values).sum() < budget:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.minimum(sizes, mid * values).sum() < budget else (lo, mid)
    return np.minimum(sizes, hi * values)


@settings(max_examples=200, deadline=None)
@given(values_sizes, st.integers(1, 3000))
def test_capped_quotas_never_exceed_sizes_and_redistribute_by_value(vs, budget):
    values, sizes = map(np.array, vs)
    assume(budget <= sizes.sum())
    q = sel.quotas(values, sizes, budget, oversample=False)
    assert q.sum() == budget and np.all(q <= sizes) and (q >= 0).all()
    assert np.all(np.abs(q - water_fill(values, sizes, budget)) < 1 + 1e-6)


def test_oversampling_quota_can_exceed_task_size_capping_cannot():
    values, sizes = np.array([10.0, 1.0]), np.array([5, 100])
    assert sel.quotas(values, sizes, 55, oversample=True).tolist() == [50, 5]
    assert sel.quotas(values, sizes, 55, oversample=False).tolist() == [5, 50]
    with pytest.raises(ConfigError, match="more than the 105 selectable"):
        sel.quotas(values, sizes, 106, oversample=False)


def test_largest_remainder_gives_leftover_units_to_largest_fractions():
    assert sel.largest_remainder(np.array([1.5, 2.7, 0.8]), 5).tolist() == [1, 3, 1]


# ---------------------------------------------------------------------------- random draws

def test_uniforms_are_deterministic_seeded_and_uniform():
    keys = np.arange(20000, dtype=np.uint64)
    u = sel.uniforms(keys, seed=3)
    assert np.array_equal(u, sel.uniforms(keys, seed=3))
    assert not np.array_equal(u, sel.uniforms(keys, seed=4))
    assert ((u > 0) & (u < 1)).all()
    # Kolmogorov–Smirnov bound at failure rate 1e-6: sqrt(ln(2/δ) / 2n)
    d = np.max(np.abs(np.sort(u) - (np.arange(len(u)) + 0.5) / len(u)))
    assert d < np.sqrt(np.log(2 / 1e-6) / (2 * len(u)))


def test_soft_draw_follows_softmax_of_instance_values():
    v, tau, n = np.array([0.0, 1.0, 2.0]), 1.0, 6000
    members = np.arange(3)
    counts = Counter()
    for seed in range(n):
        noise = sel.uniforms(np.arange(3, dtype=np.uint64) + 1000, seed)
        counts[int(sel.choose_in_task(members, 1, v, noise, tau, soft=True)[0])] += 1
    p = np.exp(v / tau) / np.exp(v / tau).sum()
    freq = np.array([counts[i] for i in range(3)]) / n
    # five standard errors: a failure rate below 1e-6 per coordinate
    assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n))


def test_oversampled_task_is_taken_whole_times_then_remainder():
    members = np.array([10, 11, 12, 13])
    noise = sel.uniforms(np.arange(4, dtype=np.uint64), 0)
    got = sel.choose_in_task(members, 11, np.zeros(4), noise, 1000.0, soft=True)
    counts = Counter(got.tolist())
    assert len(got) == 11 and set(counts) == set(members.tolist())
    assert sorted(counts.values()) == [2, 3, 3, 3]


def test_top_takes_highest_instance_values():
    members = np.array([5, 6, 7, 8])
    got = sel.choose_in_task(members, 2, np.array([0.1, 0.9, 0.5, 0.7]),
                             np.full(4, 0.5), 1000.0, soft=False)
    assert sorted(got.tolist()) == [6, 8]


# ---------------------------------------------------------------------------- Report.select

@pytest.fixture
def report(mixture_run):
    return value_estimate(features=mixture_run["features"], norms=mixture_run["norms"],
                          data=mixture_run["data"])


def test_report_values_and_tasks(report, mixture_run):
    assert report.tasks.tolist() == mixture_run["tasks"]
    assert set(report.task_values) == set(mixture_run["tasks"])
    for t, v in report.task_values.items():
        mask = np.array(mixture_run["tasks"]) == t
        assert v == pytest.approx(mixture_run["norms"][mask].mean())
    assert report.instance_values.shape == (len(mixture_run["tasks"]),)


def test_selection_fills_budget_exactly_with_quotas_by_value(report):
    s = report.select(budget=0.5)
    n = len(report.tasks)
    assert len(s.indices) == round(0.5 * n) == sum(s.quotas.values())
    assert s.selected() == {t: s.quotas.get(t, 0) for t in report.task_names}
    total_v = sum(report.task_values.values())
    for t, q in s.quotas.items():
        assert abs(q - len(s.indices) * report.task_values[t] / total_v) < 1


def test_top_strategy_equals_per_task_top_k_of_instance_values(report):
    s = report.select(budget=15, strategy="top")
    for t, q in s.quotas.items():
        members = np.flatnonzero(report.tasks == t)
        best = members[np.argsort(-report.instance_values[members])[:q]]
        assert sorted(s.indices[report.tasks[s.indices] == t].tolist()) == sorted(best.tolist())


def test_same_seed_same_subset_other_seed_other_subset(report):
    a, b = report.select(budget=0.5, seed=1), report.select(budget=0.5, seed=1)
    c = report.select(budget=0.5, seed=2)
    assert a.indices.tolist() == b.indices.tolist()
    assert a.indices.tolist() != c.indices.tolist()


@pytest.mark.parametrize("kwargs", [dict(strategy="soft", seed=3), dict(strategy="top"),
                                    dict(strategy="soft", temperature=0.05, seed=3),
                                    dict(method="random", seed=3),
                                    dict(method="random-per-task", seed=3),
                                    dict(method="gradnorm")])
def test_selection_invariant_to_row_order(mixture_run, tmp_path, kwargs):
    records, feats, norms = mixture_run["records"], mixture_run["features"], mixture_run["norms"]
    perm = np.random.default_rng(7).permutation(len(records))
    other = write_mixture(tmp_path / "perm", [records[i] for i in perm])
    a = value_estimate(features=feats, norms=norms, data=mixture_run["data"])
    b = value_estimate(features=feats[perm], norms=norms[perm], data=other, chunk_rows=4)
    ids_a = sorted(records[i]["id"] for i in a.select(budget=0.4, **kwargs).indices)
    ids_b = sorted(records[perm[i]]["id"] for i in b.select(budget=0.4, **kwargs).indices)
    assert ids_a == ids_b


def test_oversampling_repeats_small_valuable_task_and_capping_redistributes(mixture_run):
    norms = mixture_run["norms"].copy()
    tasks = np.array(mixture_run["tasks"])
    norms[tasks == "vg"] *= 40  # a tiny task (3 records) with a very large value
    r = value_estimate(features=mixture_run["features"], norms=norms, data=mixture_run["data"])
    over = r.select(budget=20)
    assert over.quotas["vg"] > 3 and over.selected()["vg"] == over.quotas["vg"]
    assert len(np.unique(over.indices)) < len(over.indices)
    capped = r.select(budget=20, oversample=False)
    assert capped.quotas["vg"] == 3 and sum(capped.quotas.values()) == 20
    assert len(np.unique(capped.indices)) == 20


def test_excluded_task_gets_nothing_and_budget_counts_all_records(report):
    s = report.select(budget=0.25, exclude=["llava_instruct"])
    assert "llava_instruct" not in s.quotas and s.selected()["llava_instruct"] == 0
    assert len(s.indices) == round(0.25 * len(report.tasks))
    with pytest.raises(ConfigError, match="no such task"):
        report.select(budget=0.25, exclude=["textcaps"])


@pytest.mark.parametrize("budget, message", [
    ("0", "must be positive"), ("-3", "must be positive"), ("-0.1", "must be positive"),
    ("1.5", "a fraction is below 1"), ("37", "more than the 36 records"), ("abc", "not a number"),
    ("0.001", "selects no record")])
def test_bad_budgets_are_refused(report, budget, message):
    with pytest.raises(ConfigError, match=message):
        report.select(budget=budget)


def test_budget_forms(report):
    assert len(report.select(budget="25%").indices) == 9
    assert len(report.select(budget="10").indices) == 10
    assert len(report.select(budget="100%", oversample=False).indices) == 36


def test_baselines(mixture_run):
    ntok = np.arange(36)[::-1].copy()
    loss = np.linspace(0, 1, 36)
    r = value_estimate(features=mixture_run["features"], norms=mixture_run["norms"],
                       data=mixture_run["data"], loss=loss, ntokens=ntok)
    top_norm = set(np.argsort(-mixture_run["norms"])[:7].tolist())
    assert set(r.select(budget=7, method="gradnorm").indices.tolist()) == top_norm
    assert set(r.select(budget=7, method="loss").indices.tolist()) == set(range(29, 36))
    assert set(r.select(budget=7, method="length").indices.tolist()) == set(range(7))
    rnd = r.select(budget=12, method="random")
    assert len(set(rnd.indices.tolist())) == 12
    strat = r.select(budget=18, method="random-per-task")
    # shares 6, 4.5, 3.5, 2.5, 1.5: the two leftover units go to the first ties (larger tasks)
    assert strat.quotas == {"llava_instruct": 6, "vqav2": 5, "gqa": 4, "sharegpt": 2, "vg": 1}
    assert "vqav2" not in r.select(budget=7, method="gradnorm", exclude=["vqav2"]).quotas


def test_length_falls_back_to_answer_characters_without_token_counts(report, mixture_run):
    chars = [sum(len(t["value"]) for t in r["conversations"] if t["from"] == "gpt")
             for r in mixture_run["records"]]
    got = report.select(budget=5, method="length").indices
    assert sorted(chars[i] for i in got) == sorted(chars)[-5:]


def test_loss_method_without_losses_is_refused(report):
    with pytest.raises(ConfigError, match="no per-record losses"):
        report.select(budget=5, method="loss")


def test_non_finite_records_are_left_out_and_counted(mixture_run):
    feats, norms = mixture_run["features"].copy(), mixture_run["norms"].copy()
    norms[0], feats[1, 3], feats[2, 0] = np.nan, np.inf, np.nan
    r = value_estimate(features=feats, norms=norms, data=mixture_run["data"])
    assert r.invalid == {"non-finite-norm": 1, "non-finite-feature": 2}
    assert not r.valid[:3].any() and np.isnan(r.instance_values[:3]).all()
    assert np.isfinite(list(r.task_values.values())).all()
    for method, kw in (("tive", {"oversample": False}), ("random", {}), ("gradnorm", {}),
                       ("random-per-task", {"oversample": False})):
        chosen = r.select(budget=30, method=method, **kw).indices
        assert not set(chosen.tolist()) & {0, 1, 2}


def test_selection_save_without_data_writes_indices(tmp_path):
    feats, norms = task_features(["a"] * 6 + ["b"] * 4)
    r = value_estimate(features=feats, norms=norms, tasks=["a"] * 6 + ["b"] * 4)
    s = r.select(budget=4, strategy="top")
    paths = s.save(tmp_path / "sub.json")
    assert json.loads(paths["subset"].read_text()) == s.indices.tolist()
    report = json.loads(paths["report"].read_text())
    assert set(report["tasks"]) == {"a", "b"} and report["selected"] == 4
    assert paths["chart"].read_bytes()[:4] == b"\x89PNG"


def test_identical_records_are_drawn_independently(tmp_path):
    """Copies of one record must not be chosen or dropped together (authors' draws are iid)."""
    pair = [{"id": f"p{j}", "conversations": [{"from": "human", "value": f"q{j}"},
                                               {"from": "gpt", "value": "a"}]} for j in range(40)]
    data = write_mixture(tmp_path, [r for r in pair for _ in range(2)], images=False)
    feats = np.repeat(np.random.default_rng(0).normal(size=(40, 5)), 2, axis=0)
    r = value_estimate(features=feats, norms=np.ones(80), data=data)
    split = 0
    for seed in range(30):
        chosen = set(r.select(budget=40, method="random", seed=seed).indices.tolist())
        split += sum((2 * j in chosen) != (2 * j + 1 in chosen) for j in range(40))
    # independent draws split about half the pairs; together-or-not-at-all would split none
    assert split > 0.3 * 30 * 40


GIVEN = object()  # stands for the fixture's value of that argument


@pytest.mark.parametrize("given, fragment", [
    ({"tasks": GIVEN, "data": GIVEN}, "not both or neither"),
    ({}, "not both or neither"),
    ({"tasks": GIVEN, "check_images": True}, "needs data="),
    ({"data": GIVEN, "check_images": False, "skip_missing_images": True},
     "apply only when images are checked"),
    ({"tasks": GIVEN, "data": False}, "only applies with store="),
])
def test_value_estimate_refuses_arguments_it_would_ignore(mixture_run, given, fragment):
    values = {"tasks": mixture_run["tasks"], "data": mixture_run["data"]}
    args = {k: values[k] if v is GIVEN else v for k, v in given.items()}
    with pytest.raises(ConfigError, match=fragment):
        value_estimate(features=mixture_run["features"], norms=mixture_run["norms"], **args)


def test_value_estimate_from_a_store_refuses_arrays(mixture_run):
    from tive.data.mixture import load_mixture
    from tive.data.tasks import label_tasks
    from tive.store.external import import_store
    m = load_mixture(mixture_run["data"])
    import_store(mixture_run["run"], m, label_tasks(m), {"features": mixture_run["features"],
                 "norms": mixture_run["norms"]}, source="t", settings={})
    with pytest.raises(ConfigError, match="leave out norms=, loss="):
        value_estimate(store=mixture_run["run"], norms=mixture_run["norms"], loss=np.zeros(36))
    r = value_estimate(store=mixture_run["run"], data=False)
    assert r.mixture is None and r.tasks.tolist() == mixture_run["tasks"]
