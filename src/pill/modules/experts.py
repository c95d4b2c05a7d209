"""Mixture-of-Modality-Adapter-Experts (MoMAE): hard routing by modality id."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

SHARED = "expert:shared"  # group of the one FFN adapter of the no-MoMAE ablation


class _SplitRows(torch.autograd.Function):
    """x (N, d) -> [x[idx] for idx in idxs], where the idxs partition the N rows.

    Because every row lands in exactly one part, the backward pass writes each part's
    gradient into its rows once (index_copy) instead of zero-filling and
    scatter-adding once per part, as plain index_select would.
    """

    @staticmethod
    def forward(ctx, x, *idxs):
        ctx.save_for_backward(*idxs)
        ctx.shape = x.shape
        return tuple(x.index_select(0, i) for i in idxs)

    @staticmethod
    def backward(ctx, *grads):
        idxs = ctx.saved_tensors
        ref = next(g for g in grads if g is not None)
        out = ref.new_empty(ctx.shape)
        for i, g in zip(idxs, grads):
            out.index_copy_(0, i, g if g is not None else ref.new_zeros(len(i), ctx.shape[1]))
        return (out, *[None] * len(idxs))


class _MergeRows(torch.autograd.Function):
    """[part_m (N_m, d)] -> (N, d) with part_m in rows idxs[m]; the inverse of _SplitRows."""

    @staticmethod
    def forward(ctx, n, idxs, *parts):
        ctx.idxs = idxs
        out = parts[0].new_empty((n, parts[0].shape[1]))
        for i, p in zip(idxs, parts):
            out.index_copy_(0, i, p)
        return out

    @staticmethod
    def backward(ctx, grad):
        return (None, None, *[grad.index_select(0, i) for i in ctx.idxs])


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

    def pill_parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """``expert:<modality id>`` per expert (``expert:shared`` for the one shared adapter)."""
        keys = [SHARED] if self.shared else [f"expert:{m}" for m in range(self.num_modalities)]
        return {k: [(f"experts.{i}.{n}", p) for n, p in e.named_parameters()]
                for i, (k, e) in enumerate(zip(keys, self.experts))}

    def forward(self, x: torch.Tensor, modality_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, T, d), modality_ids: (B, T) long or None (all text) -> expert output (B, T, d)."""
        dtype = self.experts[0].w_up.weight.dtype
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
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
        idxs = [(mods == m).nonzero().squeeze(1) for m in present]  # (N_m,) token rows per modality
        parts = _SplitRows.apply(flat, *idxs)  # gather: [(N_m, d)]
        results = [self.experts[m](p) for m, p in zip(present, parts)]  # each token, its own expert
        return _MergeRows.apply(flat.shape[0], idxs, *results).view_as(x)  # scatter back

    def forward_dense(self, x: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        """Reference formulation: every expert on every token, then select. Same result, M x the cost."""
        if self.shared:
            return self.experts[0](x)
        outs = torch.stack([e(x) for e in self.experts], dim=-2)  # (B, T, M, d)
        idx = modality_ids[..., None, None].expand(*modality_ids.shape, 1, x.shape[-1])
        return outs.gather(-2, idx).squeeze(-2)
