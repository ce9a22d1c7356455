"""The ``balanced`` and ``kmeans`` selection methods: quotas, determinism, distinct records,
nearest-to-centroid against an all-pairs twin, chunk-size invariance, and refusals."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_mixture
from hypothesis import given, settings
from hypothesis import strategies as st

from tive import value_estimate
from tive.errors import ConfigError
from tive.selection import kmeans as km
from tive.selection.report import Report
from tive.selection.settings import SelectConfig

# ---------------------------------------------------------------------------- balanced


@pytest.fixture
def report(mixture_run):
    return value_estimate(features=mixture_run["features"], norms=mixture_run["norms"],
                          data=mixture_run["data"])


def test_balanced_gives_each_task_an_equal_count(report):
    s = report.select(budget=15, method="balanced")
    assert s.quotas == {"llava_instruct": 3, "vqav2": 3, "gqa": 3, "sharegpt": 3, "vg": 3}
    assert s.selected() == s.quotas and len(np.unique(s.indices)) == 15


def test_balanced_oversamples_small_tasks_or_caps_them(report):
    over = report.select(budget=25, method="balanced")  # 5 each; vg has 3 records
    assert over.quotas["vg"] == 5 and set(over.quotas.values()) == {5}
    assert len(np.unique(over.indices)) == 23
    capped = report.select(budget=25, method="balanced", oversample=False)
    assert capped.quotas["vg"] == 3 and sum(capped.quotas.values()) == 25
    assert capped.quotas == {"llava_instruct": 6, "vqav2": 6, "gqa": 5, "sharegpt": 5, "vg": 3}
    assert len(np.unique(capped.indices)) == 25


def test_balanced_is_seeded(report):
    a, b = (report.select(budget=15, method="balanced", seed=s).indices for s in (1, 1))
    c = report.select(budget=15, method="balanced", seed=2).indices
    assert a.tolist() == b.tolist() != c.tolist()


# ---------------------------------------------------------------------------- kmeans pieces


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 40), st.integers(1, 12), st.integers(1, 7), st.integers(0, 10_000),
       st.booleans())
def test_streaming_matching_equals_the_all_pairs_greedy_twin(m, k, chunk, seed, duplicates):
    rng = np.random.default_rng(seed)
    k = min(k, m)
    x = rng.normal(size=(m, 5))
    if duplicates:  # exact copies: tied distances, broken by the lower row
        x[rng.integers(0, m, m // 2)] = x[0]
    x = unit(x)
    centers = unit(x[rng.choice(m, k, replace=False)] + 0.3 * rng.normal(size=(k, 5)))
    if duplicates:  # centroids that share their nearest records exhaust short lists
        centers[: k // 2] = centers[0]
    members = np.arange(m) * 3 + 1  # rows of a larger store
    store = np.zeros((3 * m + 2, 5), dtype=np.float32)
    store[members] = x
    picked, sizes = km.match_streaming(store, members, centers, chunk)
    assert picked.tolist() == km.greedy_match(x, centers).tolist()
    assert len(set(picked.tolist())) == k and sizes.sum() == m


def test_matching_with_short_candidate_lists_needs_more_passes(monkeypatch):
    monkeypatch.setattr(km, "CANDIDATES", 2)
    rng = np.random.default_rng(3)
    x = unit(rng.normal(size=(30, 4)))
    centers = unit(np.repeat(rng.normal(size=(1, 4)), 12, axis=0) + 1e-3 * rng.normal(size=(12, 4)))
    calls = []
    real = km._candidates
    monkeypatch.setattr(km, "_candidates", lambda *a: calls.append(1) or real(*a))
    picked, _ = km.match_streaming(x, np.arange(30), centers, 7)
    assert picked.tolist() == km.greedy_match(x, centers).tolist() and len(calls) > 1


def test_clusters_share_the_quota_by_cluster_size_nearest_first():
    rng = np.random.default_rng(0)
    big, small = rng.normal(size=(1, 6)), rng.normal(size=(1, 6))
    x = np.concatenate([big + 0.05 * rng.normal(size=(30, 6)),
                        small + 0.05 * rng.normal(size=(10, 6))]).astype(np.float32)
    picked = km.cluster_share(km.cluster_assign(x, np.arange(40), 2, rng.uniform(size=40), 0,
                                                16), 8)
    assert (picked < 30).sum() == 6 and (picked >= 30).sum() == 2
    centers = np.stack([unit(x[:30]).mean(0), unit(x[30:]).mean(0)])
    nearest, _ = km.assign(x, np.arange(40), centers, 16)
    assert nearest[:30].tolist() == [0] * 30 and nearest[30:].tolist() == [1] * 10
    assert len(set(picked.tolist())) == 8


# ---------------------------------------------------------------------------- kmeans method

TASKS = ["a"] * 60 + ["b"] * 30 + ["c"] * 10


def clustered(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each task 5 tight, unequal clusters (sizes ∝ 1, 2, 3, 4, 5) in 16 dims."""
    rng = np.random.default_rng(seed)
    feats = np.empty((len(TASKS), 16), dtype=np.float32)
    for t in "abc":
        rows = np.flatnonzero(np.array(TASKS) == t)
        sizes = np.array([1, 2, 3, 4, 5]) * len(rows) // 15
        sizes[-1] += len(rows) - sizes.sum()
        centres = rng.normal(size=(5, 16)) * 3
        feats[rows] = np.repeat(centres, sizes, axis=0) + 0.05 * rng.normal(size=(len(rows), 16))
    norms = np.array([{"a": 1.0, "b": 2.0, "c": 4.0}[t] for t in TASKS])
    return feats, norms


