"""Plug the PILL plug-ins into a Hugging Face causal LM, and take them out again.

Per plugged decoder layer (design note, section 2), at the paths the family's row of
:data:`pill.families.FAMILIES` gives (LLaMA's shown)::

    a   = n1 + A_attn(n1)          # input_layernorm   -> PillAttnInput
    v   = MAG(a, v_proj(a))        # self_attn.v_proj  -> PillValueProj (or the v slice of qkv_proj)
    e   = n2 + Expert[m](n2)       # post_attention_layernorm -> PillFFNInput

The model's own attention and MLP code run unchanged: pill only wraps three
existing submodules per layer, so fused attention (SDPA, flash) stays in use.
Per-token modality ids reach the wrappers through a shared :class:`PillState`,
set by a forward pre-hook on the decoder that takes a ``modality_ids=`` keyword. The hook
also finds, once per forward, the rows of every modality (:func:`pill.modules.route`, the
forward's one host sync for routing); every layer's experts and gate use those rows, so no
layer waits on the device (no ``.item()``, ``.tolist()`` or ``nonzero()`` per layer).

Each plug-in declares the parameter group of its parameters (``pill_parameter_groups()``:
``attn_adapter``, ``expert:<modality id>`` or ``expert:shared``, ``gate``);
:func:`parameter_groups` collects them and :func:`set_stage` trains the groups a row of
:data:`STAGES` names.
"""
from __future__ import annotations

import sys
import types

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from . import attention
from .config import PillConfig
from .errors import ConfigError, DataError
from .families import Family, family_of
from .modalities import IMAGE, TEXT
from .modules import ModalityAttentionGate, ModalityExperts, Routing, build_adapter, is_inert, route
from .modules.adapter import ADAPTERS, refresh_zero_stamp

PREFIX = "pill_"


@dataclass(frozen=True)
class Stage:
    """What trains in a stage (design note, section 4).

    ``train`` / ``freeze``: patterns (fnmatch) of parameter groups; a group trains when it
    matches ``train`` and not ``freeze``. ``{text}`` in a pattern stands for the text
    modality id. ``gate``: MAG is applied (else visual values pass ungated). ``swap_last``: in
    the model's last layer (when plugged) text tokens go to the aligned modality's expert (and
    that modality's tokens to the text expert), since the last layer's FFN output at non-text
    positions never reaches the loss.
    """

    train: tuple[str, ...]
    freeze: tuple[str, ...] = ()
    gate: bool = True
    swap_last: bool = False


STAGES: dict[str, Stage] = {
    # projector (in PillVLM) + the experts of every non-text modality (or the one shared adapter)
    "align": Stage(train=("expert:*",), freeze=("expert:{text}",), gate=False, swap_last=True),
    "finetune": Stage(train=("*",)),  # projector + every plug-in
}


@dataclass
class PillState:
    """Run-time switches shared by every wrapper of one plugged model."""

    modality_ids: Optional[torch.Tensor] = None  # (B, T) long; None = all text
    routing: Optional[Routing] = None  # the rows of each modality in this forward (None = all text)
    gate_enabled: bool = True  # False in the align stage: values of visual tokens pass ungated
    swap_last: bool = False  # align stage: last layer routes text tokens to the aligned modality's expert
    align_modality: int = IMAGE  # the modality whose expert receives the text tokens when swap_last
    stage: Optional[str] = None
    # Training: recompute norm + plug-in in the backward pass instead of keeping their inputs and
    # internals (about 0.1x less activation memory for a few per cent more time).
    recompute: bool = False
    num_modalities: int = 2
    _swapped: Optional[tuple] = field(default=None, repr=False, compare=False)  # (routing, swapped routing)

    def set_modality_ids(self, modality_ids: Optional[torch.Tensor]) -> None:
        """Start a forward: keep the ids and find the rows of every modality once (one host sync)."""
        self.modality_ids = modality_ids
        self.routing = None if modality_ids is None else route(modality_ids, self.num_modalities)

    def visual_rows(self) -> torch.Tensor:
        """Flat (B*T) indices of the non-text tokens of the current forward, shared by every layer's gate."""
        return self.routing.visual

    def last_layer_routing(self) -> Routing:
        """The routing of the last layer while aligning: text and the aligned modality exchange
        experts (the same rows, found once per forward)."""
        if self.routing is None:
            return Routing.single(self.align_modality)
        if self._swapped is None or self._swapped[0] is not self.routing:
            self._swapped = (self.routing, self.routing.swapped(self.align_modality, TEXT))
        return self._swapped[1]


