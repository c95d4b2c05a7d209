"""Items 1 and 5: training-step time and peak training memory of stage-2 PILL against
the frozen-model bound, LoRA (r = 8, all linear layers, through peft) and full fine-tuning.

Every contender gets the same batch (B x L, one image of K visual tokens at the start of
each row, image features precomputed so that no VPG runs), the same trainable projector
``Linear(d_vpg -> d_llm)`` that puts the image into the sequence, the same loss (LM head
only on the labelled answer positions) and the same optimizer step (AdamW). What differs is
only what trains inside the LLM:

- ``pill``: the PILL plug-ins (attention adapters, MoMAE experts, MAG gates), stage 2, as
  ``pill train`` runs them (``train.recompute_plugins``: norm + plug-ins recomputed in backward);
- ``pill-keep`` (memory only): the same, keeping the plug-ins' activations instead;
- ``frozen``: nothing -- the LLM is frozen and the gradient flows through every layer to the
  input embeddings (and so to the projector). Any input-side adapter method pays at least this;
- ``lora``: LoRA r = 8 on every linear layer of the LLM (``target_modules="all-linear"``);
- ``full``: every LLM parameter.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import (FeatureVPG, SavedActivations, autocast, interleave, load_base_llm, peak_rss_bytes, ratio,
                     reset_peak_rss, rss_bytes, summary, sync, training_batch, trim_memory, vpg_shape)

CONTENDERS = ("pill", "frozen", "lora", "full")
BATCH = 4


class ProjectedLLM(nn.Module):
    """A Hugging Face LLM behind a trainable projector, with PillVLM's embedding and loss.

    forward(input_ids, attention_mask, modality_ids, labels (B, T), image_features (N, K, d_vpg))
    -> mean cross-entropy over the labelled positions (the LM head runs only there).
    """

    def __init__(self, llm: nn.Module, dim_vpg: int):
        super().__init__()
        self.llm = llm
        self.projector = nn.Linear(dim_vpg, llm.config.hidden_size, bias=False,
                                   device=next(llm.parameters()).device)
        nn.init.normal_(self.projector.weight, std=0.02)

    def _core(self) -> nn.Module:
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    def forward(self, input_ids, attention_mask, modality_ids, labels, image_features) -> torch.Tensor:
        core = self._core()
        embeds = core.get_input_embeddings()(input_ids)  # (B, T, d)
        visual = self.projector(image_features).to(embeds.dtype)  # (N, K, d)
        embeds = embeds.masked_scatter((modality_ids == 1).unsqueeze(-1), visual.reshape(-1, visual.shape[-1]))
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = core.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False).last_hidden_state  # (B, T, d)
        target = labels[:, 1:]
        mask = target != -100
        logits = core.get_output_embeddings()(hidden[:, :-1][mask])  # (N_answer, V)
        return F.cross_entropy(logits.float(), target[mask], reduction="sum") / mask.sum().clamp(min=1)


def build_contender(name: str, model: str, device: torch.device) -> nn.Module:
    """One contender on ``device``, in train mode, with its LLM loaded afresh."""
    num_tokens, dim_vpg = vpg_shape(model)
    llm = load_base_llm(model, device)
    torch.manual_seed(0)
    if name in ("pill", "pill-keep"):
        from pill.config import PillConfig
        from pill.vlm import PillVLM

        m = PillVLM(llm, FeatureVPG(num_tokens, dim_vpg), None, PillConfig())
        m.set_stage("finetune")
        m.enable_plugin_recompute(name == "pill")
    else:
        for p in llm.parameters():
            p.requires_grad_(name == "full")
        if name == "lora":
            from peft import LoraConfig, get_peft_model

            llm = get_peft_model(llm, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
        elif name not in ("frozen", "full"):
            raise ValueError(f"unknown contender {name!r}; choose from {', '.join(CONTENDERS)}, pill-keep")
        m = ProjectedLLM(llm, dim_vpg)
    return m.to(device).train()


def make_optimizer(module: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; the fused kernel where torch has one for the device."""
    params = [p for p in module.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=1e-5, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-5)