@pytest.fixture
def kreport():
    feats, norms = clustered()
    return value_estimate(features=feats, norms=norms, tasks=TASKS)


def test_kmeans_quotas_follow_size_or_value_and_sum_exactly(kreport):
    s = kreport.select(budget=15, method="kmeans")
    assert s.quotas == {"a": 9, "b": 5, "c": 1} == s.selected()  # 9, 4.5, 1.5: ties → larger
    v = kreport.select(budget=14, method="kmeans", quota="value")  # values 1 : 2 : 4
    assert v.quotas == {"a": 2, "b": 4, "c": 8} == v.selected()
    assert len(np.unique(s.indices)) == 15 and len(np.unique(v.indices)) == 14


def test_kmeans_covers_every_cluster_where_random_would_not(kreport):
    """Tasks a and b each hold 5 tight clusters of sizes ∝ 1:2:3:4:5; 10 and 5 records of them
    cover every cluster, for every seed; a uniform draw of 5 from b misses one most times."""
    cluster = np.concatenate([np.repeat(np.arange(5), np.array([1, 2, 3, 4, 5]) * n // 15)
                              for n in (60, 30)])  # (90,) cluster of each row of a and b
    random_covers = 0
    for seed in range(6):
        s = kreport.select(budget=15, method="kmeans", exclude=["c"], seed=seed)
        assert s.quotas == {"a": 10, "b": 5}
        assert set(cluster[s.indices[s.indices < 60]].tolist()) == set(range(5))
        assert sorted(cluster[s.indices[s.indices >= 60]].tolist()) == [0, 1, 2, 3, 4]
        r = kreport.select(budget=15, method="random-per-task", exclude=["c"], seed=seed)
        random_covers += set(cluster[r.indices[r.indices >= 60]].tolist()) == set(range(5))
    assert random_covers < 3


def test_kmeans_is_deterministic_and_seeded(kreport):
    a = kreport.select(budget=30, method="kmeans", seed=1).indices
    assert a.tolist() == kreport.select(budget=30, method="kmeans", seed=1).indices.tolist()
    others = {tuple(kreport.select(budget=30, method="kmeans", seed=s).indices) for s in range(5)}
    assert len(others) > 1


def test_kmeans_invariant_to_chunk_size_and_to_storage_dtype(tmp_path):
    feats, norms = clustered(1)
    base = value_estimate(features=feats, norms=norms, tasks=TASKS)
    ref = base.select(budget=40, method="kmeans").indices.tolist()
    for chunk in (1, 7, 1000):
        r = value_estimate(features=feats, norms=norms, tasks=TASKS, chunk_rows=chunk)
        assert r.select(budget=40, method="kmeans").indices.tolist() == ref
        assert (r.select(budget=40, method="kmeans", clusters=3).indices.tolist()
                == base.select(budget=40, method="kmeans", clusters=3).indices.tolist())
    np.save(tmp_path / "f.npy", feats)
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    r = value_estimate(features=mm, norms=norms, tasks=TASKS, chunk_rows=9)
    assert r.select(budget=40, method="kmeans").indices.tolist() == ref


def test_kmeans_invariant_to_row_order(mixture_run, tmp_path):
    records, feats, norms = mixture_run["records"], mixture_run["features"], mixture_run["norms"]
    perm = np.random.default_rng(7).permutation(len(records))
    other = write_mixture(tmp_path / "perm", [records[i] for i in perm])
    a = value_estimate(features=feats, norms=norms, data=mixture_run["data"])
    b = value_estimate(features=feats[perm], norms=norms[perm], data=other, chunk_rows=4)
    for kw in ({}, {"clusters": 2}):
        ids_a = sorted(records[i]["id"] for i in a.select(budget=0.4, method="kmeans",
                                                           **kw).indices)
        ids_b = sorted(records[perm[i]]["id"] for i in b.select(budget=0.4, method="kmeans",
                                                                **kw).indices)
        assert ids_a == ids_b


def test_kmeans_oversamples_like_random_per_task(kreport):
    s = kreport.select(budget=0.9, method="kmeans", quota="value")  # c: quota 51 of 10 records
    rows_c = np.flatnonzero(np.array(TASKS) == "c")
    counts = np.bincount(s.indices, minlength=100)[rows_c]
    assert s.quotas["c"] == 51 and sorted(counts.tolist()) == [5] * 9 + [6]


def test_kmeans_nearest_to_centroid_of_the_fitted_model(kreport, monkeypatch):
    """The records picked are the greedy nearest to the centroids MiniBatchKMeans fitted."""
    seen = {}
    real = km.fit_centers

    def spy(features, members, k, seed):
        seen[int(members.min())] = (members, real(features, members, k, seed))
        return seen[int(members.min())][1]

    monkeypatch.setattr(km, "fit_centers", spy)
    s = kreport.select(budget=12, method="kmeans", seed=3)
    feats = clustered()[0]
    for members, centers in seen.values():
        twin = members[km.greedy_match(km.unit_rows(feats, members), centers)]
        assert sorted(twin.tolist()) == sorted(set(s.indices.tolist()) & set(members.tolist()))
    assert len(seen) == 3


def test_kmeans_refuses_without_features_and_options_elsewhere(kreport):
    bare = Report(tasks=kreport.tasks, task_values=kreport.task_values,
                  instance_values=kreport.instance_values, valid=kreport.valid, invalid={},
                  norms=kreport.norms, loss=kreport.loss, ntokens=kreport.ntokens,
                  keys=kreport.keys)
    with pytest.raises(ConfigError, match="kmeans: this report has no features"):
        bare.select(budget=5, method="kmeans")
    # the notebook API names its arguments (the CLI, its flags: tests/test_cli.py)
    with pytest.raises(ConfigError, match="clusters does not apply to method=random"):
        kreport.select(budget=5, method="random", clusters=3)
    with pytest.raises(ConfigError, match="quota does not apply to method=balanced"):
        kreport.select(budget=5, method="balanced", quota="value")
    with pytest.raises(ConfigError, match="--clusters 0: expected a positive integer"):
        SelectConfig(budget=5, method="kmeans", clusters=0)
    with pytest.raises(ConfigError, match="--quota 'big': unknown; choose one of size, value"):
        SelectConfig(budget=5, method="kmeans", quota="big")
    cfg = SelectConfig(budget=5, method="kmeans")
    assert (cfg.clusters, str(cfg.quota), cfg.seed, cfg.oversample) == (None, "size", 0, True)


def test_kmeans_from_a_store_through_the_cli(mixture_run):
    from click.testing import CliRunner

    from tive.cli.commands import main

    d = mixture_run["dir"]
    runner = CliRunner()
    res = runner.invoke(main, ["import", "--data", str(mixture_run["data"]), "--features",
                               str(d / "features.npy"), "--norms", str(d / "norms.npy"),
                               "--run", str(mixture_run["run"])])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["select", "--run", str(mixture_run["run"]), "--budget", "10",
                               "--method", "kmeans", "--clusters", "2", "--quota", "value"])
    assert res.exit_code == 0, res.output
    assert "selected 10 of 36 records (10 distinct)" in res.output
    res = runner.invoke(main, ["select", "--run", str(mixture_run["run"]), "--budget", "10",
                               "--method", "balanced", "--clusters", "2"])
    assert res.exit_code == 2 and "--clusters does not apply to --method balanced" in res.output


def test_kmeans_does_not_load_the_whole_store(tmp_path, monkeypatch):
    """Every read of the features is a block of at most 3·max(BATCH, k) rows, never a task."""
    feats, norms = clustered(2)
    np.save(tmp_path / "f.npy", feats)
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    sizes = []
    real = km.unit_rows
    monkeypatch.setattr(km, "BATCH", 8)
    monkeypatch.setattr(km, "unit_rows", lambda f, rows: sizes.append(len(rows)) or real(f, rows))
    value_estimate(features=mm, norms=norms, tasks=TASKS, chunk_rows=5).select(
        budget=12, method="kmeans")
    assert sizes and max(sizes) == 3 * 8 < 60  # the k-means++ sample: 3·max(k, BATCH)
