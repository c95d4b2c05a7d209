"""Bottleneck adapters. Both start as a no-op: the up-projection is zero-initialised."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


GATE_INITS = ("normal", "torch_default")


class SwiGLUAdapter(nn.Module):
    """``A(z) = W_up(silu(W_g z) * (W_d z))`` with ``W_g, W_d: d -> r`` and ``W_up: r -> d``, no biases.

    ``W_d`` ~ N(0, init_std), ``W_up`` = 0. ``gate_init``: ``normal`` draws ``W_g`` like ``W_d``;
    ``torch_default`` keeps ``nn.Linear``'s own init (uniform in +-1/sqrt(d)), as the reference code
    does (its ``GLUAdapter`` initialises only the down and up projections).
    """

    def __init__(self, dim: int, r: int = 32, init_std: float = 0.02, gate_init: str = "normal"):
        super().__init__()
        if gate_init not in GATE_INITS:
            raise ValueError(f"swiglu_gate_init: must be one of {', '.join(GATE_INITS)}, got {gate_init!r}")
        self.w_gate = nn.Linear(dim, r, bias=False)
        self.w_down = nn.Linear(dim, r, bias=False)
        self.w_up = nn.Linear(r, dim, bias=False)
        if gate_init == "normal":
            nn.init.normal_(self.w_gate.weight, std=init_std)
        nn.init.normal_(self.w_down.weight, std=init_std)
        nn.init.zeros_(self.w_up.weight)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # z: (..., d) -> (..., d)
        return self.w_up(F.silu(self.w_gate(z)) * self.w_down(z))


class ClassicAdapter(nn.Module):
    """``A(z) = W_up(act(W_d z))``, act in {gelu, relu, none}; the ablation baseline."""

    def __init__(self, dim: int, r: int = 32, activation: str = "gelu", init_std: float = 0.02):
        super().__init__()
        acts = {"gelu": nn.GELU(), "relu": nn.ReLU(), "none": nn.Identity()}
        if activation not in acts:
            raise ValueError(f"activation: must be one of {', '.join(acts)}, got {activation!r}")
        self.w_down = nn.Linear(dim, r, bias=False)
        self.act = acts[activation]
        self.w_up = nn.Linear(r, dim, bias=False)
        nn.init.normal_(self.w_down.weight, std=init_std)
        nn.init.zeros_(self.w_up.weight)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # z: (..., d) -> (..., d)
        return self.w_up(self.act(self.w_down(z)))


def build_adapter(kind: str, dim: int, r: int, activation: str = "gelu", init_std: float = 0.02,
                  gate_init: str = "normal") -> nn.Module:
    """Adapter of ``kind`` ``swiglu`` or ``classic`` (``gate_init``: the SwiGLU gate projection's init)."""
    if kind == "swiglu":
        return SwiGLUAdapter(dim, r, init_std, gate_init)
    if kind == "classic":
        return ClassicAdapter(dim, r, activation, init_std)
    raise ValueError(f"adapter: must be 'swiglu' or 'classic', got {kind!r}")
