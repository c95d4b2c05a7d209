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
        out = torch.empty_like(flat)
        for m in present:
            idx = (mods == m).nonzero().squeeze(1)  # (N_m,)
            out = out.index_copy(0, idx, self.experts[m](flat.index_select(0, idx)))
        return out.view_as(x)

    def forward_dense(self, x: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        """Reference formulation: every expert on every token, then select. Same result, M x the cost."""
        if self.shared:
            return self.experts[0](x)
        outs = torch.stack([e(x) for e in self.experts], dim=-2)  # (B, T, M, d)
        idx = modality_ids[..., None, None].expand(*modality_ids.shape, 1, x.shape[-1])
        return outs.gather(-2, idx).squeeze(-2)
