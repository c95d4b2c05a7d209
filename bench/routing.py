"""Item 2: MoMAE expert routing -- gather/scatter (``ModalityExperts.forward``) against the
reference formulation that runs every expert on every token and then selects
(``ModalityExperts.forward_dense``)."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from pill.modules import ModalityExperts, SwiGLUAdapter

from .common import autocast, interleave, ratio, summary


def _experts(dim: int, r: int, device: torch.device) -> ModalityExperts:
    torch.manual_seed(0)
    experts = ModalityExperts(2, lambda: SwiGLUAdapter(dim, r)).to(device)
    for e in experts.experts:  # a trained state: the zero up-projection would make no difference to cost
        torch.nn.init.normal_(e.w_up.weight, std=0.02)
    return experts


def bench_routing(fractions: list[float], dim: int, device: torch.device, warmup: int, reps: int,
                  batch: int = 4, length: int = 512, r: int = 32,
                  log: Optional[Callable[[str], None]] = print) -> dict:
    """Forward + backward (a training step's share) and forward-only time of both formulations.

    x: (batch, length, dim); in every row the first ``fraction * length`` tokens are image
    tokens (one image at the start, as in the training data).
    """
    experts = _experts(dim, r, device)
    params = list(experts.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, length, dim, generator=g).to(device).requires_grad_(True)
    grad_out = torch.randn(batch, length, dim, generator=g).to(device)
    out = {"dim": dim, "r": r, "batch": batch, "length": length, "warmup": warmup, "reps": reps, "fractions": {}}
    for f in fractions:
        mods = torch.zeros(batch, length, dtype=torch.long, device=device)
        mods[:, : int(round(f * length))] = 1
        with torch.no_grad():
            same = torch.allclose(experts(x, mods), experts.forward_dense(x, mods), atol=1e-5)

        def train_fn(fwd):
            def run():
                x.grad = None
                for p in params:
                    p.grad = None
                with autocast(device):
                    y = fwd(x, mods)
                y.backward(grad_out)
            return run

        def infer_fn(fwd):
            def run():
                with torch.no_grad(), autocast(device):
                    fwd(x, mods)
            return run

        if log:
            log(f"  routing at image fraction {f}")
        t_train = interleave({"gather_scatter": train_fn(experts.forward), "compute_all": train_fn(experts.forward_dense)},
                             warmup, reps, device)
        t_inf = interleave({"gather_scatter": infer_fn(experts.forward), "compute_all": infer_fn(experts.forward_dense)},
                           warmup, reps, device)
        out["fractions"][str(f)] = {
            "same_output": bool(same),
            "train": {n: summary(t) for n, t in t_train.items()},
            "forward": {n: summary(t) for n, t in t_inf.items()},
            "ratio_train": ratio(t_train["gather_scatter"], t_train["compute_all"]),
            "ratio_forward": ratio(t_inf["gather_scatter"], t_inf["compute_all"]),
        }
        if log:
            rr = out["fractions"][str(f)]
            log(f"    train {rr['ratio_train']['median']:.3f}x, forward {rr['ratio_forward']['median']:.3f}x")
    return out
