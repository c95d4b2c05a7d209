"""Candidate library changes, tried as reversible patches, with their measured effect.

    python bench/experiments.py [--length 512] [--reps 3] [--out experiments.json]

Each patch replaces one method of a pill class for the duration of a ``with patched(...)``
block; the proposed source change is the patched function. For every patch the script checks
that loss and gradients equal the unpatched model's, then measures (1) the bytes autograd
saves for one forward -- deterministic, (2) step time, interleaved with the unpatched step on
the same model and batch, and (3) the peak resident memory of a fresh process.

Patches:
    fused_adapter      SwiGLUAdapter: one d -> 2r matmul for W_g and W_d (weights concatenated
                       on the fly, parameter names unchanged)

Measured earlier and since merged into the library (BENCHMARKS.md): ``recompute_plugins``
(now ``train.recompute_plugins``) and ``mag_image_rows`` (the gate touches only image rows).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


# -- the patches -----------------------------------------------------------------------------

def _fused_adapter_forward(self, z: torch.Tensor) -> torch.Tensor:
    r = self.w_gate.out_features
    h = F.linear(z, torch.cat([self.w_gate.weight, self.w_down.weight]))  # (..., 2r): one pass over z
    g, d = h.split(r, dim=-1)
    return self.w_up(F.silu(g) * d)


def _targets():
    from pill.modules import SwiGLUAdapter

    return {
        "fused_adapter": [(SwiGLUAdapter, "forward", _fused_adapter_forward)],
    }


PATCHES = ("fused_adapter",)


@contextlib.contextmanager
def patched(*names: str) -> Iterator[None]:
    """Apply the named patches (``all`` = every patch) for the duration of the block."""
    targets = _targets()
    if "all" in names:
        names = PATCHES
    saved = []
    try:
        for n in names:
            for cls, attr, fn in targets[n]:
                saved.append((cls, attr, cls.__dict__[attr]))
                setattr(cls, attr, fn)
        yield
    finally:
        for cls, attr, fn in reversed(saved):
            setattr(cls, attr, fn)


# -- the measurements ------------------------------------------------------------------------

def _grads(module, batch, device):
    from bench.common import autocast

    module.zero_grad(set_to_none=True)
    with autocast(device):
        loss = module(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return loss.detach(), grads


def run(length: int, reps: int, model: str, variants: list[str], memory: bool, generation: bool = True,
        log=print) -> dict:
    from bench.common import SavedActivations, autocast, interleave, pick_device, ratio, summary, training_batch, \
        vpg_shape
    from bench.training import BATCH, build_contender, make_optimizer, make_step

    device = pick_device()
    K, dim_vpg = vpg_shape(model)
    module = build_contender("pill", model, device)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained state, so that every path carries signal
        for n, p in module.named_parameters():
            if "pill_" in n:
                p.normal_(0, 0.02)
    opt = make_optimizer(module)
    batch = training_batch(module.llm.config.vocab_size, BATCH, length, K, dim_vpg, device)
    out = {"length": length, "batch": BATCH, "model": model, "reps": reps, "variants": {}}
    ref_loss, ref_grads = _grads(module, batch, device)
    steps = {}
    for v in ["baseline"] + variants:
        names = () if v == "baseline" else tuple(v.split("+"))
        with patched(*names):
            loss, grads = _grads(module, batch, device)
            with SavedActivations(module) as saved:
                with autocast(device):
                    o = module(**batch)
            del o
        err = max(float((grads[n] - ref_grads[n]).abs().max() / (ref_grads[n].abs().max() + 1e-12))
                  for n in ref_grads)
        out["variants"][v] = {"saved_activation_bytes": saved.bytes, "loss_diff": float((loss - ref_loss).abs()),
                              "max_rel_grad_diff": err}
        step = make_step(module, opt, batch, device)

        def run_step(step=step, names=names):
            with patched(*names):
                step()
        steps[v] = run_step
        if log:
            log(f"  {v}: saved activations {saved.bytes / 2**20:.0f} MiB, loss diff {out['variants'][v]['loss_diff']:.1e},"
                f" grad diff {err:.1e}")
    times = interleave(steps, 1, reps, device, log=log)
    for v, t in times.items():
        out["variants"][v]["step"] = summary(t)
        out["variants"][v]["step_ratio_vs_baseline"] = ratio(t, times["baseline"])
    if generation:
        ids = batch["input_ids"][:1, : K + 33]
        mods = batch["modality_ids"][:1, : K + 33]
        feats = batch["image_features"][:1]
        module.eval()

        def gen_fn(names):
            def run_gen():
                with patched(*names), autocast(device):
                    module.generate(ids, torch.ones_like(ids), mods, image_features=feats, max_new_tokens=32,
                                    eos_token_id=[])
            return run_gen
        gtimes = interleave({v: gen_fn(() if v == "baseline" else tuple(v.split("+"))) for v in steps}, 1, reps,
                            device, log=log)
        for v, t in gtimes.items():
            out["variants"][v]["generate_32"] = summary(t)
            out["variants"][v]["generate_ratio_vs_baseline"] = ratio(t, gtimes["baseline"])
        module.train()
    if memory:
        run_py = Path(__file__).resolve().parent / "run.py"
        for v in ["baseline"] + variants:
            cmd = [sys.executable, str(run_py), "--memory-worker", "pill", "--length", str(length), "--model", model,
                   "--device", device.type, "--threads", str(torch.get_num_threads())]
            if v != "baseline":
                cmd += ["--patch", v]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(p.stderr[-3000:])
            out["variants"][v]["memory"] = json.loads(p.stdout.strip().splitlines()[-1])
            if log:
                log(f"  {v}: peak {out['variants'][v]['memory']['peak_bytes'] / 2**20:.0f} MiB")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--model", default="embedded", choices=["embedded", "tiny"])
    p.add_argument("--variants", default="fused_adapter")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-memory runs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="experiments.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = run(args.length, args.reps, args.model, args.variants.split(","), not args.no_memory,
              log=lambda m: print(m, file=sys.stderr, flush=True))
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    for v, r in res["variants"].items():
        mem = r.get("memory", {}).get("peak_bytes")
        print(f"{v:>20}: step x{r['step_ratio_vs_baseline']['median']:.3f} (min x{r['step_ratio_vs_baseline']['min']:.3f}), "
              f"saved {r['saved_activation_bytes'] / 2**20:.0f} MiB"
              + (f", peak {mem / 2**20:.0f} MiB" if mem else "")
              + (f", generate x{r['generate_ratio_vs_baseline']['median']:.3f}" if "generate_32" in r else "")
              + f", grad diff {r['max_rel_grad_diff']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
