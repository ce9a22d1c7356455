"""Projections: seeded, JL-accurate within a stated failure rate, and faithful to the ranking.

The bound: for a JL map to k dims and m vectors, all m² inner products of unit vectors are
kept within ε = sqrt(8 ln(2m²/δ) / k) except with probability δ (TRAK's test_jl.py checks
the same kind of bound). It holds for dense Rademacher maps; for the sparse map it holds for
vectors whose mass is spread over many coordinates, which gradients of LoRA matrices are.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from scipy.stats import spearmanr
from transformers import LlamaConfig, LlamaForCausalLM

from tive.errors import ConfigError
from tive.models.encoding import collate
from tive.models.segments import Encoded
from tive.projection.projectors import (
    Identity,
    SparseJL,
    TrakProjector,
    make_projector,
    project_rows,
)
from tive.scoring.gradients import GradientFeatures
from tive.selection.values import instance_values
from tive.warmup.lora import key_parameters

DELTA = 1e-6  # failure rate of each bound below


def epsilon(k: int, m: int, delta: float = DELTA) -> float:
    return math.sqrt(8 * math.log(2 * m * m / delta) / k)


def project(projector, x: np.ndarray, dims: list[int]) -> np.ndarray:
    """Project rows of ``x`` block by block, as the gradient hooks do."""
    return project_rows(projector, torch.from_numpy(x), dims).numpy()


def unit_gram_error(x: np.ndarray, px: np.ndarray, scale: float = 1.0) -> float:
    """Largest |⟨Px̂,Pŷ⟩ − ⟨x̂,ŷ⟩| over all pairs of rows, rows normalised by their exact norm."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    xu, pu = x / norms, px / norms / math.sqrt(scale)
    return float(np.abs(pu @ pu.T - xu @ xu.T).max())


def rms_gram_error(x: np.ndarray, px: np.ndarray, scale: float = 1.0) -> float:
    """Root-mean-square of ⟨Px̂,Pŷ⟩ − ⟨x̂,ŷ⟩ over pairs of distinct rows."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    xu, pu = x / norms, px / norms / math.sqrt(scale)
    err = pu @ pu.T - xu @ xu.T
    return float(np.sqrt(np.mean(err[~np.eye(len(x), dtype=bool)] ** 2)))


def test_sparse_jl_is_seeded_and_the_same_for_every_instance():
    dims = [300, 500]
    a, b = SparseJL(dims, 64, seed=7, nnz=2), SparseJL(dims, 64, seed=7, nnz=2)
    for block in range(2):
        for x, y in zip(a.block_map(block), b.block_map(block)):
            np.testing.assert_array_equal(x, y)
    assert not np.array_equal(SparseJL(dims, 64, seed=8).matrix(), SparseJL(dims, 64, 7).matrix())
    # blocks are independent maps: block 1 is not a copy of block 0
    assert not np.array_equal(a.block_map(0)[0][:, :300], a.block_map(1)[0][:, :300])
    m = a.matrix()
    assert ((m != 0).sum(axis=0) == 2).all()  # nnz distinct rows per column
    np.testing.assert_allclose(np.abs(m[m != 0]), 1 / math.sqrt(2))
    positive = (m > 0).sum() / (m != 0).sum()
    assert abs(positive - 0.5) < 0.05  # random signs, balanced (1600 entries: σ ≈ 0.0125)
    load = (m != 0).sum(axis=1)
    assert load.min() > 0 and load.max() < 4 * load.mean()  # rows used evenly
    x = np.random.default_rng(0).normal(size=(5, 800))
    np.testing.assert_allclose(project(a, x, dims), x @ m.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(project(a, x, dims), project(b, x, dims))


@pytest.mark.parametrize("nnz", [1, 4])
def test_sparse_jl_keeps_inner_products_within_the_jl_bound(nnz):
    rng = np.random.default_rng(1)
    dims, k, m = [5000, 7000, 8000], 4096, 24
    x = rng.normal(size=(m, sum(dims))) * rng.uniform(0.1, 10, size=(m, 1))
    x[:, :3000] += rng.normal(size=3000)  # correlated rows: inner products far from 0
    px = project(SparseJL(dims, k, seed=0, nnz=nnz), x, dims)
    assert unit_gram_error(x, px) <= epsilon(k, m)
    # and on average as a JL map should: RMS error of unit inner products ≈ √((1+c²)/k)
    assert rms_gram_error(x, px) <= 1.5 * math.sqrt(2 / k)
    ratio = np.linalg.norm(px, axis=1) / np.linalg.norm(x, axis=1)
    assert np.abs(ratio - 1).max() <= epsilon(k, m)


def test_trak_projector_keeps_inner_products_and_is_seeded():
    rng = np.random.default_rng(2)
    dims, k, m = [1500, 2500], 2048, 16
    x = rng.normal(size=(m, sum(dims)))
    a = project(TrakProjector(dims, k, seed=0), x, dims)
    np.testing.assert_array_equal(a, project(TrakProjector(dims, k, seed=0), x, dims))
    assert not np.array_equal(a, project(TrakProjector(dims, k, seed=1), x, dims))
    assert unit_gram_error(x, a, scale=k) <= epsilon(k, m)  # TRAK's entries are ±1, unscaled
    assert rms_gram_error(x, a, scale=k) <= 1.5 * math.sqrt(2 / k)


def test_options_that_do_not_apply_are_refused():
    with pytest.raises(ConfigError, match="multiple of nnz"):
        SparseJL([10], 100, nnz=3)
    with pytest.raises(ConfigError, match="--projector 'dense'"):
        make_projector("dense", [10])
    assert make_projector("none", [3, 4]).dim == 7


def ranking_model(r: int = 32):
    """A Llama small enough for the CPU and with a gradient (≈64K) much longer than k."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=96, intermediate_size=128,
                                         num_hidden_layers=3, num_attention_heads=4,
                                         num_key_value_heads=2)).eval()
    targets = [n for n, mod in model.named_modules() if n.endswith(("q_proj", "k_proj",
                                                                    "v_proj", "o_proj"))]
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False,
                                            target_modules=targets)).eval()


