"""Inject the PILL plug-ins into a Hugging Face causal LM, and take them out again.

Per plugged decoder layer (design note, section 2)::

    a   = n1 + A_attn(n1)          # input_layernorm   -> PillAttnInput
    v   = MAG(a, v_proj(a))        # self_attn.v_proj  -> PillValueProj
    e   = n2 + Expert[m](n2)       # post_attention_layernorm -> PillFFNInput

The model's own attention and MLP code run unchanged: pill only wraps three
existing submodules per layer, so fused attention (SDPA, flash) stays in use.
Per-token modality ids reach the wrappers through a shared :class:`PillState`,
set by a forward pre-hook on the decoder that takes a ``modality_ids=`` keyword.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .config import PillConfig
from .errors import UnsupportedModelError
from .modules import ModalityAttentionGate, ModalityExperts, build_adapter

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
PREFIX = "pill_"
STAGES = ("align", "finetune")
TEXT, IMAGE = 0, 1


@dataclass
class PillState:
    """Run-time switches shared by every wrapper of one plugged model."""

    modality_ids: Optional[torch.Tensor] = None  # (B, T) long; None = all text
    gate_enabled: bool = True  # False in the align stage: values of visual tokens pass ungated
    swap_last: bool = False  # align stage: last layer routes text tokens to the image expert
    stage: Optional[str] = None
    # Training: recompute norm + plug-in in the backward pass instead of keeping their inputs and
    # internals (about 0.1x less activation memory for a few per cent more time).
    recompute: bool = False
    _rows: Optional[tuple] = field(default=None, repr=False, compare=False)  # (modality_ids, rows)

    def visual_rows(self) -> torch.Tensor:
        """Flat (B*T) indices of the non-text tokens of the current forward: found once per
        forward (one host sync on GPU) and shared by every layer's gate."""
        m = self.modality_ids
        if self._rows is None or self._rows[0] is not m:
            self._rows = (m, (m.reshape(-1) != TEXT).nonzero().squeeze(1))
        return self._rows[1]


@dataclass
class PillHandle:
    """What :func:`plug` changed, so that :func:`unplug` can undo it."""

    config: PillConfig
    state: PillState
    layers: list[int]
    replaced: dict[str, nn.Module] = field(default_factory=dict)  # qualified name -> original module
    requires_grad: dict[str, bool] = field(default_factory=dict)
    hook: Optional[torch.utils.hooks.RemovableHandle] = None


def _in_own_dtype(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a plug-in in its own (float32) dtype on a possibly half-precision input; return x's dtype."""
    dtype = next(module.parameters()).dtype
    return module(x.to(dtype)).to(x.dtype) if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type) else module(x)


