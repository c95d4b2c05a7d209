"""Mixture-of-Modality-Adapter-Experts (MoMAE): hard routing by modality id."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn


class ModalityExperts(nn.Module):
    """One adapter per modality; token t is processed only by ``experts[modality_ids[t]]``.

    Tokens are gathered per modality, run through their expert and scattered
    back, so each token pays for exactly one expert. With ``shared=True`` there
    is a single adapter for every token (the "no MoMAE" ablation).
    """

    def __init__(self, num_modalities: int, make_adapter: Callable[[], nn.Module], shared: bool = False):
        super().__init__()
        self.num_modalities = num_modalities
        self.shared = shared
        self.experts = nn.ModuleList([make_adapter() for _ in range(1 if shared else num_modalities)])

    def forward(self, x: torch.Tensor, modality_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, T, d), modality_ids: (B, T) long or None (all text) -> expert output (B, T, d)."""
        dtype = self.experts[0].w_up.weight.dtype
        if x.dtype != dtype and not torch.is_autocast_enabled():
            return self.forward(x.to(dtype), modality_ids).to(x.dtype)
        if self.shared or modality_ids is None:
            return self.experts[0](x)
        flat = x.reshape(-1, x.shape[-1])  # (N, d)
        mods = modality_ids.reshape(-1)  # (N,)
        counts = torch.bincount(mods, minlength=self.num_modalities).tolist()
        if len(counts) > self.num_modalities or (mods.numel() and int(mods.min()) < 0):
            raise ValueError(
                f"modality_ids must be in [0, {self.num_modalities - 1}] (one expert per modality); "
                f"got values up to {len(counts) - 1}"
            )
        present = [m for m, c in enumerate(counts) if c]
        if len(present) == 1:  # one modality only (text-only input, generation steps)
            return self.experts[present[0]](x)
        outs = [(m, (mods == m).nonzero().squeeze(1)) for m in present]  # (N_m,) token indices per modality
        results = [self.experts[m](flat.index_select(0, idx)) for m, idx in outs]
        out = flat.new_empty(flat.shape, dtype=results[0].dtype)
        for (m, idx), r in zip(outs, results):
            out.index_copy_(0, idx, r.to(out.dtype))
        return out.view_as(x)

    def forward_dense(self, x: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        """Reference formulation: every expert on every token, then select. Same result, M x the cost."""
        if self.shared:
            return self.experts[0](x)
        outs = torch.stack([e(x) for e in self.experts], dim=-2)  # (B, T, M, d)
        idx = modality_ids[..., None, None].expand(*modality_ids.shape, 1, x.shape[-1])
        return outs.gather(-2, idx).squeeze(-2)