def records(n: int = 270, tasks: int = 3):
    """Records as tasks look: a fixed instruction template per task, a varying question, and
    short answers from the task's own small vocabulary (so gradients correlate within a task)."""
    rng = np.random.default_rng(0)
    templates = [rng.integers(2, 96, size=6).tolist() for _ in range(tasks)]
    answers = [rng.integers(2, 96, size=5) for _ in range(tasks)]
    out, names = [], []
    for i in range(n):
        t = i % tasks
        prompt = rng.integers(2, 96, size=int(rng.integers(2, 7))).tolist() + templates[t]
        answer = rng.choice(answers[t], size=int(rng.integers(1, 5))).tolist()
        out.append(Encoded(prompt + answer, [-100] * len(prompt) + answer, 0, None))
        names.append(f"task{t}")
    return out, np.array(names)


def features(model, projector, items) -> np.ndarray:
    with GradientFeatures(model, projector) as gf:
        return np.concatenate([gf(collate(items[i:i + 20], 0)).features
                               for i in range(0, len(items), 20)])


def test_projected_instance_values_rank_like_exact_ones_at_k_8192():
    model = ranking_model()
    dims = [k.numel for k in key_parameters(model)]
    assert sum(dims) > 6 * 8192
    items, tasks = records()
    exact = features(model, Identity(dims), items)
    names, codes = np.unique(tasks, return_inverse=True)
    valid = np.ones(len(items), dtype=bool)
    truth, _ = instance_values(exact.astype(np.float64), codes, len(names), valid)
    for projector, scale in ((SparseJL(dims, 8192, seed=0), 1.0),
                             (TrakProjector(dims, 8192, seed=0), 8192.0)):
        px = project(projector, exact.astype(np.float64), dims)
        assert unit_gram_error(exact.astype(np.float64), px, scale) <= epsilon(8192, len(items))
        values, _ = instance_values(px, codes, len(names), valid)
        for t in range(len(names)):
            rho = spearmanr(values[codes == t], truth[codes == t]).statistic
            assert rho >= 0.98, (projector.kind, names[t], rho)
    # the hooks project as they go: the same as projecting the exact gradient afterwards
    jl = SparseJL(dims, 8192, seed=0)
    np.testing.assert_allclose(features(model, jl, items), project(jl, exact, dims),
                               rtol=1e-4, atol=1e-6)