def _maybe_recompute(state: PillState, fn, *args: Optional[torch.Tensor]) -> torch.Tensor:
    """``fn(*args)``, under a non-reentrant checkpoint when training with ``state.recompute``."""
    if state.recompute and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _modality_ids(state: PillState, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The (B, T) modality ids of the current forward (checked against ``x``), or None."""
    m = state.modality_ids
    if m is not None and m.shape != x.shape[:2]:
        raise ValueError(
            f"modality_ids has shape {tuple(m.shape)} but the hidden states have (batch, length) "
            f"{tuple(x.shape[:2])}; pass one modality id per input token"
        )
    return m


class PillAttnInput(nn.Module):
    """Wraps ``input_layernorm``: ``a = n1 + A_attn(n1)`` (the adapter is shared by all modalities)."""

    def __init__(self, base: nn.Module, adapter: nn.Module, state: PillState):
        super().__init__()
        self.base = base
        self.pill_adapter = adapter
        self._state = [state]  # a list keeps the state out of nn.Module's attribute machinery

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        return _maybe_recompute(self._state[0], self._forward, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        n1 = self.base(x)
        return n1 + _in_own_dtype(self.pill_adapter, n1)


class PillFFNInput(nn.Module):
    """Wraps ``post_attention_layernorm``: ``e = n2 + Expert[m](n2)`` (MoMAE)."""

    def __init__(self, base: nn.Module, experts: ModalityExperts, state: PillState, is_last: bool):
        super().__init__()
        self.base = base
        self.pill_experts = experts
        self.is_last = is_last
        self._state = [state]  # a list keeps the state out of nn.Module's attribute machinery

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        state = self._state[0]
        mods = _modality_ids(state, x)
        if mods is not None:
            if state.swap_last and self.is_last:
                # The last layer's FFN output at image positions never reaches the loss:
                # route text tokens to the image expert so that it still learns.
                mods = torch.where(mods == TEXT, IMAGE, torch.where(mods == IMAGE, TEXT, mods))
        elif state.swap_last and self.is_last:
            mods = torch.full(x.shape[:2], IMAGE, dtype=torch.long, device=x.device)
        # the routing is fixed now, so a recomputation sends each token where this pass did
        return _maybe_recompute(state, self._forward, x, mods)

    def _forward(self, x: torch.Tensor, mods: Optional[torch.Tensor]) -> torch.Tensor:
        n2 = self.base(x)
        return n2 + self.pill_experts(n2, mods)  # the experts handle dtypes themselves


class PillValueProj(nn.Module):
    """Wraps ``self_attn.v_proj``: values of non-text tokens are scaled per KV head by ``tanh(g)``."""

    def __init__(self, base: nn.Module, gate: ModalityAttentionGate, state: PillState):
        super().__init__()
        self.base = base
        self.pill_gate = gate
        self._state = [state]

    @property
    def weight(self) -> torch.Tensor:  # some HF code inspects v_proj.weight (dtype, device)
        return self.base.weight

    def forward(self, a: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, n_kv * head_dim)
        v = self.base(a)
        state = self._state[0]
        if not state.gate_enabled:
            return v
        if _modality_ids(state, a) is None:
            return v
        return self.pill_gate(a, v, rows=state.visual_rows())


def _decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    cls = type(model).__name__
    if cls not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"pill cannot plug into {cls}; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(decoder layers with input_layernorm, self_attn.v_proj and post_attention_layernorm)"
        )
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return decoder, decoder.layers


def is_plugged(model: nn.Module) -> bool:
    return getattr(model, "pill_handle", None) is not None


def plug(model: nn.Module, config: PillConfig | None = None) -> nn.Module:
    """Freeze ``model`` and wrap its decoder layers with the PILL plug-ins, in place.

    Args:
        model: a Hugging Face ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM``.
        config: which plug-ins to add; defaults to :class:`PillConfig` ().

    Returns the same model. ``model.pill_handle.replaced`` lists the wrapped
    submodules; every plug-in parameter name contains ``pill_``. At this point the
    plugged model computes exactly what the base model computes on text-only input.
    After plugging, ``model(input_ids, modality_ids=m)`` routes tokens by modality
    (``m``: (B, T) long, 0 = text, 1 = image).
    """
    config = config or PillConfig()
    if is_plugged(model):
        raise ValueError("model is already plugged; call pill.unplug(model) first")
    decoder, layers = _decoder_layers(model)
    n_layers = len(layers)
    wanted = list(range(n_layers)) if config.layers is None else sorted(config.layers)
    bad = [i for i in wanted if i >= n_layers]
    if bad:
        raise ValueError(f"pill.layers: {bad} out of range; the model has {n_layers} decoder layers (0..{n_layers - 1})")
    cfg = model.config
    dim = cfg.hidden_size
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    ref = next(model.parameters())

    state = PillState()
    handle = PillHandle(config=config, state=state, layers=wanted)
    handle.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)

    def adapter() -> nn.Module:
        return build_adapter(config.adapter, dim, config.r, config.activation, config.init_std)

    layer_prefix = _module_name(model, layers)
    for i in wanted:
        layer = layers[i]
        name = f"{layer_prefix}.{i}"
        new: dict[str, nn.Module] = {}
        if config.attn_adapter:
            new["input_layernorm"] = PillAttnInput(layer.input_layernorm, adapter(), state)
        experts = ModalityExperts(config.num_modalities, adapter, shared=not config.momae)
        new["post_attention_layernorm"] = PillFFNInput(layer.post_attention_layernorm, experts, state, i == n_layers - 1)
        if config.mag:
            gate = ModalityAttentionGate(dim, n_kv, config.gate)
            new["self_attn.v_proj"] = PillValueProj(layer.self_attn.v_proj, gate, state)
        for sub, wrapper in new.items():
            parent = layer.self_attn if sub.startswith("self_attn.") else layer
            attr = sub.split(".")[-1]
            handle.replaced[f"{name}.{sub}"] = getattr(parent, attr)
            for child_name, child in wrapper.named_children():
                if child_name.startswith(PREFIX):
                    child.to(device=ref.device)  # plug-ins stay float32 (master weights), on the model's device
            setattr(parent, attr, wrapper)

    def take_modality_ids(module, args, kwargs):
        state.modality_ids = kwargs.pop("modality_ids", None)
        return args, kwargs

    handle.hook = decoder.register_forward_pre_hook(take_modality_ids, with_kwargs=True)
    model.pill_handle = handle
    set_stage(model, "finetune")
    return model


def _module_name(root: nn.Module, target: nn.Module) -> str:
    for n, m in root.named_modules():
        if m is target:
            return n
    raise RuntimeError("module not found in model")


def unplug(model: nn.Module) -> nn.Module:
    """Remove every plug-in and restore the original submodules and ``requires_grad`` flags."""
    handle: PillHandle | None = getattr(model, "pill_handle", None)
    if handle is None:
        raise ValueError("model is not plugged")
    for qualified, original in handle.replaced.items():
        parent_name, attr = qualified.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), attr, original)
    if handle.hook is not None:
        handle.hook.remove()
    for n, p in model.named_parameters():
        p.requires_grad_(handle.requires_grad.get(n, p.requires_grad))
    del model.pill_handle
    return model


def pill_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """All plug-in parameters (name contains ``pill_``), trainable or not."""
    return {n: p for n, p in module.named_parameters() if PREFIX in n}


def _group(name: str) -> str:
    """Parameter group of a plug-in parameter name: attn_adapter, expert_<m>, gate, projector."""
    if ".pill_adapter." in name:
        return "attn_adapter"
    if ".pill_experts.experts." in name:
        return "expert_" + name.split(".pill_experts.experts.")[1].split(".")[0]
    if ".pill_gate." in name:
        return "gate"
    if "pill_projector" in name:
        return "projector"
    return "other"


def set_stage(model: nn.Module, stage: str) -> None:
    """Switch a plugged LLM to a training stage (design note, section 4).

    ``align``: only the image experts (and the VLM's projector) train, MAG is off
    (visual values pass ungated) and the last layer swaps text and image routing.
    ``finetune``: every plug-in trains and MAG is on.
    """
    if stage not in STAGES:
        raise ValueError(f"stage: must be one of {', '.join(STAGES)}, got {stage!r}")
    handle: PillHandle = model.pill_handle
    cfg = handle.config
    handle.state.stage = stage
    handle.state.gate_enabled = stage == "finetune"
    handle.state.swap_last = stage == "align" and cfg.momae
    for n, p in pill_parameters(model).items():
        g = _group(n)
        if stage == "finetune":
            p.requires_grad_(True)
        elif not cfg.momae:
            p.requires_grad_(g == "expert_0")  # the one shared FFN adapter plays the V-expert's part
        else:
            p.requires_grad_(g.startswith("expert_") and g != f"expert_{TEXT}")
