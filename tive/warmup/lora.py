"""LoRA on the language model, and the *key parameters* whose gradients TIVE uses.

* Warm-up targets (the authors' recipe, LLaVA's LoRA): every ``nn.Linear`` of the language
  model except the output head; never the vision tower. The multimodal projector is trained
  whole beside the adapter (peft's ``modules_to_save``), as LLaVA's ``non_lora_trainables``.
* Key parameters (docs/design.md, "The method in brief"): the LoRA ``A`` and ``B`` matrices of
  the language model's *self-attention* projections — q,k,v,o for Llama/Qwen2, q,k,v,dense for Phi,
  qkv_proj,o_proj for Phi-3. They are found from the module structure (LoRA layers whose parent
  is the attention module of a decoder layer of the language model), not from name substrings,
  so vision attention (SigLIP, CLIP, Qwen2-VL's ``VisionAttention``) is never included.

A ``(in, out)`` projection with rank ``r`` contributes ``r·in + out·r`` numbers; for a 7B Llama
at r=128 the total is 32 layers × 4 × (4096·128 + 128·4096) = 134,217,728.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tive.errors import ConfigError
from tive.models.family import Family
from tive.models.registry import family as family_named
from tive.settings import named


@dataclass(frozen=True)
class KeyParameter:
    """One LoRA matrix of a self-attention projection.

    Attributes:
        name: the parameter's qualified name in the peft model.
        shape: ``(rank, in)`` for A, ``(out, rank)`` for B.
    """

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def language_model_prefix(model: nn.Module) -> str:
    """Qualified name of the language model (decoder) inside ``model``.

    ``model.language_model`` for LLaVA/Bunny/Qwen2-VL in transformers 5, ``model`` for a causal
    LM. Taken from the model's own ``get_decoder()``.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None:
        raise ConfigError(f"{type(model).__name__}: cannot find its language model "
                          f"(no get_decoder()); expected a transformers causal or "
                          f"vision-language model")
    for name, module in model.named_modules():
        if module is decoder:
            return name
    raise ConfigError(f"{type(model).__name__}: get_decoder() is not one of its modules")


def warmup_targets(model: nn.Module, only: tuple[str, ...] = ()) -> list[str]:
    """Qualified names of the ``nn.Linear`` layers of the language model (warm-up LoRA targets).

    Args:
        only: keep the layers whose own name is one of these (e.g. ``("q_proj", "v_proj")``);
            empty: every linear layer (the authors' recipe).

    The output head lies outside the decoder, and the vision tower and projector outside the
    language model, so none of them is ever listed.

    Raises:
        ConfigError: a name in ``only`` matches no linear layer of the language model.
    """
    prefix = language_model_prefix(model)
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and _under(name, prefix)]
    if not only:
        return names
    known = sorted({n.rsplit(".", 1)[-1] for n in names})
    unknown = [o for o in only if o not in known]
    if unknown:
        raise ConfigError(f"--lora-targets {unknown[0]!r}: no such linear layer in the language "
                          f"model; choose among {', '.join(known)}")
    return [n for n in names if n.rsplit(".", 1)[-1] in only]


def attention_projections(model: nn.Module) -> list[str]:
    """Qualified names of the linear projections of the language model's self-attention.

    A self-attention module is a child named ``self_attn`` of a decoder layer (every causal LM
    family in transformers names it so); its direct ``nn.Linear`` children are the projections.
    """
    prefix = language_model_prefix(model)
    names = []
    for name, module in model.named_modules():
        if _under(name, prefix) and name.rsplit(".", 1)[-1] == "self_attn":
            names += [f"{name}.{child}" for child, sub in module.named_children()
                      if isinstance(sub, nn.Linear) or _is_lora_layer(sub)]
    if not names:
        raise ConfigError(f"{type(model).__name__}: no self_attn projections under {prefix!r}; "
                          f"this model family is not supported for gradient features")
    return names


def key_parameters(peft_model: nn.Module, adapter: str = "default",
                   last_layers: int | None = None) -> list[KeyParameter]:
    """The LoRA A and B matrices of the self-attention projections, in module order.

    Args:
        peft_model: a model wrapped by peft with LoRA on (at least) the attention projections.
        adapter: the peft adapter name.
        last_layers: only those of the last N decoder layers (``--key-layers last:N``: the
            backward then stops N layers from the top); None: every layer (the paper's).

    Raises:
        ConfigError: when an attention projection has no LoRA adapter (the adapter does not
            cover the key parameters), or the model has fewer than ``last_layers`` layers.
    """
    modules = dict(peft_model.named_modules())
    out = []
    names = attention_projections(peft_model)
    if last_layers is not None:
        layers = list(dict.fromkeys(n.rsplit(".self_attn.", 1)[0] for n in names))
        if last_layers > len(layers):
            raise ConfigError(f"{named('key_layers', f'last:{last_layers}')}: the model has "
                              f"{len(layers)} decoder layers; fix: at most last:{len(layers)}")
        keep = set(layers[-last_layers:])
        names = [n for n in names if n.rsplit(".self_attn.", 1)[0] in keep]
    for name in names:
        layer = modules[name]
        if not _is_lora_layer(layer) or adapter not in layer.lora_A:
            raise ConfigError(f"{name}: has no LoRA adapter {adapter!r}; the key parameters are "
                              f"the LoRA matrices of every self-attention projection; fix: "
                              f"include it in the LoRA targets")
        for part in ("lora_A", "lora_B"):
            weight = getattr(layer, part)[adapter].weight
            out.append(KeyParameter(f"{name}.{part}.{adapter}.weight", tuple(weight.shape)))
    return out


