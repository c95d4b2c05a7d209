"""Where the plug-ins go in each family of Hugging Face LLMs, keyed by ``config.model_type``.

One row per family says, relative to one decoder layer (``model.get_decoder().layers[i]``):

- ``attn_norm``: the module whose output is the attention input ``n1`` (wrapped: ``a = n1 + A_attn(n1)``);
  ``None`` for a post-norm family: the adapter then goes in front of ``attn`` (a forward pre-hook
  on the attention module feeds its input through the plug-in ``pill_attn_input`` of the layer);
- ``value``: the Linear that produces the values ``v`` (wrapped: the gate scales the visual rows);
  with ``fused_qkv`` it is a fused projection whose output is ``[q | k | v]`` and only the value
  slice (the last ``n_kv_heads * head_dim`` outputs) is gated, in place;
- ``ffn_norm``: the module whose output is the FFN input ``n2`` (wrapped: ``e = n2 + Expert[m](n2)``);
  ``None``: the experts go in front of ``ffn`` the same way (``pill_ffn_input``).

Gemma 2/3 apply ``post_attention_layernorm`` to the attention *output*; their FFN input comes from
``pre_feedforward_layernorm`` (as in PEFT's target-module table). OLMo 2 normalises after the
attention and after the FFN (post-norm): the attention and FFN inputs are the residual stream
itself, so ``x`` plays the part of ``n1`` and ``h`` that of ``n2``. A family pill cannot plug
into has a row with ``refused`` set to the reason, so that the error says why.

Adding a family is one row here plus one case in ``tests/test_families.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class Family:
    """Paths, inside one decoder layer, of the three submodules pill wraps."""

    attn_norm: Optional[str] = "input_layernorm"  # None: no norm before attention (post-norm)
    value: str = "self_attn.v_proj"
    ffn_norm: Optional[str] = "post_attention_layernorm"  # None: no norm before the FFN
    attn: str = "self_attn"  # the attention module (its input is the attention input when attn_norm is None)
    ffn: str = "mlp"  # the FFN module (its input is the FFN input when ffn_norm is None)
    fused_qkv: bool = False  # ``value`` outputs [q | k | v]; the gate touches only the v slice
    refused: Optional[str] = None  # why pill cannot plug into this family (None: supported)


_PRE_NORM = Family()
_GEMMA = Family(ffn_norm="pre_feedforward_layernorm")

FAMILIES: dict[str, Family] = {
    "llama": _PRE_NORM,  # LLaMA 1/2/3 (rope_scaling "llama3" too), SmolLM2
    "mistral": _PRE_NORM,
    "qwen2": _PRE_NORM,
    "qwen3": _PRE_NORM,  # q/k norms sit inside the attention, after the projections
    "smollm3": _PRE_NORM,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,  # Gemma3ForCausalLM
    "phi3": Family(value="self_attn.qkv_proj", fused_qkv=True),
    "olmo2": Family(attn_norm=None, ffn_norm=None),  # post-norm: plug-ins in front of self_attn and mlp
}


def supported_types() -> list[str]:
    """The ``model_type`` values pill can plug into, sorted."""
    return sorted(t for t, f in FAMILIES.items() if f.refused is None)


def family_of(model: nn.Module) -> Family:
    """The table row for ``model`` (a Hugging Face causal LM), or :class:`UnsupportedModelError`."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    where = f"{type(model).__name__} (model_type {model_type!r})"
    row = FAMILIES.get(model_type)
    if row is None:
        raise UnsupportedModelError(
            f"pill cannot plug into {where}: no row for it in pill.families.FAMILIES; "
            f"supported model types: {', '.join(supported_types())}")
    if row.refused is not None:
        raise UnsupportedModelError(
            f"pill cannot plug into {where}: {row.refused} (pill.families.FAMILIES); "
            f"supported model types: {', '.join(supported_types())}")
    return row
