"""Keeping the model fed and within memory: encoding workers, ``--batch-size auto`` backing off
on out-of-memory (simulated here), gradient checkpointing and ``--key-layers``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import assert_close_to_scale
from test_gradients import batched, collate, items, peft_model, reference, rel
from test_warmup import image_mixture
from zoo import save_llava_folder

from tive.cli.commands import main
from tive.errors import ConfigError
from tive.projection.projectors import Identity
from tive.scoring.gradients import GradientFeatures
from tive.scoring.settings import parse_key_layers
from tive.store.format import ARRAYS, Store
from tive.warmup.lora import key_parameters

SMALL = ["--proj-dim", "64", "--max-length", "256", "--device", "cpu", "--quiet",
         "--feature-dtype", "float32"]


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A tiny LLaVA, a mixture with images, and a warm-up reference to score with."""
    root = tmp_path_factory.mktemp("feeding")
    save_llava_folder(root / "model")
    data = image_mixture(root / "data", n_per_task=5)
    res = CliRunner().invoke(main, ["warmup", "--model", str(root / "model"), "--data",
                                    str(data), "--run", str(root / "ref"), "--fraction", "1",
                                    "--lora-r", "4", "--lora-alpha", "8", "--global-batch", "5",
                                    "--lr", "0.01", "--quiet"])
    assert res.exit_code == 0, res.output
    return {"model": root / "model", "data": data, "ref": root / "ref" / "reference"}


def score(scored, run, *extra):
    res = CliRunner().invoke(main, ["score", "--model", str(scored["model"]), "--data",
                                    str(scored["data"]), "--reference", str(scored["ref"]),
                                    "--run", str(run), *SMALL, *map(str, extra)])
    return res


def arrays(run) -> dict[str, bytes]:
    return {name: (run / "store" / f"{name}.npy").read_bytes() for name in ("features", *ARRAYS)}


def test_worker_processes_write_the_same_bytes_as_one_process(scored, tmp_path):
    res0 = score(scored, tmp_path / "w0", "--workers", 0, "--batch-size", 4)
    res2 = score(scored, tmp_path / "w2", "--workers", 2, "--batch-size", 4)
    assert res0.exit_code == 0 and res2.exit_code == 0, res0.output + res2.output
    assert "batch size: 4 (0 encoding workers)" in res0.output
    assert "batch size: 4 (2 encoding workers)" in res2.output
    assert arrays(tmp_path / "w2") == arrays(tmp_path / "w0")
    assert Store.open(tmp_path / "w2").complete


def _oom_above(monkeypatch, most: int) -> list[int]:
    """GradientFeatures raises CUDA's out-of-memory error for batches above ``most`` records;
    returns the list of batch sizes it was called with."""
    seen: list[int] = []
    real = GradientFeatures.__call__

    def call(self, batch):
        seen.append(len(batch["input_ids"]))
        if len(batch["input_ids"]) > most:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, batch)

    monkeypatch.setattr(GradientFeatures, "__call__", call)
    return seen


def test_auto_batch_halves_on_out_of_memory_and_loses_or_repeats_no_row(scored, tmp_path,
                                                                       monkeypatch):
    seen = _oom_above(monkeypatch, 3)
    res = score(scored, tmp_path / "auto", "--batch-size", "auto")
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert seen[:5] == [15, 7, 3, 3, 1]  # 15 records: planned as one batch of 64, then halved
    assert "batch size: auto → 3, after 2 halvings out of GPU memory" in res.output
    store = Store.open(tmp_path / "auto")
    assert store.complete and store.array("done").all()
    assert store.meta["settings"]["batch_size"] == "auto"
    assert store.meta["settings"]["batch_used"] == 3
    monkeypatch.undo()
    fixed = score(scored, tmp_path / "fixed", "--batch-size", 3)
    assert fixed.exit_code == 0
    a, b = Store.open(tmp_path / "auto"), Store.open(tmp_path / "fixed")
    np.testing.assert_allclose(np.asarray(a.features), np.asarray(b.features), atol=1e-5)
    np.testing.assert_allclose(a.array("norms"), b.array("norms"), rtol=1e-5)
    assert (a.array("skipped") == b.array("skipped")).all()


