"""Bottleneck adapters. Both start as a no-op: the up-projection is zero-initialised."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


GATE_INITS = ("normal", "torch_default")


def _stamp(w: torch.Tensor) -> tuple[int, int]:
    return w.data_ptr(), w._version


def mark_zero(adapter: nn.Module) -> None:
    """Record that ``adapter``'s output projection holds zeros now (right after its zero init)."""
    adapter._zero_stamp = _stamp(adapter.w_up.weight)


def refresh_zero_stamp(adapter: nn.Module) -> None:
    """Read ``adapter``'s output projection once (one host read): stamp it when it holds zeros,
    drop the stamp when it does not (a meta tensor, which holds no values, is never stamped)."""
    w = adapter.w_up.weight
    if w.is_meta or w.any():
        adapter._zero_stamp = None
    else:
        mark_zero(adapter)


def is_inert(adapter: nn.Module) -> bool:
    """True when ``adapter`` adds exactly nothing and no gradient is asked of it, so that a caller may
    skip it: its output projection still holds the zeros of its initialisation and every parameter is
    frozen (or autograd is off). The plugged layers skip such adapters: in the align stage the
    attention adapters and the text expert, in an untrained model every adapter.

    "Still holds the zeros" is known without reading a value (no host sync): the projection's
    storage and version counter are those recorded at the zero init (:func:`mark_zero`); any write
    since (a load, an optimizer step, a move to another device) changes one of them. A write through
    ``.data`` bypasses the version counter: :func:`refresh_zero_stamp` (which
    :func:`pill.plug.set_stage` runs) reads the values again.
    """
    if torch.is_grad_enabled() and any(p.requires_grad for p in adapter.parameters()):
        return False
    if torch.compiler.is_compiling():  # no version counters in a traced graph: always run the adapter
        return False
    return getattr(adapter, "_zero_stamp", None) == _stamp(adapter.w_up.weight)


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
        mark_zero(self)

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
        mark_zero(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # z: (..., d) -> (..., d)
        return self.w_up(self.act(self.w_down(z)))


ADAPTERS = (SwiGLUAdapter, ClassicAdapter)  # the adapter kinds (both zero-initialised, both with w_up)


def build_adapter(kind: str, dim: int, r: int, activation: str = "gelu", init_std: float = 0.02,
                  gate_init: str = "normal") -> nn.Module:
    """Adapter of ``kind`` ``swiglu`` or ``classic`` (``gate_init``: the SwiGLU gate projection's init)."""
    if kind == "swiglu":
        return SwiGLUAdapter(dim, r, init_std, gate_init)
    if kind == "classic":
        return ClassicAdapter(dim, r, activation, init_std)
    raise ValueError(f"adapter: must be 'swiglu' or 'classic', got {kind!r}")
