"""Mixture-of-Modality-Adapter-Experts (MoMAE): hard routing by modality id."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..errors import DataError
from .adapter import is_inert

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


@dataclass(frozen=True)
class Routing:
    """Where each modality's tokens sit among the ``N = B * T`` flat rows of one forward.

    Found once per forward by :func:`route` (the only host sync of the routing: the per-modality
    counts) and shared by every layer, so that no layer waits on the device.
    ``experts[k]`` is the expert that takes the rows ``rows[k]``; ``rows`` is None when one
    expert takes every row. ``visual``: the flat indices of the non-text rows (for the gates).
    """

    ids: Optional[torch.Tensor]  # (B, T) modality id per token (None: every token is experts[0]'s)
    experts: tuple[int, ...]  # expert index per group of rows, one group per modality present
    rows: Optional[tuple[torch.Tensor, ...]]  # (N_k,) flat row indices per group, or None: all rows
    visual: Optional[torch.Tensor] = None  # (N_vis,) flat indices of the non-text rows

    @classmethod
    def single(cls, expert: int) -> "Routing":
        """Every token to ``expert`` (text-only input: expert 0)."""
        return cls(None, (expert,), None, None)

    def swapped(self, a: int, b: int = 0) -> "Routing":
        """The same rows with the experts of modalities ``a`` and ``b`` exchanged (the align stage's
        last layer); no device work beyond the ids' ``where``."""
        swap = {a: b, b: a}
        ids = self.ids
        if ids is not None:
            ids = torch.where(ids == b, a, torch.where(ids == a, b, ids))
        return Routing(ids, tuple(swap.get(e, e) for e in self.experts), self.rows, self.visual)


def route(modality_ids: torch.Tensor, num_modalities: int) -> Routing:
    """(B, T) long modality ids -> :class:`Routing`, with one host sync (the counts per modality).

    The rows of each modality come from one stable sort of the ids split by those counts, so
    finding M groups costs no more syncs than finding one."""
    flat = modality_ids.reshape(-1)  # (N,)
    if flat.dtype.is_floating_point or flat.dtype == torch.bool:
        raise DataError(f"modality_ids must be integer ids, got dtype {flat.dtype}")
    bucket = flat.clamp(-1, num_modalities) + 1  # 0: below range, M + 1: above it
    # scatter_add into a fixed-size tensor, not bincount: on CUDA bincount reads the max back first
    counts = torch.zeros(num_modalities + 2, dtype=torch.long, device=flat.device).scatter_add_(
        0, bucket, torch.ones_like(bucket)).tolist()
    if counts[0] or counts[-1]:
        raise DataError(f"modality_ids must be in [0, {num_modalities - 1}] (one expert per modality); "
                        f"got {counts[0] + counts[-1]} token(s) outside that range")
    counts = counts[1:-1]  # tokens per modality id 0 .. M-1
    present = tuple(m for m, c in enumerate(counts) if c)
    if len(present) <= 1:
        visual = flat.new_empty(0) if not present or present[0] == 0 else torch.arange(flat.numel(), device=flat.device)
        return Routing(modality_ids, present or (0,), None, visual)
    order = torch.sort(flat, stable=True).indices  # (N,) rows grouped by modality, in position order
    groups = order.split(counts)
    return Routing(modality_ids, present, tuple(groups[m] for m in present), order[counts[0]:])


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

    def forward(self, x: torch.Tensor, modality_ids: Optional[torch.Tensor] = None,
                routing: Optional[Routing] = None) -> torch.Tensor:
        """x: (B, T, d), modality_ids: (B, T) long or None (all text) -> expert output (B, T, d).

        ``routing``: the rows of each modality, found once per forward (:func:`route`) and given
        instead of ``modality_ids`` by the plugged model's layers; with it this method never
        waits on the device."""
        dtype = self.experts[0].w_up.weight.dtype
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            return self.forward(x.to(dtype), modality_ids, routing).to(x.dtype)
        if self.shared:
            return self.experts[0](x)
        if routing is None:
            routing = Routing.single(0) if modality_ids is None else route(modality_ids, self.num_modalities)
        if routing.rows is None:  # one modality only (text-only input, generation steps)
            return self.experts[routing.experts[0]](x)
        flat = x.reshape(-1, x.shape[-1])  # (N, d)
        parts = _SplitRows.apply(flat, *routing.rows)  # gather: [(N_k, d)]
        results = [self.experts[e](p) for e, p in zip(routing.experts, parts)]  # each token, its own expert
        return _MergeRows.apply(flat.shape[0], routing.rows, *results).view_as(x)  # scatter back

    def residual(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """``x + Expert[m](x)`` per token (the MoMAE sublayer), where the experts that add nothing
        (:func:`~pill.modules.adapter.is_inert`: zero output projection, nothing to train) are
        skipped: in the align stage the frozen text expert's rows pass through untouched and only
        the aligned modality's rows are gathered, run through their expert and added back."""
        groups = (0,) if self.shared else routing.experts
        live = [k for k, e in enumerate(groups) if not is_inert(self.experts[e])]
        if len(live) == len(groups):
            return x + self(x, routing=routing)
        if not live:
            return x
        flat = x.reshape(-1, x.shape[-1])  # (N, d); here rows is set: an inert expert is never the only one
        for k in live:
            rows = routing.rows[k]
            out = self(flat.index_select(0, rows), routing=Routing.single(groups[k]))  # forward handles dtypes
            flat = flat.index_add(0, rows, out.to(flat.dtype))
        return flat.view_as(x)

    def forward_dense(self, x: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        """Reference formulation: every expert on every token, then select. Same result, M x the cost."""
        if self.shared:
            return self.experts[0](x)
        outs = torch.stack([e(x) for e in self.experts], dim=-2)  # (B, T, M, d)
        idx = modality_ids[..., None, None].expand(*modality_ids.shape, 1, x.shape[-1])
        return outs.gather(-2, idx).squeeze(-2)
