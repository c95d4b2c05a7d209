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
        """a: (N, d) attention inputs of visual tokens -> tanh gates (N, n_kv)."""
        if self.variant == "token":
            return torch.tanh(self.w_gate(a))
        return torch.tanh(self.gate).expand(a.shape[0], -1)

    def forward(self, a: torch.Tensor, v: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """a: (B, T, d) attention input; v: (B, T, n_kv * head_dim) values; visual: (B, T) bool -> gated v."""
        B, T, _ = v.shape
        idx = visual.reshape(-1).nonzero().squeeze(1)  # (N_vis,)
        if idx.numel() == 0:
            return v
        v_flat = v.reshape(B * T, self.num_kv_heads, -1)  # (B*T, n_kv, hd)
        a_vis = a.reshape(B * T, -1).index_select(0, idx)
        if self.variant == "token" and not torch.is_autocast_enabled():
            a_vis = a_vis.to(self.w_gate.weight.dtype)
        g = self.gates(a_vis).to(v.dtype)  # (N_vis, n_kv)
        if self.record:
            self.last_abs_gate = g.detach().abs().mean(0)  # (n_kv,)
        gated = v_flat.index_select(0, idx) * g.unsqueeze(-1)  # (N_vis, n_kv, hd)
        return v_flat.index_copy_(0, idx, gated).view(B, T, -1)  # v is a fresh projection output: safe in place