def key_coverage(peft_model: nn.Module, keys: list[KeyParameter],
                 adapter: str = "default") -> dict[str, Any]:
    """The key parameters hooked against those expected, by module count and by LoRA entries
    (``STORE/meta.json``'s ``key_parameters.coverage``, read by ``tive check``).

    Expected: every linear projection directly inside an attention module (a module named
    ``self_attn`` or whose class name ends in ``Attention``) of the language model, each
    counted as ``r·(in + out)`` entries (``r``: its LoRA rank, else the adapter's). Hooked:
    the projections of ``keys`` and their entries.

    Returns:
        ``{"expected": {"modules", "parameters"}, "hooked": {...}, "missing": [up to 8
        names]}``.
    """
    prefix = language_model_prefix(peft_model)
    config = getattr(peft_model, "peft_config", {}).get(adapter)
    default_r = int(getattr(config, "r", 0) or 0)
    expected: dict[str, int] = {}
    for name, module in peft_model.named_modules():
        if not _under(name, prefix) or not (name.rsplit(".", 1)[-1] == "self_attn"
                                            or type(module).__name__.endswith("Attention")):
            continue
        for child, sub in module.named_children():
            if _is_lora_layer(sub) and adapter in sub.lora_A:
                r = sub.lora_A[adapter].weight.shape[0]
            elif isinstance(sub, nn.Linear):
                r = default_r
            else:
                continue
            expected[f"{name}.{child}"] = r * (sub.in_features + sub.out_features)
    hooked: dict[str, int] = {}
    for key in keys:
        module = key.name.split(".lora_")[0]
        hooked[module] = hooked.get(module, 0) + key.numel
    missing = [n for n in expected if n not in hooked]
    return {"expected": {"modules": len(expected), "parameters": sum(expected.values())},
            "hooked": {"modules": len(hooked), "parameters": sum(hooked.values())},
            "missing": missing[:8]}


def gradient_dim(params: list[KeyParameter]) -> int:
    """Total number of key-parameter entries: the length of one per-sample gradient."""
    return sum(p.numel for p in params)


def expected_gradient_dim(model: nn.Module, r: int) -> int:
    """``Σ r·(in + out)`` over the self-attention projections of a model without LoRA."""
    modules = dict(model.named_modules())
    return sum(r * (modules[n].in_features + modules[n].out_features)
               for n in attention_projections(model))


def trained_projector(model: nn.Module, family: Family | str, train: bool | None) -> str | None:
    """Qualified name of the multimodal projector the warm-up trains, or None.

    Args:
        family: the model's family (or its name): its ``projector`` and whether the TIVE
            authors' recipe trains it (LLaVA's mm_projector; Qwen2-VL's merger only when asked).
        train: True/False as asked, None for the family's default.

    Raises:
        ConfigError: ``train`` is True for a model without a multimodal projector.
    """
    kind = family_named(family) if isinstance(family, str) else family
    family, suffix, default = kind.name, kind.projector, kind.trains_projector
    name = None
    if suffix is not None:
        name = next((n for n, _ in model.named_modules()
                     if n == suffix or n.endswith("." + suffix)), None)
    if train and name is None:
        raise ConfigError(f"--train-projector: this {family} model has no multimodal projector "
                          f"to train; fix: leave it out")
    return name if (default if train is None else train) else None


def lora_config(model: nn.Module, r: int = 128, alpha: int = 256, dropout: float = 0.05,
                targets: list[str] | None = None,
                modules_to_save: list[str] | None = None):  # -> peft.LoraConfig
    """A peft ``LoraConfig`` on ``targets`` (default: :func:`warmup_targets`).

    Args:
        modules_to_save: whole modules trained beside the adapter and saved with it (peft
            keeps a trainable copy; ``PeftModel.from_pretrained`` restores it).

    Returns:
        ``peft.LoraConfig`` with exact module names, so nothing outside the language model
        can match.
    """
    from peft import LoraConfig

    if r < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise ConfigError(f"LoRA r={r}, alpha={alpha}, dropout={dropout}: expected r ≥ 1, "
                          f"alpha > 0, 0 ≤ dropout < 1")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=list(targets if targets is not None else warmup_targets(model)),
                      modules_to_save=modules_to_save, bias="none")


def adapters_to_model_dtype(peft_model: nn.Module, adapter: str = "default") -> torch.dtype:
    """Cast every LoRA ``A``/``B`` matrix of ``adapter`` to its base layer's weight type, in
    place, and return the key parameters' type (``--adapter-dtype model``).

    peft keeps adapters in float32 on a 16-bit model, so each LoRA layer casts its input to
    float32 (an extra copy that the backward pass keeps for the trainable ``A``) and runs its
    two matmuls in float32. In the model's type the adapter's path runs as the model does (as
    the TIVE authors' peft did); the per-sample gradients are still accumulated in float32
    (docs/design.md, "Scoring").
    """
    for module in peft_model.modules():
        if not _is_lora_layer(module) or adapter not in module.lora_A:
            continue
        base = getattr(module.get_base_layer(), "weight", None)
        if base is None or not base.dtype.is_floating_point:
            continue
        for part in (module.lora_A[adapter], module.lora_B[adapter]):
            part.to(dtype=base.dtype)  # weight, and a bias (peft's lora_bias) alike
    keys = key_parameters(peft_model, adapter)
    params = dict(peft_model.named_parameters())
    return params[keys[0].name].dtype if keys else torch.float32


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name.startswith(prefix + ".")


def _is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)
