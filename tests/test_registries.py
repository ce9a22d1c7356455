"""The registries (model families, projectors, selection methods) and the settings machinery:
each kind of knowledge in one place, and errors that name settings as the caller wrote them."""

from __future__ import annotations

import inspect
import sys
from dataclasses import fields

import numpy as np
import pytest

import tive
from tive.errors import ConfigError
from tive.models import registry
from tive.models.skips import BY_CODE, CODES, SkipReason
from tive.projection.registry import PROJECTORS, SETTINGS
from tive.scoring.settings import ScoreConfig
from tive.selection.methods import METHODS, method_named
from tive.selection.settings import Method, SelectConfig
from tive.warmup.settings import WarmupConfig


def test_every_family_is_found_by_its_model_types_and_aliases_are_unique():
    assert list(registry.FAMILIES) == ["bunny", "llava", "qwen2-vl", "causal-lm"]
    for family in registry.FAMILIES.values():
        for model_type in family.model_types:
            assert registry.family_of(model_type) is family
    assert registry.family_of("bunny-phi").name == "bunny"
    assert registry.family_of("llama").name == "causal-lm"  # the fallback
    aliases = [a for f in registry.FAMILIES.values() for a in [*f.aliases, *f.packages]]
    assert len(aliases) == len(set(aliases)) == len(registry.ALIASES) == 6
    assert registry.derives_positions("qwen2_vl") and not registry.derives_positions("llava")
    with pytest.raises(ConfigError, match="unknown model family 'x'; expected one of"):
        registry.family("x")


def test_methods_make_the_method_enum_and_take_only_select_settings():
    assert [m.value for m in Method] == list(METHODS)
    settings = {f.name for f in fields(SelectConfig)}
    for spec in METHODS.values():
        assert spec.options <= settings
        assert callable(spec.chooser())
    assert [m for m in METHODS if method_named(m).by_task] == [
        "tive", "random-per-task", "balanced", "kmeans", "tive-target"]
    assert method_named("kmeans").weighs_by_value("value")
    assert not method_named("kmeans").weighs_by_value("size")


def test_projectors_take_only_projection_settings_and_build():
    for spec in PROJECTORS.values():
        assert set(spec.options) <= set(SETTINGS)
        projector = spec.build([3, 4], k=8, seed=0, nnz=1, device="cpu")
        assert projector.describe()["type"] == spec.name
        config = ScoreConfig(projector=spec.name)  # the identity's part known before loading
        assert set(spec.settings(config)) <= set(projector.describe())


def test_skip_reasons_keep_their_store_codes():
    assert {str(r): c for r, c in CODES.items()} == {
        "missing-image": 1, "no-supervised-token": 2, "non-finite": 3, "error": 4,
        "image-count-mismatch": 5, "image-outside-user-turn": 6, "too-long-for-image": 7,
        "image-in-text-model": 8}
    assert set(CODES) == set(SkipReason)
    assert all(BY_CODE[c] is r and r.code == c for r, c in CODES.items())
    assert f"{SkipReason.ERROR}" == "error" and SkipReason.ERROR == "error"


def test_every_setting_with_an_option_has_help():
    for cls in (SelectConfig, WarmupConfig, ScoreConfig):
        for fd in fields(cls):
            if fd.metadata.get("cli"):
                assert fd.metadata["help"].strip(), (cls.__name__, fd.name)


def test_api_errors_name_arguments_and_direct_settings_name_flags():
    rng = np.random.default_rng(0)
    report = tive.value_estimate(features=rng.normal(size=(10, 4)), norms=np.ones(10),
                                 tasks=["a"] * 5 + ["b"] * 5)
    with pytest.raises(ConfigError, match=r"^budget=2\.0: a fraction is below 1"):
        report.select(budget=2.0)
    with pytest.raises(ConfigError, match="^seed does not apply to method=gradnorm"):
        report.select(budget=0.5, method="gradnorm", seed=1)
    with pytest.raises(ConfigError, match=r"^exclude='zz': no such task"):
        report.select(budget=0.5, exclude=["zz"])
    with pytest.raises(ConfigError, match=r"^--budget 2\.0: a fraction is below 1"):
        SelectConfig(budget=2.0)
    with pytest.raises(ConfigError, match="^--proj-dim does not apply to --projector none"):
        ScoreConfig(projector="none", proj_dim=4)


def _required(fn) -> int:
    """How many positional parameters ``fn`` requires (``self`` aside)."""
    return sum(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
               for p in inspect.signature(fn).parameters.values() if p.name != "self")


def _takes(fn, options) -> bool:
    """Whether ``fn`` accepts each of ``options`` as a keyword."""
    ps = inspect.signature(fn).parameters
    return any(p.kind is p.VAR_KEYWORD for p in ps.values()) or set(options) <= set(ps)


def test_every_registered_extension_keeps_its_contract():
    """Walk each registry: every family, projector and method implements its contract (a
    family's loader and encoder maker, a projector's methods, a method's chooser), so a new
    one is its own file plus one registry line."""
    import torch

    from tive.models.family import EncoderFactory, Family, Loader
    from tive.projection.base import Projector
    from tive.selection.methods import MixtureMetric, TaskChooser

    assert registry.FAMILIES and PROJECTORS and METHODS
    for family in registry.FAMILIES.values():
        assert isinstance(family, Family)
        module = sys.modules[family.load.__module__]  # the family's own module holds FAMILY
        assert module.__name__.startswith("tive.models.") and module.FAMILY is family
        assert _required(family.load) == _required(Loader.__call__) == 2
        assert _required(family.encoder) == _required(EncoderFactory.__call__) == 4
        assert _takes(family.encoder, family.options), family.name
    for spec in PROJECTORS.values():
        projector = spec.build([3, 4], k=8, seed=0, nnz=1, device="cpu")
        assert isinstance(projector, Projector), spec.name
        projector.start(2, torch.device("cpu"), torch.float32)
        projector.add(0, torch.ones(2, 3))
        projector.add(1, torch.ones(2, 4))
        assert tuple(projector.finish().shape) == (2, projector.dim)
        assert projector.describe()["type"] == spec.name
    for spec in METHODS.values():
        contract = TaskChooser if spec.by_task else MixtureMetric
        assert _required(spec.chooser()) == _required(contract.__call__), spec.name
