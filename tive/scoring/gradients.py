"""Per-sample gradients of the key LoRA parameters, a whole batch per backward
(docs/design.md, "Scoring"). For a batch of B records the loss is
``Σ_i mean-token-loss_i`` (not the model's own ``labels=`` loss, a token mean over the whole
batch), so ∂loss/∂θ restricted to record i's graph is exactly record i's own gradient. Forward
hooks on each key ``lora_A``/``lora_B`` ``nn.Linear`` keep its input ``x`` ``(B, T, in)`` and
register a hook on its output; in the backward pass that hook receives the output gradient
``δ`` ``(B, T, out)``, and record i's gradient of the weight is ``Σ_t δ_it x_itᵀ``
``(out, in)`` — one batched product (:func:`per_sample_products`). Each block is squared into
the exact norm and handed to the projector at once, then dropped.

The model is in eval mode (no dropout). Only the key LoRA weights require gradients, and the
backward pass is asked (``inputs=``) only for the weights of the *first* attention module:
every key output lies on a path to them, so all hooks fire, while no weight gradient other
than those few is ever computed. A check that every hook fired once guards this.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from tive.errors import ConfigError, TiveError
from tive.models.load import enable_checkpointing, text_vocab
from tive.models.registry import derives_positions
from tive.models.segments import IGNORE
from tive.projection.base import Projector
from tive.warmup.lora import KeyParameter, key_parameters, language_model_prefix
from tive.warmup.moments import adam_direction


@dataclass
class BatchFeatures:
    """Per-record results of one batch (numpy, on the CPU).

    Attributes:
        features: ``(B, k)`` projected gradients (zeros where not finite).
        norms: ``(B,)`` float64 exact ‖g‖₂ over all key parameters.
        loss: ``(B,)`` float64 mean token loss.
        ntokens: ``(B,)`` int64 supervised tokens (predicted positions).
    """

    features: np.ndarray
    norms: np.ndarray
    loss: np.ndarray
    ntokens: np.ndarray

    @property
    def finite(self) -> np.ndarray:
        """``(B,)`` records whose loss, norm and features are all finite."""
        return (np.isfinite(self.loss) & np.isfinite(self.norms)
                & np.isfinite(self.features).all(axis=1))


class GradientFeatures:
    """Per-sample key-parameter gradients of a peft LoRA model, projected.

    Args:
        peft_model: the reference model (peft, LoRA on at least the self-attention projections).
        projector: receives the gradient blocks, in :attr:`keys` order.
        adapter: the peft adapter name.
        last_layers: key parameters of the last N decoder layers only (None: all); the
            backward pass then stops at the first of them.
        checkpointing: gradient checkpointing of the language model's decoder layers (their
            activations recomputed in the backward pass; dropout stays off).
        moments: ``(m, v)`` per key parameter (:func:`tive.warmup.moments.load_moments`):
            each block becomes its Adam direction before its norm and projection
            (``--optimizer-aware``); None: plain gradients.

    Use as a context manager (hooks are removed on exit) or call :meth:`close`.
    """

    def __init__(self, peft_model: nn.Module, projector: Projector,
                 adapter: str = "default", last_layers: int | None = None,
                 checkpointing: bool = False, moments: list | None = None) -> None:
        self.model = peft_model
        self._moments = moments
        self.projector = projector
        self.keys: list[KeyParameter] = key_parameters(peft_model, adapter, last_layers)
        modules = dict(peft_model.named_modules())
        params = dict(peft_model.named_parameters())
        self._linears = [modules[k.name.rsplit(".", 1)[0]] for k in self.keys]
        for layer_name in {k.name.split(".lora_")[0] for k in self.keys}:
            if adapter in getattr(modules[layer_name], "lora_variant", {}):
                raise ConfigError(f"{layer_name}: the adapter uses a LoRA variant (e.g. DoRA); "
                                  f"only plain LoRA gradients are supported")
        weights = [params[k.name] for k in self.keys]
        self._weights = weights
        self._arm()
        first = self.keys[0].name.rsplit(".self_attn.", 1)[0]
        self._inputs = [w for k, w in zip(self.keys, weights)
                        if k.name.rsplit(".self_attn.", 1)[0] == first]
        self.dtype = torch.float64 if weights[0].dtype == torch.float64 else torch.float32
        self.hf_model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") \
            else peft_model
        self._backbone = getattr(self.hf_model, "model", None)
        self._head = self.hf_model.get_output_embeddings()
        if not isinstance(self._backbone, nn.Module) or self._head is None:
            raise ConfigError(f"{type(self.hf_model).__name__}: expected a transformers model "
                              f"with .model (backbone) and an output head")
        self._checkpointed = _checkpointed_layers(peft_model) if checkpointing else []
        self._own_positions = derives_positions(getattr(self.hf_model.config, "model_type", ""))
        self._vocab = text_vocab(self.hf_model.config)
        _check_plain_head(self.hf_model.config)
        self._active = False
        self._mask: torch.Tensor | None = None
        self._fired = [0] * len(self.keys)
        self._sq: torch.Tensor | None = None
        self._handles = [m.register_forward_hook(self._forward_hook(i))
                         for i, m in enumerate(self._linears)]

    @property
    def dims(self) -> list[int]:
        """Length of each gradient block (key-parameter order)."""
        return [k.numel for k in self.keys]

    def __enter__(self) -> GradientFeatures:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __call__(self, batch: dict[str, Any]) -> BatchFeatures:
        """Features of one collated batch (:func:`tive.models.encoding.collate`).

        Returns:
            :class:`BatchFeatures` with one row per batch row.
        """
        self._arm()
        device = self._inputs[0].device
        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()
                  if v is not None and k != "labels"}
        labels = batch["labels"].to(device, non_blocking=True)
        mask = inputs["attention_mask"]
        if not self._own_positions:
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        n = labels.shape[0]
        self._mask, self._fired = mask, [0] * len(self.keys)
        self._sq = torch.zeros(n, dtype=torch.float64, device=device)
        self.projector.start(n, device, self.dtype)
        self._active = True
        try:
            with torch.enable_grad():
                loss, ntokens = self._record_losses(inputs, labels)
                use = torch.isfinite(loss) & (ntokens > 0)
                total = loss[use].sum()
                if total.requires_grad:
                    torch.autograd.backward(total, inputs=self._inputs)
        finally:
            self._active = False
            for w in self._inputs:
                w.grad = None
        features = self.projector.finish()
        if use.any() and min(self._fired) != 1:
            block = next(i for i, f in enumerate(self._fired) if f != 1)
            raise TiveError(f"{self.keys[block].name}: received {self._fired[block]} gradients "
                            f"in one backward pass, expected 1; this model's forward does not "
                            f"use each key LoRA layer exactly once, which tive requires")
        norms = self._sq.sqrt()
        norms[~use] = float("nan")
        features[~use] = 0
        return BatchFeatures(features=features.detach().cpu().numpy(),
                             norms=norms.cpu().numpy(),
                             loss=loss.detach().double().cpu().numpy(),
                             ntokens=ntokens.cpu().numpy().astype(np.int64))

    def _arm(self) -> None:
        """Only the key LoRA weights require gradients; eval mode (no dropout), except the
        training flag of checkpointed decoder layers themselves (transformers checkpoints a
        layer only in training; the dropout modules inside it stay in eval mode)."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        for w in self._weights:
            w.requires_grad_(True)
        self.model.eval()
        for layer in getattr(self, "_checkpointed", []):
            layer.training = True

    def _record_losses(self, inputs: dict[str, torch.Tensor],
                       labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B,)`` mean token loss of each record and ``(B,)`` supervised token counts
        (:func:`record_losses`)."""
        return record_losses(self._backbone, self._head, self._vocab, self.dtype, inputs,
                             labels)

    def _forward_hook(self, block: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self._active and output.requires_grad:
                x = args[0]
                output.register_hook(lambda grad: self._on_grad(block, x, grad))
        return hook

    def _on_grad(self, block: int, x: torch.Tensor, delta: torch.Tensor) -> None:
        if self._mask is not None and x.shape[:2] == self._mask.shape:
            x = torch.where(self._mask[..., None].bool(), x, 0)  # pads: no NaN from masked rows
        grads = per_sample_products(delta, x, self.dtype)  # (B, out·in)
        if self._moments is not None:
            grads = adam_direction(grads, *self._moments[block])
        self._sq += torch.linalg.vector_norm(grads, dim=1).double() ** 2
        self.projector.add(block, grads)
        self._fired[block] += 1


def record_losses(backbone: nn.Module, head: nn.Module, vocab: int | None, dtype: torch.dtype,
                  inputs: dict[str, torch.Tensor],
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B,)`` mean token loss of each record and ``(B,)`` supervised token counts.

    Logits are computed only at supervised positions (the head applied to those hidden
    states), over the real vocabulary (``vocab`` columns, :func:`text_vocab`; None: all), in
    the head's dtype and then upcast to ``dtype``, as the model's own loss does.

    Args:
        inputs: the batch's model inputs (``input_ids``, ``attention_mask``, …) ``(B, T)``.
        labels: ``(B, T)``, IGNORE where not supervised.
    """
    hidden = backbone(**inputs, use_cache=False).last_hidden_state
    target = labels[:, 1:]
    supervised = target != IGNORE
    logits = head(hidden[:, :-1][supervised])[:, :vocab].to(dtype)
    token_loss = nn.functional.cross_entropy(logits, target[supervised], reduction="none")
    rows = supervised.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=dtype, device=labels.device).index_add(
        0, rows, token_loss)
    counts = supervised.sum(1)
    return sums / counts.clamp(min=1), counts