@dataclass
class PillHandle:
    """What :func:`plug` changed, so that :func:`unplug` can undo it."""

    config: PillConfig
    state: PillState
    layers: list[int]
    family: Family = field(default_factory=Family)
    replaced: dict[str, nn.Module] = field(default_factory=dict)  # qualified name -> original module
    added: list[str] = field(default_factory=list)  # plug-ins in front of a module (post-norm families)
    input_hooks: list = field(default_factory=list)  # their forward pre-hooks
    requires_grad: dict[str, bool] = field(default_factory=dict)
    hook: Optional[torch.utils.hooks.RemovableHandle] = None
    attention_switched: bool = False  # sdpa -> pill.attention (float32 attention backward on CPU)


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
        raise DataError(
            f"modality_ids has shape {tuple(m.shape)} but the hidden states have (batch, length) "
            f"{tuple(x.shape[:2])}; pass one modality id per input token"
        )
    return m


class PillAttnInput(nn.Module):
    """Wraps the attention-input norm: ``a = n1 + A_attn(n1)`` (the adapter is shared by all modalities)."""

    def __init__(self, base: nn.Module, adapter: nn.Module, state: PillState):
        super().__init__()
        self.base = base
        self.pill_adapter = adapter
        self._state = [state]  # a list keeps the state out of nn.Module's attribute machinery

    def pill_parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        return {"attn_adapter": [(f"pill_adapter.{n}", p) for n, p in self.pill_adapter.named_parameters()]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        if is_inert(self.pill_adapter):  # adds exactly nothing (align stage, untrained model): skip it
            return self.base(x)
        return _maybe_recompute(self._state[0], self._forward, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        n1 = self.base(x)
        return n1 + _in_own_dtype(self.pill_adapter, n1)


class PillFFNInput(nn.Module):
    """Wraps the FFN-input norm: ``e = n2 + Expert[m](n2)`` (MoMAE)."""

    def __init__(self, base: nn.Module, experts: ModalityExperts, state: PillState, is_last: bool):
        super().__init__()
        self.base = base
        self.pill_experts = experts
        self.is_last = is_last
        self._state = [state]  # a list keeps the state out of nn.Module's attribute machinery

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        state = self._state[0]
        _modality_ids(state, x)  # checks the shape
        if state.swap_last and self.is_last:
            # The last layer's FFN output at non-text positions never reaches the loss:
            # route text tokens to the aligned modality's expert so that it still learns.
            routing = state.last_layer_routing()
        else:
            routing = state.routing or _TEXT_ONLY
        # the routing is fixed now, so a recomputation sends each token where this pass did
        return _maybe_recompute(state, self._forward, x, routing)

    def _forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        # n2 + Expert[m](n2), skipping experts that add nothing; the experts handle dtypes themselves
        return self.pill_experts.residual(self.base(x), routing)


class PillValueProj(nn.Module):
    """Wraps the value projection: values of non-text tokens are scaled per KV head by ``tanh(g)``.

    ``value_width``: with a fused ``[q | k | v]`` projection, the width of the v slice (the last
    ``n_kv * head_dim`` outputs); only that slice is gated, in place, q and k are not copied.
    ``None``: ``base`` produces the values alone (``v_proj``)."""

    def __init__(self, base: nn.Module, gate: ModalityAttentionGate, state: PillState,
                 value_width: Optional[int] = None):
        super().__init__()
        self.base = base
        self.pill_gate = gate
        self.value_width = value_width
        self._state = [state]

    @property
    def weight(self) -> torch.Tensor:  # some HF code inspects v_proj.weight (dtype, device)
        return self.base.weight

    def forward(self, a: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, n_kv * head_dim) or [q | k | v]
        out = self.base(a)
        state = self._state[0]
        if not state.gate_enabled or _modality_ids(state, a) is None:
            return out
        if self.value_width is None:
            return self.pill_gate(a, out, rows=state.visual_rows())
        self.pill_gate(a, out[..., -self.value_width:], rows=state.visual_rows())  # gates the v slice in place
        return out


_TEXT_ONLY = Routing.single(TEXT)

# Names of the plug-ins fed the attention / FFN input of a layer that has no norm there to wrap.
_INPUT_PLUGIN = {PillAttnInput: PREFIX + "attn_input", PillFFNInput: PREFIX + "ffn_input"}


def _decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return decoder, decoder.layers


def is_plugged(model: nn.Module) -> bool:
    return getattr(model, "pill_handle", None) is not None


def _value_width(cfg) -> int:
    """n_kv_heads * head_dim: the width of the values (of the v slice of a fused projection)."""
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return n_kv * head_dim


def plug(model: nn.Module, config: PillConfig | None = None) -> nn.Module:
    """Freeze ``model`` and wrap its decoder layers with the PILL plug-ins, in place.

    Args:
        model: a Hugging Face causal LM whose ``config.model_type`` has a row in
            :data:`pill.families.FAMILIES` (else :class:`~pill.errors.UnsupportedModelError`).
        config: which plug-ins to add; defaults to :class:`PillConfig` ().

    Returns the same model. ``model.pill_handle.replaced`` lists the wrapped
    submodules (``added``: the plug-ins put in front of a module, where a post-norm family has
    no norm to wrap); every plug-in parameter name contains ``pill_``. At this point the
    plugged model computes exactly what the base model computes on text-only input.
    After plugging, ``model(input_ids, modality_ids=m)`` routes tokens by modality
    (``m``: (B, T) long, 0 = text, 1 = image). An ``sdpa`` attention becomes
    :data:`pill.attention.NAME`: the same, with the attention backward of bf16 training on CPU in
    float32, which is faster there.
    """
    config = config or PillConfig()
    if is_plugged(model):
        raise ConfigError(f"{type(model).__name__} is already plugged; call pill.unplug(model) first")
    family = family_of(model)
    decoder, layers = _decoder_layers(model)
    n_layers = len(layers)
    wanted = list(range(n_layers)) if config.layers is None else sorted(config.layers)
    bad = [i for i in wanted if i >= n_layers]
    if bad:
        raise ConfigError(f"pill.layers: {bad} out of range; the model has {n_layers} decoder layers (0..{n_layers - 1})")
    cfg = model.config
    dim = cfg.hidden_size
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    value_width = _value_width(cfg) if family.fused_qkv else None
    ref = next(model.parameters())

    state = PillState(num_modalities=config.num_modalities)
    handle = PillHandle(config=config, state=state, layers=wanted, family=family)
    handle.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)

    def adapter() -> nn.Module:
        return build_adapter(config.adapter, dim, config.r, config.activation, config.init_std,
                             config.swiglu_gate_init)

    layer_prefix = _module_name(model, layers)
    for i in wanted:
        layer = layers[i]
        name = f"{layer_prefix}.{i}"
        new: dict[str, nn.Module] = {}  # path of the wrapped module -> wrapper
        in_front: dict[str, nn.Module] = {}  # path of a module -> plug-in fed its input (no norm to wrap)

        def place(norm: Optional[str], consumer: str, make) -> None:
            if norm is not None:
                new[norm] = make(layer.get_submodule(norm))
            else:
                in_front[consumer] = make(nn.Identity())

        if config.attn_adapter:
            place(family.attn_norm, family.attn, lambda norm: PillAttnInput(norm, adapter(), state))
        experts = ModalityExperts(config.num_modalities, adapter, shared=not config.momae)
        place(family.ffn_norm, family.ffn, lambda norm: PillFFNInput(norm, experts, state, i == n_layers - 1))
        if config.mag:
            gate = ModalityAttentionGate(dim, n_kv, config.gate)
            new[family.value] = PillValueProj(layer.get_submodule(family.value), gate, state, value_width)
        for sub, wrapper in new.items():
            parent_name, _, attr = sub.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            handle.replaced[f"{name}.{sub}"] = getattr(parent, attr)
            for child_name, child in wrapper.named_children():
                if child_name.startswith(PREFIX):
                    child.to(device=ref.device)  # plug-ins stay float32 (master weights), on the model's device
            setattr(parent, attr, wrapper)
        for consumer, plugin in in_front.items():
            attr = _INPUT_PLUGIN[type(plugin)]
            layer.add_module(attr, plugin.to(device=ref.device))
            handle.added.append(f"{name}.{attr}")
            handle.input_hooks.append(layer.get_submodule(consumer).register_forward_pre_hook(
                _feed_input_through(plugin), with_kwargs=True))

    def take_modality_ids(module, args, kwargs):
        state.set_modality_ids(kwargs.pop("modality_ids", None))
        return args, kwargs

    handle.hook = decoder.register_forward_pre_hook(take_modality_ids, with_kwargs=True)
    handle.attention_switched = attention.use(model)
    model.pill_handle = handle
    set_stage(model, "finetune")
    return model


def _feed_input_through(plugin: nn.Module):
    """Forward pre-hook: the module's input ``hidden_states`` (keyword or first argument) goes
    through ``plugin`` first."""

    def hook(module, args, kwargs):
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = plugin(kwargs["hidden_states"])
        else:
            args = (plugin(args[0]), *args[1:])
        return args, kwargs

    return hook


def _module_name(root: nn.Module, target: nn.Module) -> str:
    for n, m in root.named_modules():
        if m is target:
            return n
    raise RuntimeError("module not found in model")


def _handle(model: nn.Module) -> PillHandle:
    handle: PillHandle | None = getattr(model, "pill_handle", None)
    if handle is None:
        raise ConfigError(f"{type(model).__name__} is not plugged; call pill.plug(model) first")
    return handle


def unplug(model: nn.Module) -> nn.Module:
    """Remove every plug-in and restore the original submodules and ``requires_grad`` flags."""
    handle = _handle(model)
    for qualified, original in handle.replaced.items():
        parent_name, attr = qualified.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), attr, original)
    for qualified in handle.added:
        parent_name, attr = qualified.rsplit(".", 1)
        delattr(model.get_submodule(parent_name), attr)
    for hook in [handle.hook, *handle.input_hooks]:
        if hook is not None:
            hook.remove()
    for n, p in model.named_parameters():
        p.requires_grad_(handle.requires_grad.get(n, p.requires_grad))
    if handle.attention_switched:
        attention.restore(model)
    del model.pill_handle
    return model