def make_step(module: nn.Module, opt: torch.optim.Optimizer, batch: dict, device: torch.device) -> Callable[[], float]:
    """One training step: forward, backward, AdamW step, zero_grad."""
    def step() -> torch.Tensor:
        with autocast(device):
            out = module(**batch)
        loss = out if torch.is_tensor(out) else out.loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def num_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def bench_step_time(lengths: list[int], model: str, device: torch.device, warmup: int, reps: int,
                    contenders=CONTENDERS, log: Optional[Callable[[str], None]] = print,
                    warmup_length: Optional[int] = None) -> dict:
    """Item 1: median step time per contender and length, interleaved; ratios from the same run.

    ``warmup`` untimed rounds precede the timed ones at every length, or, with ``warmup_length``,
    run once at that (shorter, cheaper) length before all timed rounds.
    """
    num_tokens, dim_vpg = vpg_shape(model)
    modules = {n: build_contender(n, model, device) for n in contenders}
    opts = {n: make_optimizer(m) for n, m in modules.items()}
    vocab = next(iter(modules.values())).llm.config.vocab_size
    out = {"batch": BATCH, "visual_tokens": num_tokens, "vpg_dim": dim_vpg, "answer_fraction": 0.25,
           "warmup": warmup, "reps": reps, "order": list(contenders),
           "trainable": {n: num_trainable(m) for n, m in modules.items()},
           "vpg_in_timing": False, "optimizer": type(next(iter(opts.values()))).__name__,
           "warmup_length": warmup_length, "lengths": {}}
    if warmup_length:
        batch = training_batch(vocab, BATCH, warmup_length, num_tokens, dim_vpg, device)
        if log:
            log(f"  warm-up: {warmup} round(s) at length {warmup_length}")
        interleave({n: make_step(m, opts[n], batch, device) for n, m in modules.items()}, warmup, 0, device)
        warmup = 0
    for L in lengths:
        batch = training_batch(vocab, BATCH, L, num_tokens, dim_vpg, device)
        steps = {n: make_step(m, opts[n], batch, device) for n, m in modules.items()}
        if log:
            log(f"  step time at length {L} ({warmup} warm-up + {reps} timed rounds of {' '.join(contenders)})")
        times = interleave(steps, warmup, reps, device, log=log)
        row = {n: summary(t) for n, t in times.items()}
        row["ratios"] = {f"pill_vs_{b}": ratio(times["pill"], times[b]) for b in contenders if b != "pill"}
        out["lengths"][str(L)] = row
    del modules, opts
    trim_memory()
    return out


# -- item 5: peak memory, one fresh process per contender ---------------------------------

def tensor_peak(step: Callable[[], object]) -> Optional[dict]:
    """Peak bytes of live tensors during one ``step()`` on CPU -- what ``max_memory_allocated``
    reports on CUDA -- from the profiler's memory timeline (allocator-independent), with the
    split by category (parameters, optimizer state, activations, gradients, ...) at the peak.
    None when this torch's (private) memory-timeline API is unavailable."""
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            step()
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    except Exception:  # noqa: BLE001 -- a private API: fall back to RSS only
        return None
    totals = [sum(row) for row in sizes]
    i = max(range(len(totals)), key=totals.__getitem__)
    names = {idx + 1: (c.name.lower() if c is not None else "unknown") for c, idx in _CATEGORY_TO_INDEX.items()}
    return {"peak_bytes": int(totals[i]), "by_category": {names[j]: int(v) for j, v in enumerate(sizes[i]) if j in names}}