def per_sample_products(delta: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, out·in)`` each record's ``Σ_t δ_bt x_btᵀ``, accumulated in ``dtype``.

    ``delta`` ``(B, T, out)`` and ``x`` ``(B, T, in)``. When both are 16-bit of one type (LoRA
    matrices in a bf16 model's type, ``--adapter-dtype model``) on a GPU, one ``bmm`` reads
    them as they are and accumulates and writes in float32: a product of two 16-bit numbers is
    exact in float32, so this is the float32 einsum of the upcast inputs, up to the order of
    the sums, without the float32 copies. Elsewhere both are upcast and multiplied in ``dtype``.
    """
    if (dtype == torch.float32 and delta.dtype == x.dtype
            and delta.dtype in (torch.bfloat16, torch.float16) and _mixed_bmm(delta.device)):
        try:
            return torch.bmm(delta.transpose(1, 2), x, out_dtype=torch.float32).flatten(1)
        except torch.OutOfMemoryError:
            raise  # for --batch-size auto to halve the batch; the kernel is fine
        except (RuntimeError, TypeError) as e:  # a PyTorch or GPU without the mixed kernel
            _NO_MIXED_BMM.add(delta.device.type)
            warnings.warn(f"torch.bmm(out_dtype=float32) failed on 16-bit inputs "
                          f"({type(e).__name__}: {str(e)[:120]}); per-sample products run in "
                          f"float32 from now on (the same results, slower)", stacklevel=2)
    return torch.einsum("bto,bti->boi", delta.to(dtype), x.to(dtype)).flatten(1)


_NO_MIXED_BMM: set[str] = set()


def _mixed_bmm(device: torch.device) -> bool:
    """Whether ``torch.bmm(..., out_dtype=torch.float32)`` on 16-bit inputs is tried here
    (PyTorch has it for CUDA only)."""
    return device.type == "cuda" and "cuda" not in _NO_MIXED_BMM


def _checkpointed_layers(peft_model: nn.Module) -> list[nn.Module]:
    """Turn on (non-reentrant) gradient checkpointing for the language model's decoder layers
    and return them; the vision tower is never checkpointed (no gradient flows there)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    hf = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    if not getattr(hf, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(hf).__name__}: transformers cannot checkpoint this model; "
                          f"fix: leave out --gradient-checkpointing")
    enable_checkpointing(hf)
    prefix = language_model_prefix(peft_model)
    layers = [m for n, m in peft_model.named_modules()
              if isinstance(m, GradientCheckpointingLayer) and n.startswith(prefix + ".")]
    for name, m in peft_model.named_modules():
        if isinstance(m, GradientCheckpointingLayer) and not name.startswith(prefix + "."):
            m.gradient_checkpointing = False
    return layers


def _check_plain_head(config: Any) -> None:
    """Refuse models whose forward rescales or caps the logits after the head (Gemma-2, Cohere,
    Granite): the loss here is taken from the head's output directly.

    Raises:
        ConfigError: naming the setting.
    """
    for cfg in (config, getattr(config, "text_config", None)):
        for name, neutral in (("final_logit_softcapping", None), ("logit_scale", 1.0),
                              ("logits_scaling", 1.0)):
            value = getattr(cfg, name, None) if cfg is not None else None
            if value is not None and value != neutral:
                raise ConfigError(f"{type(config).__name__}: {name}={value}; tive takes each "
                                  f"record's loss from the output head directly and does not "
                                  f"apply logit scaling or capping; this model is not supported")
