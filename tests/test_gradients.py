"""Batched per-sample gradients equal a one-record-per-backward loop, at float64, per family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from zoo import FAMILIES, VOCAB

from tive.models.encoding import collate
from tive.models.segments import Encoded
from tive.projection.projectors import Identity, SparseJL
from tive.scoring.gradients import GradientFeatures
from tive.warmup.lora import key_parameters, warmup_targets

REL = 1e-10  # issue: ≤ 1e-6; float64 gives ~1e-15, float32 anywhere ~1e-7
IMAGE_FAMILIES = ("llava", "bunny", "qwen2-vl")


def peft_model(family: str, r: int = 4, seed: int = 0):
    """A float64 tiny model of ``family`` with random (non-zero) LoRA A and B everywhere."""
    model = FAMILIES[family]().double()
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.1, init_lora_weights=False,
                        target_modules=warmup_targets(model))
    return get_peft_model(model, config).double().eval()


def items(family: str, n: int = 6, seed: int = 0) -> list[Encoded]:
    """Records of mixed lengths; for visual families every other one has an image."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(5, 14))
        ids = rng.integers(2, VOCAB - 5, size=length).tolist()
        labels = [-100] * length
        answer = int(rng.integers(2, length - 1))
        labels[answer:] = ids[answer:]
        pixel, extras, types = None, {}, None
        if family in IMAGE_FAMILIES and i % 2 == 0:
            if family == "qwen2-vl":  # 28×28 image: grid 1×2×2 patches, merged into 1 token
                ids = [VOCAB - 3, VOCAB - 1, VOCAB - 4] + ids
                pixel = torch.from_numpy(rng.normal(size=(4, 3 * 2 * 14 * 14)))
                extras = {"image_grid_thw": torch.tensor([[1, 2, 2]])}
            else:  # 28×28 image, 14 px patches: 4 image tokens
                ids = [VOCAB - 1] * 4 + ids
                pixel = torch.from_numpy(rng.normal(size=(1, 3, 28, 28)))
            labels = [-100] * (len(ids) - len(labels)) + labels
        if family == "qwen2-vl":
            types = [1 if t == VOCAB - 1 else 0 for t in ids]
        out.append(Encoded(ids, labels, int(pixel is not None), pixel, extras, types))
    return out


def reference(model, records: list[Encoded]) -> dict[str, np.ndarray]:
    """One record per backward: the model's own loss on a batch of one, autograd gradients of
    the key parameters, flattened and concatenated in key-parameter order."""
    keys = key_parameters(model)
    params = dict(model.named_parameters())
    grads, losses, ntok = [], [], []
    for item in records:
        batch = {k: v for k, v in collate([item], 0).items() if v is not None}
        batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        target = batch["labels"][0, 1:]
        supervised = target != -100
        # mean cross-entropy over supervised tokens, in float64 (the model's own loss is the
        # same mean, but upcasts logits to float32)
        loss = torch.nn.functional.cross_entropy(out.logits[0, :-1][supervised],
                                                 target[supervised])
        assert abs(out.loss.item() - loss.item()) <= 1e-5 * loss.item()
        loss.backward()
        grads.append(torch.cat([params[k.name].grad.flatten() for k in keys]).numpy())
        losses.append(loss.item())
        ntok.append(int(supervised.sum()))
    g = np.stack(grads)
    return {"grads": g, "norms": np.linalg.norm(g, axis=1), "loss": np.array(losses),
            "ntokens": np.array(ntok)}


def batched(model, records: list[Encoded], batch_size: int, side: str = "right",
            projector=None) -> dict[str, np.ndarray]:
    keys = key_parameters(model)
    proj = projector or Identity([k.numel for k in keys])
    out = {"features": [], "norms": [], "loss": [], "ntokens": []}
    with GradientFeatures(model, proj) as gf:
        for start in range(0, len(records), batch_size):
            batch = collate(records[start:start + batch_size], 0, padding_side=side)
            batch = {k: v.double() if v is not None and v.is_floating_point() else v
                     for k, v in batch.items()}
            res = gf(batch)
            for name in out:
                out[name].append(getattr(res, name))
    return {k: np.concatenate(v) for k, v in out.items()}


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def references():
    return {f: reference(peft_model(f), items(f)) for f in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_gradients_equal_one_backward_per_record(references, family, side):
    ref = references[family]
    got = batched(peft_model(family), items(family), batch_size=6, side=side)
    assert np.abs(ref["grads"]).max() > 0 and (ref["norms"] > 0).all()
    for i in range(len(ref["grads"])):  # every record, not only on average
        assert rel(got["features"][i], ref["grads"][i]) <= REL, (family, side, i)
    np.testing.assert_allclose(got["norms"], ref["norms"], rtol=REL)
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=REL)
    assert got["ntokens"].tolist() == ref["ntokens"].tolist()


@pytest.mark.parametrize("family", ["llava", "bunny", "qwen2-vl", "phi3"])
def test_batch_size_and_composition_do_not_change_a_record(references, family):
    records = items(family)
    ones = batched(peft_model(family), records, batch_size=1)
    for size, side in ((2, "left"), (4, "right")):
        got = batched(peft_model(family), records, batch_size=size, side=side)
        np.testing.assert_allclose(got["features"], ones["features"], rtol=1e-9, atol=1e-12)
    order = np.random.default_rng(1).permutation(len(records))
    shuffled = batched(peft_model(family), [records[i] for i in order], batch_size=3)
    np.testing.assert_allclose(shuffled["features"], ones["features"][order], rtol=1e-9,
                               atol=1e-12)


def test_projected_features_are_the_projection_of_the_exact_gradient(references):
    ref = references["llava"]
    model = peft_model("llava")
    jl = SparseJL([k.numel for k in key_parameters(model)], k=64, seed=3, nnz=2)
    got = batched(model, items("llava"), batch_size=4, projector=jl)
    expected = ref["grads"] @ jl.matrix().T
    np.testing.assert_allclose(got["features"], expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got["norms"], ref["norms"], rtol=REL)


def test_only_the_first_attention_weights_get_a_gradient_and_nothing_else_trains():
    model = peft_model("llama")
    with GradientFeatures(model, Identity([k.numel for k in key_parameters(model)])) as gf:
        gf(collate(items("llama", 2), 0))
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert all(".self_attn." in n and "lora_" in n for n in trainable)
        assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed on exit


def test_non_finite_record_is_flagged_and_does_not_spoil_its_batch(references):
    records = items("llama")
    model = peft_model("llama")
    ref = references["llama"]
    emb = model.get_input_embeddings().weight
    bad_token = records[2].input_ids[-1]
    with torch.no_grad():
        emb[bad_token] = float("nan")
    keep = [i for i, r in enumerate(records) if bad_token not in r.input_ids]
    got = batched(model, records, batch_size=6)
    finite = np.isfinite(got["norms"])
    assert not finite[2] and finite[keep].all() and (got["features"][~finite] == 0).all()
    for i in keep:
        assert rel(got["features"][i], ref["grads"][i]) <= REL


def test_models_that_rescale_their_logits_are_refused():
    from tive.errors import ConfigError

    model = peft_model("llama")
    model.get_base_model().config.final_logit_softcapping = 30.0
    with pytest.raises(ConfigError, match="final_logit_softcapping=30.0"):
        GradientFeatures(model, Identity([k.numel for k in key_parameters(model)]))