def memory_worker(name: str, length: int, model: str, device: torch.device, steps: int = 2) -> dict:
    """Run in a fresh process: build one contender, take ``steps`` training steps, report memory.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only: weights, gradients, optimizer
    state, activations). CPU, two ways: (1) the kernel's peak resident set (``VmHWM``, reset
    just before the first step) minus the resident set of the bare runtime (python + torch +
    transformers imported, nothing built) -- it includes the allocator's fragmentation and
    cached pages; (2) ``tensor_peak_bytes``: the peak of live tensor bytes during a third step,
    from the profiler's memory timeline -- the CPU twin of ``max_memory_allocated``.
    """
    trim_memory()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else rss_bytes()
    module = build_contender(name, model, device)
    opt = make_optimizer(module)
    num_tokens, dim_vpg = vpg_shape(model)
    core = module.llm
    batch = training_batch(core.config.vocab_size, BATCH, length, num_tokens, dim_vpg, device)
    step = make_step(module, opt, batch, device)
    trim_memory()
    if device.type == "cuda":
        sync(device)
        ready = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        ready = rss_bytes()
        reset_peak_rss()
    for _ in range(steps):  # the first step allocates the optimizer state, the second runs with it
        step()
    sync(device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()
    tensors = tensor_peak(step) if device.type == "cpu" else None
    with SavedActivations(module) as saved:  # one more forward, only to count what autograd keeps
        with autocast(device):
            out = module(**batch)
    loss = out if torch.is_tensor(out) else out.loss
    del loss, out
    return {"contender": name, "length": length, "peak_bytes": peak - base, "step_bytes": peak - ready,
            "ready_bytes": ready - base, "saved_activation_bytes": saved.bytes, "trainable": num_trainable(module),
            "tensor_peak_bytes": tensors["peak_bytes"] if tensors else peak - base,
            "tensor_peak_by_category": tensors["by_category"] if tensors else None,
            "method": "cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM - runtime RSS"}


def bench_memory(length: int, model: str, device: torch.device, contenders=CONTENDERS,
                 log: Optional[Callable[[str], None]] = print, in_process: bool = False) -> dict:
    """Item 5: one fresh process per contender (so no contender inherits another's heap)."""
    run = Path(__file__).resolve().parent / "run.py"
    cmds = {n: [sys.executable, str(run), "--memory-worker", n, "--length", str(length), "--model", model,
                "--device", device.type, "--threads", str(torch.get_num_threads())] for n in contenders}
    results = {}
    for n, c in cmds.items():
        if in_process:  # smoke runs only: checks the plumbing, the numbers share one heap
            results[n] = memory_worker(n, length, model, device)
            results[n]["method"] += " (in-process: smoke only, not comparable)"
            trim_memory()
            continue
        p = subprocess.run(c, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"memory worker {n} failed ({p.returncode}):\n{p.stderr[-3000:]}")
        results[n] = json.loads(p.stdout.strip().splitlines()[-1])
    for n, r in results.items():
        if log:
            log(f"  memory {n}: tensor peak {r['tensor_peak_bytes'] / 2**20:.0f} MiB, process peak "
                f"{r['peak_bytes'] / 2**20:.0f} MiB, saved activations {r['saved_activation_bytes'] / 2**20:.0f} MiB")
    out = {"length": length, "batch": BATCH, "method": results[contenders[0]]["method"], "contenders": results}
    f = results["frozen"]
    out["ratios"] = {f"pill_vs_{b}": {k: results["pill"][k] / max(results[b][k], 1)
                                      for k in ("tensor_peak_bytes", "peak_bytes", "step_bytes",
                                                "saved_activation_bytes")}
                     for b in contenders if b != "pill"}
    out["frozen_peak_bytes"] = f["peak_bytes"]
    return out


# -- train.compile: the pill step eager against its compiled layers ------------------------------

def bench_compile(length: int, model: str, device: torch.device, warmup: int, reps: int,
                  log: Optional[Callable[[str], None]] = print) -> dict:
    """``train.compile``: the stage-2 pill step (as ``pill train`` runs it) with eager layers against
    the same step with every decoder layer compiled (``PillVLM.compile_layers``, inductor),
    interleaved on two copies of the model; the first compiled step (the compilation) is timed
    on its own."""
    import time

    num_tokens, dim_vpg = vpg_shape(model)
    modules = {"eager": build_contender("pill", model, device), "compiled": build_contender("pill", model, device)}
    opts = {n: make_optimizer(m) for n, m in modules.items()}
    batch = training_batch(modules["eager"].llm.config.vocab_size, BATCH, length, num_tokens, dim_vpg, device)
    steps = {n: make_step(m, opts[n], batch, device) for n, m in modules.items()}
    losses = {"eager": float(steps["eager"]())}
    modules["compiled"].compile_layers()
    t = time.perf_counter()
    losses["compiled"] = float(steps["compiled"]())
    sync(device)
    compile_s = time.perf_counter() - t
    if log:
        log(f"  compile: first compiled step {compile_s:.1f} s; loss eager {losses['eager']:.6f}, "
            f"compiled {losses['compiled']:.6f}")
    times = interleave(steps, warmup, reps, device, log=log)
    out = {"length": length, "batch": BATCH, "warmup": warmup, "reps": reps, "first_compiled_step_s": compile_s,
           "first_step_loss": losses, **{n: summary(v) for n, v in times.items()},
           "ratio_compiled_vs_eager": ratio(times["compiled"], times["eager"])}
    del modules, opts, steps
    trim_memory()
    return out