def pill_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """All plug-in parameters (name contains ``pill_``), trainable or not."""
    return {n: p for n, p in module.named_parameters() if PREFIX in n}


def parameter_groups(module: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Plug-in parameters by the group their module declares, with qualified names.

    Walks ``module`` for plug-ins that have ``pill_parameter_groups()`` (no name parsing).
    Groups: ``attn_adapter``, ``expert:<modality id>`` (``expert:shared`` without MoMAE), ``gate``.
    """
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    seen: set[int] = set()
    for prefix, m in module.named_modules():
        declare = getattr(m, "pill_parameter_groups", None)
        if declare is None:
            continue
        for group, params in declare().items():
            for n, p in params:
                if id(p) in seen:
                    raise RuntimeError(f"parameter {prefix}.{n} is declared by two plug-ins")
                seen.add(id(p))
                groups.setdefault(group, []).append((f"{prefix}.{n}" if prefix else n, p))
    return groups


def set_stage(model: nn.Module, stage: str, align_modality: int = IMAGE) -> None:
    """Switch a plugged LLM to a training stage, a row of :data:`STAGES` (design note, section 4).

    ``align``: only the experts of the non-text modalities (and the VLM's projector) train, MAG
    is off (visual values pass ungated) and in the last plugged layer the text tokens go to
    the expert of ``align_modality`` (default 1 = image). ``finetune``: every plug-in trains and
    MAG is on.
    """
    if stage not in STAGES:
        raise ConfigError(f"stage: must be one of {', '.join(STAGES)}, got {stage!r}")
    handle = _handle(model)
    cfg = handle.config
    if not TEXT < align_modality < cfg.num_modalities:
        raise ConfigError(f"align_modality: must be a non-text modality id in 1..{cfg.num_modalities - 1} "
                          f"(pill.num_modalities is {cfg.num_modalities}), got {align_modality}")
    row = STAGES[stage]
    handle.state.stage = stage
    handle.state.gate_enabled = row.gate
    handle.state.swap_last = row.swap_last and cfg.momae  # one shared adapter has nothing to swap
    handle.state.align_modality = align_modality
    train = [t.format(text=TEXT) for t in row.train]
    freeze = [t.format(text=TEXT) for t in row.freeze]
    for group, params in parameter_groups(model).items():
        on = any(fnmatchcase(group, t) for t in train) and not any(fnmatchcase(group, f) for f in freeze)
        for _, p in params:
            p.requires_grad_(on)
    # which adapters still hold their zero output projection (frozen ones are skipped): read once
    # here, so that no forward reads a value
    for m in model.modules():
        if isinstance(m, ADAPTERS):
            refresh_zero_stamp(m)


class _CallableModule(types.ModuleType):
    """``pill.plug`` is both this module (``pill.plug.PREFIX``) and, called, :func:`plug`
    (``pill.plug(llm, config)``): importing the submodule makes it the package's ``plug`` attribute."""

    def __call__(self, model: nn.Module, config: PillConfig | None = None) -> nn.Module:
        return plug(model, config)


sys.modules[__name__].__class__ = _CallableModule