def test_auto_resumes_from_the_size_that_fitted(scored, tmp_path, monkeypatch):
    seen = _oom_above(monkeypatch, 3)
    assert score(scored, tmp_path / "r", "--batch-size", "auto").exit_code == 0
    meta = tmp_path / "r" / "store" / "meta.json"
    m = json.loads(meta.read_text())
    m["complete"] = False
    meta.write_text(json.dumps(m))
    done = np.load(tmp_path / "r" / "store" / "done.npy")
    done[:7] = False
    np.save(tmp_path / "r" / "store" / "done.npy", done)
    seen.clear()
    res = score(scored, tmp_path / "r", "--batch-size", "auto")
    assert res.exit_code == 0, res.output
    assert max(seen) == 3 and sum(seen) == 7  # straight at the size that fitted, 7 rows


def test_out_of_memory_with_a_fixed_batch_or_one_record_is_one_line(scored, tmp_path,
                                                                     monkeypatch):
    _oom_above(monkeypatch, 2)
    res = score(scored, tmp_path / "fixed", "--batch-size", 4)
    last = res.stderr.strip().splitlines()[-1]
    assert res.exit_code == 2 and last.startswith("error: a batch of 4 records")
    assert "does not fit in GPU memory" in last and "fix: --batch-size auto" in last
    _oom_above(monkeypatch, 0)
    res = score(scored, tmp_path / "one", "--batch-size", "auto")
    assert res.exit_code == 2 and "alone does not fit in GPU memory" in res.stderr


