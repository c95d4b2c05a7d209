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
    The gates are computed on the visual rows only (gathered by index), which also keeps the
    backward's saved tensors to those rows.
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

    def pill_parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        return {"gate": list(self.named_parameters())}

    def gates(self, a: torch.Tensor) -> torch.Tensor:
        """a: (..., d) attention inputs -> tanh gates (..., n_kv)."""
        if self.variant == "token":
            w = self.w_gate.weight
            return torch.tanh(self.w_gate(a if torch.is_autocast_enabled(a.device.type) else a.to(w.dtype)))
        return torch.tanh(self.gate).expand(*a.shape[:-1], -1)

    def forward(self, a: torch.Tensor, v: torch.Tensor, visual: Optional[torch.Tensor] = None,
                rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """a: (B, T, d) attention input; v: (B, T, n_kv * head_dim) values; visual: (B, T) bool -> gated v.
        ``rows``: the flat indices of ``visual``'s True entries, given instead of ``visual`` when
        the caller has them already.

        Only the visual rows are touched: the gate map runs on those rows alone, and the backward
        keeps only their values (text rows pass through untouched, with no copy kept)."""
        B, T, _ = v.shape
        idx = rows if rows is not None else visual.reshape(-1).nonzero().squeeze(1)  # (N_vis,)
        if idx.numel() == 0:
            if self.record:
                self.last_abs_gate = None
            return v
        g = self.gates(a.reshape(B * T, -1).index_select(0, idx)).to(v.dtype)  # (N_vis, n_kv)
        if self.record:
            self.last_abs_gate = g.detach().abs().float().mean(0)  # (n_kv,)
        return _GateRows.apply(v.reshape(B * T, self.num_kv_heads, -1), g, idx).view(B, T, -1)


class _GateRows(torch.autograd.Function):
    """v (N, n_kv, hd) with rows ``idx`` scaled per head by g (N_vis, n_kv), in place.

    Saves only the visual rows of v for the backward pass; the gradient of the text rows is
    the incoming gradient itself."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, g: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        v_vis = v.index_select(0, idx)  # (N_vis, n_kv, hd)
        v.index_copy_(0, idx, v_vis * g.unsqueeze(-1))
        ctx.mark_dirty(v)
        ctx.save_for_backward(v_vis, g, idx)
        return v

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        v_vis, g, idx = ctx.saved_tensors
        grad_vis = grad.index_select(0, idx)  # (N_vis, n_kv, hd)
        grad_g = (grad_vis * v_vis).sum(-1) if ctx.needs_input_grad[1] else None  # (N_vis, n_kv)
        grad_v = None
        if ctx.needs_input_grad[0]:
            grad_v = grad.clone()
            grad_v.index_copy_(0, idx, grad_vis * g.unsqueeze(-1))
        return grad_v, grad_g, None
