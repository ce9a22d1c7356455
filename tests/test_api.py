"""The notebook door's entry points (tive/api.py): Run.score, Run.values, Run.select and
values_from_arrays give what the one-call value_estimate gives, and refuse what they would
ignore."""

from __future__ import annotations

import numpy as np
import pytest

import tive
from tive.api import Run, values_from_arrays
from tive.errors import ConfigError


def test_run_values_and_select_are_value_estimate_from_a_store(imported):
    run = Run(imported["run"])
    one_call = tive.value_estimate(store=imported["run"])
    report = run.values()
    assert report.task_values == one_call.task_values and report.task_values
    np.testing.assert_array_equal(report.instance_values, one_call.instance_values)
    np.testing.assert_array_equal(report.valid, one_call.valid)
    chosen = run.select(0.25, seed=3, exclude=["gqa"])
    expected = one_call.select(budget=0.25, seed=3, exclude=["gqa"])
    np.testing.assert_array_equal(chosen.indices, expected.indices)
    assert chosen.quotas == expected.quotas and len(chosen.indices) > 0
    no_data = run.values(data=False, task_value="coherence")
    assert no_data.mixture is None and no_data.task_value == "coherence"


def test_values_from_arrays_is_value_estimate_from_arrays(mixture_run):
    feats, norms = mixture_run["features"], mixture_run["norms"]
    for kwargs in ({"tasks": mixture_run["tasks"]}, {"data": mixture_run["data"]}):
        report = values_from_arrays(feats, norms, **kwargs)
        one_call = tive.value_estimate(features=feats, norms=norms, **kwargs)
        assert report.task_values == one_call.task_values and report.task_values
        np.testing.assert_array_equal(report.instance_values, one_call.instance_values)
        np.testing.assert_array_equal(report.select(budget=10).indices,
                                      one_call.select(budget=10).indices)


def test_entry_points_refuse_what_they_would_ignore(imported, tmp_path):
    feats, norms = imported["features"], imported["norms"]
    with pytest.raises(ConfigError, match="^values_from_arrays: give tasks= .* or data="):
        values_from_arrays(feats, norms)
    with pytest.raises(ConfigError, match="^values_from_arrays: image_root= and skip_"):
        values_from_arrays(feats, norms, tasks=imported["tasks"], image_root=tmp_path)
    with pytest.raises(ConfigError, match="^values_from_arrays: 3 tasks for"):
        values_from_arrays(feats, norms, tasks=["a", "b", "c"])
    with pytest.raises(ConfigError, match="^Run.values: check_images=True needs data"):
        Run(imported["run"]).values(data=False, check_images=True)
    with pytest.raises(ConfigError, match="^Run.values: image_root= and skip_missing_images="):
        Run(imported["run"]).values(skip_missing_images=True)
    with pytest.raises(ConfigError, match="^task_value=coherence: paper=True"):
        Run(imported["run"]).values(paper=True, task_value="coherence")
    # refused before any model is looked for
    with pytest.raises(ConfigError, match="^Run.score: reference= is a trained adapter"):
        Run(tmp_path / "fresh").score("no-such-model", imported["data"], reference=tmp_path,
                                    warmup={"lr": 1e-4})
    with pytest.raises(ConfigError, match="^Run.score: score= has no setting 'batch'"):
        Run(tmp_path / "fresh").score("no-such-model", imported["data"], score={"batch": 2})
    assert not (tmp_path / "fresh").exists()