@pytest.mark.parametrize("family", ["llava", "bunny", "qwen2-vl", "llama", "phi"])
def test_checkpointed_gradients_equal_the_plain_ones(family):
    model = peft_model(family)
    records = items(family)
    keys = key_parameters(model)
    plain = batched(model, records, batch_size=3)
    out, calls = [], []
    with GradientFeatures(model, Identity([k.numel for k in keys]), checkpointing=True) as gf:
        assert len(gf._checkpointed) == 2  # the two decoder layers of the language model
        for layer in gf._checkpointed:  # the library's checkpoint, counted
            real = layer._gradient_checkpointing_func
            layer._gradient_checkpointing_func = (
                lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
        for start in range(0, len(records), 3):
            batch = collate(records[start:start + 3], 0)
            batch = {k: v.double() if v is not None and v.is_floating_point() else v
                     for k, v in batch.items()}
            out.append(gf(batch).features)  # the guard: every hook fired exactly once
    assert len(calls) == 2 * 2  # each layer ran checkpointed, in each of the two batches
    assert rel(np.concatenate(out), plain["features"]) < 1e-10


def test_checkpointed_warmup_trains_the_same_adapter(tmp_path):
    from test_warmup import _trained

    from tive.data.mixture import load_mixture
    from tive.models.load import load_model
    from tive.models.registry import resolve
    from tive.warmup.settings import WarmupConfig
    from tive.warmup.training import train

    plain = _trained(tmp_path, 3)[0]
    loaded = load_model(resolve(str(tmp_path / "model")), dtype="fp32", device="cpu")
    mixture = load_mixture(tmp_path / "data" / "mix.json")
    config = WarmupConfig(fraction=1.0, r=4, alpha=8, dropout=0.0, lr=0.01, projector_lr=0.01,
                          epochs=2, global_batch=6, batch_size=3, gradient_checkpointing=True)
    ckpt = train(loaded, mixture, np.arange(len(mixture)), config, progress=False)
    assert any(getattr(m, "gradient_checkpointing", False) for m in ckpt["model"].modules())
    a, b = plain["model"].state_dict(), ckpt["model"].state_dict()
    for k in a:
        if "lora_" in k or "modules_to_save" in k:
            assert_close_to_scale(b[k], a[k])


@pytest.mark.parametrize("family", ["llava", "llama"])
def test_key_layers_are_the_last_layers_blocks_of_the_exact_gradient(family):
    model = peft_model(family)
    records = items(family)
    every = key_parameters(model)
    last = key_parameters(model, last_layers=1)
    assert 0 < len(last) < len(every) and every[-len(last):] == last
    assert len({k.name.split(".self_attn.")[0] for k in last}) == 1
    exact = reference(model, records)["grads"]
    keep = np.concatenate([np.full(k.numel, k in last) for k in every])
    out = []
    with GradientFeatures(model, Identity([k.numel for k in last]), last_layers=1) as gf:
        for start in range(0, len(records), 3):
            batch = collate(records[start:start + 3], 0)
            batch = {k: v.double() if v is not None and v.is_floating_point() else v
                     for k, v in batch.items()}
            out.append(gf(batch).features)
    assert rel(np.concatenate(out), exact[:, keep]) < 1e-10


def test_key_layers_option_is_checked_and_reaches_the_store(scored, tmp_path):
    assert parse_key_layers("last:8") == 8 and parse_key_layers(None) is None
    for bad in ("last:0", "first:2", "8", "last:x"):
        with pytest.raises(ConfigError, match="expected last:N"):
            parse_key_layers(bad)
    with pytest.raises(ConfigError, match="the model has 2 decoder layers; fix: at most last:2"):
        key_parameters(peft_model("llava"), last_layers=3)
    res = score(scored, tmp_path / "k", "--key-layers", "last:1", "--batch-size", 8)
    assert res.exit_code == 0, res.output
    full = score(scored, tmp_path / "all", "--batch-size", 8)
    assert full.exit_code == 0
    k, a = Store.open(tmp_path / "k"), Store.open(tmp_path / "all")
    assert 0 < k.meta["key_parameters"]["gradient_dim"] < a.meta["key_parameters"]["gradient_dim"]


def _half(family: str, dtype: torch.dtype = torch.bfloat16):
    """A tiny peft model in ``dtype`` whose LoRA matrices are float32, as peft loads an
    adapter onto a 16-bit model."""
    model = peft_model(family).to(dtype)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    return model


def _features(model, records, dtype) -> np.ndarray:
    out = []
    with GradientFeatures(model, Identity([k.numel for k in key_parameters(model)])) as gf:
        for start in range(0, len(records), 3):
            batch = collate(records[start:start + 3], 0)
            out.append(gf({k: v.to(dtype) if v is not None and v.is_floating_point() else v
                           for k, v in batch.items()}).features.astype(np.float64))
    return np.concatenate(out)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_adapter_dtype_model_casts_every_lora_matrix_and_nothing_else():
    from tive.warmup.lora import adapters_to_model_dtype

    model = _half("llava")
    before = {n: p.dtype for n, p in model.named_parameters()}
    assert adapters_to_model_dtype(model) == torch.bfloat16
    for name, p in model.named_parameters():
        want = torch.bfloat16 if "lora_" in name else before[name]
        assert p.dtype == want, name
    exact = peft_model("llava")  # a float64 model: its adapters are already of its type
    state = {k: v.clone() for k, v in exact.state_dict().items()}
    assert adapters_to_model_dtype(exact) == torch.float64
    assert all(torch.equal(v, exact.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("family", ["llava", "llama", "qwen2-vl"])
def test_bfloat16_adapters_give_features_near_the_float32_adapters_ones(family):
    from tive.warmup.lora import adapters_to_model_dtype

    records = items(family)
    exact = reference(peft_model(family), records)["grads"]
    model = _half(family)
    f32 = _features(model, records, torch.bfloat16)
    adapters_to_model_dtype(model)
    b16 = _features(model, records, torch.bfloat16)
    assert not np.array_equal(b16, f32)  # the adapters' path did change type
    # tiny random models (widths 16-64) round worst; benchmarks/fidelity.py --precision
    # measures a real one
    assert _cosines(b16, f32).min() > 0.99
    assert _cosines(b16, exact).min() > 0.99 and _cosines(f32, exact).min() > 0.99


def _fake_mixed_bmm(monkeypatch, calls: list, fail: bool = False) -> None:
    """Pretend this CPU has PyTorch's CUDA-only ``bmm(..., out_dtype=float32)``: the float32
    product of the upcast 16-bit inputs (what the kernel computes), or an error (``fail``)."""
    import tive.scoring.gradients as gradients

    real = torch.bmm

    def bmm(a, b, *, out_dtype=None):
        if out_dtype is None:
            return real(a, b)
        calls.append((a.dtype, b.dtype, out_dtype))
        if fail:
            raise RuntimeError("bmm.dtype: not implemented for this device")
        return real(a.float(), b.float())

    monkeypatch.setattr(gradients, "_mixed_bmm", lambda device: True)
    monkeypatch.setattr(gradients, "_NO_MIXED_BMM", set())
    monkeypatch.setattr(torch, "bmm", bmm)


@pytest.mark.parametrize("fail", [False, True])
def test_sixteen_bit_products_accumulate_in_float32_as_the_einsum_does(monkeypatch, fail):
    from tive.scoring.gradients import per_sample_products

    rng = torch.Generator().manual_seed(0)
    delta = torch.randn(3, 7, 5, generator=rng).to(torch.bfloat16)
    x = torch.randn(3, 7, 4, generator=rng).to(torch.bfloat16)
    plain = per_sample_products(delta, x, torch.float32)  # a CPU: upcast, then the einsum
    calls: list = []
    _fake_mixed_bmm(monkeypatch, calls, fail)
    if fail:
        with pytest.warns(UserWarning, match="per-sample products run in float32"):
            mixed = per_sample_products(delta, x, torch.float32)
    else:
        mixed = per_sample_products(delta, x, torch.float32)
    assert calls == [(torch.bfloat16, torch.bfloat16, torch.float32)]
    assert mixed.dtype == torch.float32 and mixed.shape == (3, 5 * 4)
    torch.testing.assert_close(mixed, plain, rtol=1e-6, atol=1e-6)
    exact = torch.stack([d.double().T @ xi.double() for d, xi in zip(delta, x)]).flatten(1)
    torch.testing.assert_close(mixed.double(), exact, rtol=1e-6, atol=1e-6)
    calls.clear()
    per_sample_products(delta.float(), x.float(), torch.float32)  # float32: never the bmm
    per_sample_products(delta, x.float(), torch.float32)
    assert calls == []


def test_out_of_memory_in_the_mixed_products_is_raised_not_taken_for_a_missing_kernel(
        monkeypatch):
    import tive.scoring.gradients as gradients

    def bmm(a, b, *, out_dtype=None):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(gradients, "_mixed_bmm", lambda device: True)
    monkeypatch.setattr(gradients, "_NO_MIXED_BMM", set())
    monkeypatch.setattr(torch, "bmm", bmm)
    half = torch.ones(1, 2, 3, dtype=torch.bfloat16)
    with pytest.raises(torch.OutOfMemoryError):  # for --batch-size auto to halve the batch
        gradients.per_sample_products(half, half, torch.float32)
    assert gradients._NO_MIXED_BMM == set()  # the fast path stays on


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")
def test_adapter_dtype_model_casts_a_lora_bias_too():
    from peft import LoraConfig, get_peft_model

    from tive.warmup.lora import adapters_to_model_dtype, warmup_targets
    from zoo import text_llama

    base = text_llama()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_bias=True,
                                            init_lora_weights=False,
                                            target_modules=warmup_targets(base)))
    model = model.to(torch.bfloat16)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    assert any("lora_B" in n and n.endswith("bias") for n, _ in model.named_parameters())
    adapters_to_model_dtype(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = torch.tensor([[3, 4, 5, 6]])
    model(input_ids=ids)  # one type throughout: the forward runs


def test_bf16_adapters_take_the_mixed_products_in_the_hooks(monkeypatch):
    from tive.warmup.lora import adapters_to_model_dtype

    records = items("llava")
    model = _half("llava")
    adapters_to_model_dtype(model)
    plain = _features(model, records, torch.bfloat16)
    calls: list = []
    _fake_mixed_bmm(monkeypatch, calls)
    mixed = _features(model, records, torch.bfloat16)
    assert len(calls) == 2 * len(key_parameters(model))  # every key matrix, both batches
    assert rel(mixed, plain) < 1e-5


def test_adapter_dtype_reaches_the_store_identity(scored, tmp_path):
    plain = score(scored, tmp_path / "fp32", "--batch-size", 8)
    model = score(scored, tmp_path / "fp32-model", "--batch-size", 8, "--adapter-dtype", "model")
    assert plain.exit_code == 0 and model.exit_code == 0, plain.output + model.output
    assert arrays(tmp_path / "fp32-model") == arrays(tmp_path / "fp32")  # float32 weights
    a = Store.open(tmp_path / "fp32")
    assert a.meta["identity"]["adapter_dtype"] == "float32"
    half = score(scored, tmp_path / "bf16", "--batch-size", 8, "--dtype", "bf16",
                 "--adapter-dtype", "model")
    assert half.exit_code == 0, half.output
    b = Store.open(tmp_path / "bf16")
    assert b.meta["identity"]["adapter_dtype"] == "bfloat16"
    assert b.meta["settings"]["adapter_dtype"] == "model"
    cos = _cosines(np.asarray(b.features, dtype=np.float64), np.asarray(a.features, np.float64))
    assert np.median(cos) > 0.9
    again = score(scored, tmp_path / "bf16", "--batch-size", 8, "--dtype", "bf16")
    assert again.exit_code == 2
    last = again.stderr.strip().splitlines()[-1]
    assert "adapter_dtype: bfloat16 → float32" in last and "fix:" in last, last


def test_a_store_from_before_adapter_dtype_continues_as_float32(scored, tmp_path):
    assert score(scored, tmp_path / "old", "--batch-size", 8).exit_code == 0
    meta = tmp_path / "old" / "store" / "meta.json"
    m = json.loads(meta.read_text())
    del m["identity"]["adapter_dtype"]  # as every store before the setting
    m["complete"] = False
    meta.write_text(json.dumps(m))
    assert score(scored, tmp_path / "old", "--batch-size", 8).exit_code == 0
    res = score(scored, tmp_path / "old", "--batch-size", 8, "--dtype", "bf16",
                "--adapter-dtype", "model")
    assert res.exit_code == 2 and "adapter_dtype: float32 → bfloat16" in res.stderr


def test_gpu_throughput_tiny_runs_the_same_code_on_a_cpu():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_throughput.py"
    res = subprocess.run([sys.executable, str(script), "--tiny", "--records", "8",
                          "--shapes", "llava-7b,bunny-3b"], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    first, _, second = res.stdout.partition("| shape | setting |")
    rows = [line for line in first.splitlines() if line.startswith("| llava-7b")
            or line.startswith("| bunny-3b")]
    assert len(rows) == 2, res.stdout
    variants = [line.split("|")[1:-1] for line in second.splitlines()
                if line.startswith("| llava-7b") or line.startswith("| bunny-3b")]
    assert len(variants) == 2 * 5, res.stdout  # 3 variants of (b), (f) twice, per shape
    assert all(float(v[2]) > 0 for v in variants)  # each ran, tive score too
    assert sum("batch size 8" in v[1] for v in variants) == 4  # defaults on a CPU: 8
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        a, b, c_prime, e = (float(cells[i]) for i in (4, 5, 6, 8))
        assert a > 0 and b > 0 and c_prime > 0 and e > 0  # (e): tive score ran end to end
        assert cells[7] == "—"  # (c) needs TRAK's CUDA kernel
