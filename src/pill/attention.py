"""SDPA whose training backward runs in float32 on CPU: the attention of bf16 training on a CPU.

On CPU, PyTorch's fused attention (``scaled_dot_product_attention``, flash kernel) is much slower
in bf16 than in float32 when gradients are needed: at SmolLM2-135M's shapes (8 x 9 heads x 96
tokens x 64) forward and backward take about 21 ms in bf16 against 7 ms in float32, and in a
demo fine-tune step under bf16 autocast the attention backward took a quarter of the step
(BENCHMARKS.md, "bf16 on CPU"). :func:`attention` is transformers' own SDPA attention, except that
on CPU, when the attention would run in bf16/fp16 (half inputs, or under bf16/fp16 autocast,
which casts SDPA's inputs) and gradients are enabled, it computes the attention in float32, with
autocast off, and returns that half dtype. Everything else -- inference on CPU, any GPU, float32 -- goes through
transformers' SDPA unchanged.

:func:`use` switches a model whose attention is ``sdpa`` to it (registered with transformers'
``AttentionInterface`` as :data:`NAME`, its masks the same as SDPA's); :func:`restore` switches
back. The result equals SDPA's up to bf16 rounding: float32 attention is the more precise of the two.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

NAME = "pill_sdpa"
_HALF = (torch.bfloat16, torch.float16)


def _half_on_cpu(query: torch.Tensor) -> Optional[torch.dtype]:
    """The half dtype the attention would run in on CPU (its inputs' or autocast's), else None."""
    if query.device.type != "cpu":
        return None
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in _HALF:
        return torch.get_autocast_dtype("cpu")  # autocast casts SDPA's inputs to it
    return query.dtype if query.dtype in _HALF else None


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask, *args, **kwargs):
    """transformers' ``sdpa_attention_forward``; in float32 on CPU for half inputs that need gradients."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    half = _half_on_cpu(query) if torch.is_grad_enabled() else None
    if half is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              *args, **kwargs)
    return out.to(half), weights


def register() -> None:
    """Make :data:`NAME` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(NAME, sdpa_mask)
    AttentionInterface.register(NAME, attention)


def _configs(model: nn.Module):
    seen = set()
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and id(cfg) not in seen:
            seen.add(id(cfg))
            yield cfg


def use(model: nn.Module) -> bool:
    """Switch every config of ``model`` whose attention is ``sdpa`` to :data:`NAME`; True if any was."""
    register()
    changed = False
    for cfg in _configs(model):
        if cfg._attn_implementation == "sdpa":
            cfg._attn_implementation = NAME
            changed = True
    return changed


def restore(model: nn.Module) -> None:
    """Undo :func:`use`: back to transformers' ``sdpa``."""
    for cfg in _configs(model):
        if cfg._attn_implementation == NAME:
            cfg._attn_implementation = "sdpa"


__all__ = ["NAME", "attention", "register", "use", "restore"]
