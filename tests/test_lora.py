"""LoRA targets stay in the language model; key parameters are its self-attention LoRA matrices."""

from __future__ import annotations

import re

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM
from zoo import ATTENTION, FAMILIES

from tive.errors import ConfigError
from tive.warmup import lora

VISION = re.compile(r"vision|visual|multi_modal_projector|merger")


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param, FAMILIES[request.param]()


def test_warmup_targets_are_every_linear_of_the_language_model_and_nothing_else(family):
    name, model = family
    targets = lora.warmup_targets(model)
    prefix = lora.language_model_prefix(model)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert targets and set(targets) == {n for n in linears if n.startswith(prefix + ".")}
    assert not [t for t in targets if VISION.search(t) or t.endswith("lm_head")]
    assert any(VISION.search(n) for n in linears) == (name in ("llava", "bunny", "qwen2-vl"))


def test_lora_wraps_no_vision_module_and_key_parameters_match_the_formula(family):
    name, model = family
    r = 4
    expected = lora.expected_gradient_dim(model, r)
    peft_model = get_peft_model(model, lora.lora_config(model, r=r, alpha=8))
    wrapped = [n for n, m in peft_model.named_modules() if lora._is_lora_layer(m)]
    assert wrapped and not [n for n in wrapped if VISION.search(n)]
    params = lora.key_parameters(peft_model)
    names = {p.name.split(".self_attn.")[1].split(".")[0] for p in params}
    assert names == ATTENTION[name]
    layers = model.config.get_text_config().num_hidden_layers
    assert len(params) == 2 * layers * len(ATTENTION[name])
    assert lora.gradient_dim(params) == expected
    named = dict(peft_model.named_parameters())
    for p in params:
        assert tuple(named[p.name].shape) == p.shape and p.shape[0 if "lora_A" in p.name else 1] == r


def test_gqa_projections_count_their_own_widths():
    model = FAMILIES["llama"]()  # hidden 32, 4 heads, 2 kv heads: k/v project 32 -> 16
    r = 3
    per_layer = r * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32))
    assert lora.expected_gradient_dim(model, r) == 2 * per_layer


def test_design_formula_for_7b_llama_and_phi2_at_rank_128():
    with torch.device("meta"):  # shapes only, no memory
        llama7b = LlamaForCausalLM(LlamaConfig())
        phi2 = PhiForCausalLM(PhiConfig(hidden_size=2560, intermediate_size=10240,
                                        num_hidden_layers=32, num_attention_heads=32,
                                        partial_rotary_factor=0.4, vocab_size=51200))
    assert lora.expected_gradient_dim(llama7b, 128) == 32 * 4 * 2 * 4096 * 128 == 134_217_728
    assert lora.expected_gradient_dim(phi2, 128) == 32 * 4 * 2 * 2560 * 128


def test_key_parameters_refuse_an_adapter_that_misses_an_attention_projection():
    model = FAMILIES["llama"]()
    targets = [t for t in lora.warmup_targets(model) if not t.endswith("k_proj")]
    peft_model = get_peft_model(model, lora.lora_config(model, r=2, alpha=4, targets=targets))
    with pytest.raises(ConfigError, match=r"k_proj: has no LoRA adapter"):
        lora.key_parameters(peft_model)


def test_lora_config_rejects_bad_hyperparameters():
    model = FAMILIES["llama"]()
    with pytest.raises(ConfigError, match="expected r ≥ 1"):
        lora.lora_config(model, r=0)
