"""Modality-Attention-Gate (MAG): tanh gates on the attention values of non-text tokens."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


class ModalityAttentionGate(nn.Module):
    """Scales the value vectors of visual tokens, per key-value head, by ``tanh(g)``.

    ``variant="token"``: ``g = W_gate a`` (``W_gate: d -> n_kv_heads``, zero-init, no bias),
    one gate per token and head, as in the reference code.
    ``variant="head"``: one learned scalar per head (zero-init), shared by all visual tokens.
    Text tokens are never touched. Only values are gated, so fused attention kernels stay in use.
    """

    def __init__(self, dim: int, num_kv_heads: int, variant: str = "token"):
        super().__init__()
        if variant not in ("token", "head"):
            raise ValueError(f"gate: must be 'token' or 'head', got {variant!r}")
        self.variant = variant
        self.num_kv_heads = num_kv_heads
        if variant == "token":
            self.w_gate = nn.Linear(dim, num_kv_heads, bias=False)
            nn.init.zeros_(self.w_gate.weight)
        else:
            self.gate = nn.Parameter(torch.zeros(num_kv_heads))
        self.record = False  # when True, keep mean |tanh(g)| of the last call in `last_abs_gate`
        self.last_abs_gate: Optional[torch.Tensor] = None

    def gates(self, a: torch.Tensor) -> torch.Tensor:
        """a: (..., d) attention inputs -> tanh gates (..., n_kv)."""
        if self.variant == "token":
            w = self.w_gate.weight
            return torch.tanh(self.w_gate(a if torch.is_autocast_enabled(a.device.type) else a.to(w.dtype)))
        return torch.tanh(self.gate).expand(*a.shape[:-1], -1)

    def forward(self, a: torch.Tensor, v: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """a: (B, T, d) attention input; v: (B, T, n_kv * head_dim) values; visual: (B, T) bool -> gated v."""
        B, T, _ = v.shape
        # The gate map is d -> n_kv (tiny), so it runs densely on every token and the text tokens
        # are masked to 1: no gather/scatter of the large value tensor, forward or backward.
        g = self.gates(a).to(v.dtype)  # (B, T, n_kv)
        if self.record:
            self.last_abs_gate = g.detach()[visual].abs().float().mean(0) if visual.any() else None  # (n_kv,)
        scale = torch.where(visual.unsqueeze(-1), g, torch.ones_like(g))  # (B, T, n_kv)
        return (v.view(B, T, self.num_kv_heads, -1) * scale.unsqueeze(-1)).view(B, T, -1)
