"""The values cache for sweeps: a cached selection is the uncached one, and a changed store
is never read from an old cache."""

from __future__ import annotations

import os

import numpy as np
import pytest
from click.testing import CliRunner

from tive.api import value_estimate
from tive.cli.commands import main
from tive.selection import value_cache as vc, values as val
from tive.store.format import Store


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + str(result.exception)
    return result


@pytest.fixture
def store_run(imported):
    return imported


def uncached(run):
    """The report of the store's own arrays, valued without the cache."""
    st = Store.open(run["run"])
    return value_estimate(features=np.array(st.features), norms=st.array("norms"),
                          data=run["data"], check_images=False)


def count_calls(monkeypatch, module, name: str) -> dict[str, int]:
    """Replace ``module.name`` by a wrapper counting its calls in the returned ``{"n": …}``."""
    counter = {"n": 0}
    real = getattr(module, name)

    def counted(*args, **kwargs):
        counter["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return counter


@pytest.fixture
def calls(monkeypatch):
    """Counts the passes over the features (calls of ``values.instance_values``)."""
    return count_calls(monkeypatch, val, "instance_values")


def test_second_report_reads_the_cache_and_equals_an_uncached_one(store_run, calls):
    first = value_estimate(store=store_run["run"])
    assert calls["n"] == 1 and len(list((store_run["run"] / "cache").glob("values-*.npz"))) == 1
    second = value_estimate(store=store_run["run"])
    assert calls["n"] == 1  # read back, not computed
    fresh = uncached(store_run)
    assert np.array_equal(second.instance_values, first.instance_values, equal_nan=True)
    assert np.array_equal(second.instance_values, fresh.instance_values, equal_nan=True)
    assert np.array_equal(second.valid, first.valid)
    assert second.task_values == first.task_values
    for kwargs in ({"budget": 0.3}, {"budget": "50%", "strategy": "top"},
                   {"budget": 7, "seed": 3, "temperature": 0.1},
                   {"budget": 0.2, "exclude": ["vg"]}):
        a, b = second.select(**kwargs), fresh.select(**kwargs)
        assert np.array_equal(a.indices, b.indices) and a.quotas == b.quotas, kwargs


def test_a_changed_store_is_valued_again(store_run, calls):
    before = value_estimate(store=store_run["run"])
    d = store_run["dir"]
    other = np.load(d / "features.npy")[::-1].copy()  # other directions, same shape
    np.save(d / "other.npy", other)
    cli("import", "--data", store_run["data"], "--features", d / "other.npy",
        "--norms", d / "norms.npy", "--run", store_run["run"], "--force")
    after = value_estimate(store=store_run["run"])
    assert calls["n"] == 2
    fresh = uncached(store_run)
    assert np.array_equal(after.instance_values, fresh.instance_values, equal_nan=True)
    assert not np.allclose(after.instance_values, before.instance_values, equal_nan=True)


def test_other_labels_or_validity_are_other_keys():
    codes, valid = np.array([0, 1, 1, 0]), np.ones(4, dtype=bool)
    key = vc.cache_key("id", codes, ["a", "b"], valid, None)
    assert key == vc.cache_key("id", codes.copy(), ["a", "b"], valid.copy(), None)
    assert len({key, vc.cache_key("id2", codes, ["a", "b"], valid, None),
                vc.cache_key("id", np.array([0, 1, 1, 1]), ["a", "b"], valid, None),
                vc.cache_key("id", codes, ["a", "c"], valid, None),
                vc.cache_key("id", codes, ["a", "b"], ~valid, None),
                vc.cache_key("id", codes, ["a", "b"], valid, 2)}) == 6


def test_a_damaged_cache_file_is_computed_again(store_run, calls):
    value_estimate(store=store_run["run"])
    (path,) = (store_run["run"] / "cache").glob("values-*.npz")
    path.write_bytes(b"not an npz")
    again = value_estimate(store=store_run["run"])
    assert calls["n"] == 2 and np.isfinite(again.instance_values[again.valid]).all()


def test_only_the_newest_files_are_kept_per_prefix(tmp_path):
    for i in range(vc.KEEP["values"] + 3):
        vc._write(tmp_path / f"values-{i:02d}.npz", {"values": np.zeros(3)})
    vc._write(tmp_path / "kmeans-00.npz", {"rows": np.zeros(3)})
    assert len(list(tmp_path.glob("values-*.npz"))) == vc.KEEP["values"]
    assert len(list(tmp_path.glob("kmeans-*.npz"))) == 1  # another prefix, counted apart


@pytest.mark.parametrize("jsonl", [False, True])
def test_a_cached_mixture_is_the_mixture(store_run, tmp_path, jsonl):
    import json

    from tive.data.cache import load_labelled
    from tive.data.mixture import load_mixture
    from tive.data.tasks import label_tasks

    data = store_run["data"]
    if jsonl:
        records = json.loads(data.read_text())
        data = data.with_suffix(".jsonl")
        data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    cache = tmp_path / "cache"
    first, labels1 = load_labelled(data, None, cache)
    assert len(list(cache.glob("mixture-*.npz"))) == 1
    second, labels2 = load_labelled(data, None, cache)
    fresh = load_mixture(data)
    assert type(second._records).__name__ == "_LazyRecords"  # read back from the cache
    assert type(second._rows).__name__ == ("Lines" if jsonl else "SpanRows")  # nothing parsed
    assert np.array_equal(labels2.tasks, label_tasks(fresh).tasks)
    assert np.array_equal(labels2.inferred, label_tasks(fresh).inferred)
    assert second.fingerprint == fresh.fingerprint and np.array_equal(second.keys, fresh.keys)
    assert (second.container, second.schema, len(second)) == (fresh.container, fresh.schema,
                                                             len(fresh))
    assert list(second) == list(fresh) and second.ids == fresh.ids
    second.write_subset([3, 1, 1], tmp_path / f"a{data.suffix}")
    fresh.write_subset([3, 1, 1], tmp_path / f"b{data.suffix}")
    written = [(tmp_path / f"{n}{data.suffix}").read_bytes() for n in "ab"]
    assert written[0] == written[1]
    records = json.loads(store_run["data"].read_text())
    records[0]["conversations"][1]["value"] = "changed"
    data.write_text(json.dumps(records) if not jsonl else
                    "\n".join(json.dumps(r) for r in records) + "\n")
    os.utime(data, ns=(1, 1))  # another size or time: another key
    third, _ = load_labelled(data, None, cache)
    assert type(third._records).__name__ == "list" and third.fingerprint != fresh.fingerprint


@pytest.mark.parametrize("jsonl", [False, True])
def test_a_file_changed_without_a_new_size_or_time_is_read_afresh(store_run, tmp_path, jsonl):
    """``cp -p`` or ``rsync -a`` can change a file and keep its size and modification time:
    the cached labels, keys and spans must not be used for the new bytes."""
    import json

    from tive.data.cache import load_labelled
    from tive.data.mixture import load_mixture

    records = json.loads(store_run["data"].read_text())
    data = tmp_path / ("m.jsonl" if jsonl else "m.json")
    dump = (lambda rs: "\n".join(json.dumps(r) for r in rs) + "\n") if jsonl else json.dumps
    data.write_text(dump(records))
    cache = tmp_path / "cache"
    load_labelled(data, None, cache)
    stat = data.stat()
    records[0]["conversations"][1]["value"] = records[0]["conversations"][1]["value"][::-1] + "!"
    records[1]["conversations"][1]["value"] = records[1]["conversations"][1]["value"][:-1]
    data.write_text(dump(records))  # the same length: one character more, one fewer
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert data.stat().st_size == stat.st_size and data.stat().st_mtime_ns == stat.st_mtime_ns
    second, _ = load_labelled(data, None, cache)
    fresh = load_mixture(data)
    assert type(second._records).__name__ == "list"  # read afresh, not from the cache
    assert second.fingerprint == fresh.fingerprint
    out = second.write_subset([0, 1], tmp_path / f"sub{data.suffix}")
    written = ([json.loads(line) for line in out.read_text().splitlines()] if jsonl
               else json.loads(out.read_text()))
    assert written == records[:2]


def test_select_from_cache_writes_the_same_subset(store_run):
    first = cli("select", "--run", store_run["run"], "--budget", "0.4", "-o",
                store_run["run"] / "a.json").output
    second = cli("select", "--run", store_run["run"], "--budget", "0.4", "-o",
                 store_run["run"] / "b.json").output
    assert len(list((store_run["run"] / "cache").glob("mixture-*.npz"))) == 1
    assert first.replace("a.", "b.") == second
    assert (store_run["run"] / "a.json").read_bytes() == (store_run["run"] / "b.json").read_bytes()


def test_a_clusters_sweep_fits_once_and_equals_uncached_selections(store_run, monkeypatch):
    from tive.selection import kmeans as km

    fits = count_calls(monkeypatch, km, "fit_centers")
    pick = {"method": "kmeans", "clusters": 2}
    first = value_estimate(store=store_run["run"]).select(budget=0.3, **pick)
    fitted = fits["n"]
    assert fitted > 0 and list((store_run["run"] / "cache").glob("kmeans-*.npz"))
    second = value_estimate(store=store_run["run"]).select(budget=0.5, **pick)
    assert fits["n"] == fitted  # every task's assignment read back: no fit
    fresh = uncached(store_run)  # features given: no cache
    assert fresh.cache is None
    for budget, got in ((0.3, first), (0.5, second)):
        assert got.indices.tolist() == fresh.select(budget=budget, **pick).indices.tolist()
    for other in ({"method": "kmeans", "clusters": 3}, {"seed": 1, **pick}):
        fits["n"] = 0
        value_estimate(store=store_run["run"]).select(budget=0.5, **other)
        assert fits["n"] > 0  # other clusters, another seed: other keys, fitted afresh


@pytest.mark.parametrize("damage", [b"", b"PK\x03\x04 truncated", None])
def test_a_damaged_or_empty_cache_file_is_computed_again(store_run, calls, damage):
    pick = {"method": "kmeans", "clusters": 2}
    first = value_estimate(store=store_run["run"]).select(budget=0.3, **pick)
    folder = store_run["run"] / "cache"
    for path in [*folder.glob("kmeans-*.npz"), *folder.glob("values-*.npz")]:
        if damage is None:  # readable, but without the arrays it should hold
            with open(path, "wb") as f:
                np.savez(f, other=np.zeros(2))
        else:
            path.write_bytes(damage)
    again = value_estimate(store=store_run["run"]).select(budget=0.3, **pick)
    assert calls["n"] == 2  # the instance values computed again, not read
    assert again.indices.tolist() == first.indices.tolist()


def test_pruning_while_another_selection_prunes_does_not_fail(tmp_path, monkeypatch):
    real_glob = type(tmp_path).glob

    def glob_with_a_vanished_file(self, pattern):
        yield from real_glob(self, pattern)
        yield self / "values-gone.npz"  # listed, then removed by another process

    monkeypatch.setattr(type(tmp_path), "glob", glob_with_a_vanished_file)
    for i in range(vc.KEEP["values"] + 2):
        vc._write(tmp_path / f"values-{i:02d}.npz", {"values": np.zeros(3)})
    monkeypatch.undo()
    assert len(list(tmp_path.glob("values-*.npz"))) == vc.KEEP["values"]
