"""pill's CUDA path in one command: correctness in bf16, then speed and memory at LLaMA-2-7B shapes.

    PYTHONPATH=src python bench/gpu_check.py                 # one CUDA GPU (H100-class: under 8 minutes)
    PYTHONPATH=src python bench/gpu_check.py --smoke         # the same code paths on CPU, tiny shapes, seconds

Writes ``--out`` (JSON, default ``gpu_check.json``) and ``--markdown`` (default ``gpu_check.md``).
Needs torch, transformers, accelerate, peft, safetensors, numpy and pill's source; every model is
built from a config with random weights (nothing is downloaded, nothing is installed).

(a) Correctness, bf16 weights and bf16 autocast, on tiny random LLaMA and Qwen2 (GQA) models:
    text-only logits of the plugged model equal the base model's; zero gates zero the visual
    values in every layer and leave the text values alone; greedy generation with the KV cache
    equals recomputation; 30 training steps lower the loss; the trained tensors survive a save
    and load; attention runs through SDPA (and which fused kernel: flash, efficient, cuDNN);
    on CUDA, the host syncs of a training step (``torch.cuda.set_sync_debug_mode``) do not grow
    with the number of layers.
(b) Speed and memory at LLaMA-2-7B shapes (d 4096, 32 layers, 32 heads, vocab 32000), random
    bf16 weights shared by every contender, batch 4 x 512 with 32 visual tokens per row (BLIP-2's
    Q-Former: width 768), AdamW: PILL stage 2 eager, compiled (``train.compile``) and with W_g
    and W_d as one matmul (``bench/experiments.py``'s ``fused_adapter``), the frozen bound
    (projector only, gradient through the frozen LLM), PEFT LoRA r = 8 on q and v, and the
    reference code's compute-all experts, interleaved. Step-time ratios, generation
    tokens/s against the base model, peak GPU memory against the frozen bound, the frozen
    bound's MFU, and the ScienceQA epoch extrapolated from the step time.

Every phase checks the time budget (``--budget-s``) before it starts and the JSON is rewritten
after every phase, so an interrupted run still leaves what it measured.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import platform
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` as a package, from any cwd

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

# LLaMA-2-7B and the paper's batch; the smoke shapes only exercise the code paths.
SHAPES = {
    "full": dict(d=4096, f=11008, layers=32, heads=32, kv_heads=32, vocab=32000, batch=4, length=512, K=32,
                 d_vpg=768, gen_text=32, gen_tokens=64, warmup=2, reps=5, gen_warmup=1, gen_reps=3),
    "smoke": dict(d=64, f=128, layers=2, heads=4, kv_heads=4, vocab=1000, batch=2, length=64, K=8,
                  d_vpg=32, gen_text=8, gen_tokens=4, warmup=1, reps=2, gen_warmup=0, gen_reps=1),
}
BF16_TIE = 2e-2  # a top-2 logit margin this small is within bf16 rounding: either greedy token is right
CONTENDERS = ("pill", "pill_compiled", "pill_fused", "frozen", "lora_qv", "compute_all")
SCIENCEQA_TRAIN = 12726  # training problems (design note, section 5)
PAPER_EPOCHS = 20
LAVIN_7B_HOURS = 1.4  # LaVIN-7B's published ScienceQA training time
PILL_CLAIM_OF_LAVIN = 0.9  # the PILL paper: PILL needs 90 % of LaVIN's training time
# Dense bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets (first match wins).
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("GH200", 989.0),
               ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("A6000", 154.8), ("L4", 121.0),
               ("4090", 165.2), ("A10", 125.0))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# -- models ---------------------------------------------------------------------------------

def _llm(kind: str, device: torch.device, seed: int = 0, **shape):
    """A random-init causal LM of ``kind`` in bf16 on ``device``, built there (SDPA attention)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(kind, **shape)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value >= cfg.vocab_size:
            setattr(cfg, name, None)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return model.eval()


def _tiny(kind: str, device: torch.device, layers: int = 2, seed: int = 0):
    """2-layer, width 64, 4 query / 2 key-value heads (GQA): pill's test models, in bf16."""
    return _llm(kind, device, seed, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=2000, max_position_embeddings=512)


def _big(s: dict, device: torch.device):
    return _llm("llama", device, 0, hidden_size=s["d"], intermediate_size=s["f"], num_hidden_layers=s["layers"],
                num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"],
                max_position_embeddings=4096, rms_norm_eps=1e-5)


def shared_copy(model: nn.Module) -> nn.Module:
    """A new module tree over the same parameter and buffer tensors (frozen weights held once)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def _vlm(llm, K: int, d_vpg: int, **cfg):
    from bench.common import FeatureVPG
    from pill.config import PillConfig
    from pill.vlm import PillVLM

    torch.manual_seed(0)
    return PillVLM(llm, FeatureVPG(K, d_vpg), None, PillConfig(**cfg))


def _randomise(vlm, std: float = 0.05, seed: int = 1) -> None:
    """Non-zero plug-ins (a trained-looking state), projector included."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in vlm.named_parameters():
            if "pill_" in n:
                p.normal_(0, std)


def _compute_all_forward(self, x, modality_ids=None, routing=None):
    """The reference code's MoMAE: every expert on every token, then select by modality."""
    from pill.modules import ModalityExperts

    ids = routing.ids if routing is not None else modality_ids
    if self.shared or ids is None:
        return ModalityExperts.forward(self, x, modality_ids, routing)
    return self.forward_dense(x, ids)


def use_compute_all(vlm) -> None:
    from pill.modules import ModalityExperts

    for m in vlm.modules():
        if isinstance(m, ModalityExperts):
            m.forward = types.MethodType(_compute_all_forward, m)


def _batch(vocab: int, B: int, T: int, K: int, d_vpg: int, device: torch.device, pad: int = 0) -> dict:
    """B rows of T tokens: BOS, K image slots, text; loss on the last quarter; ``pad`` left-padded
    positions in row 0."""
    from bench.common import training_batch

    b = training_batch(vocab, B, T, K, d_vpg, device)
    if pad:
        b["attention_mask"][0, :pad] = 0
    return b


# -- (a) correctness --------------------------------------------------------------------------

def _kernels(fn: Callable[[], object], device: torch.device) -> list[str]:
    """The scaled-dot-product-attention ops that ``fn()`` runs (aten names)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:  # the aten dispatch records name the kernel
        fn()
        _sync(device)
    return sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key})


def _fused(kernels: list[str]) -> list[str]:
    return [k for k in kernels if any(w in k for w in ("flash", "efficient", "cudnn"))]


def top2_margin(vlm, ids: torch.Tensor, mods: torch.Tensor, feats: torch.Tensor, tokens: torch.Tensor,
                device: torch.device) -> float:
    """Gap between the two best next-token logits after prompt ``ids`` (1, T) and ``tokens`` (1, j)."""
    prefix = torch.cat([ids, tokens], 1)
    with torch.no_grad(), _autocast(device):
        logits = vlm(input_ids=prefix, modality_ids=torch.cat([mods, torch.zeros_like(tokens)], 1),
                     image_features=feats, logits="last").logits.float()
    top2 = logits[0].topk(2).values
    return float(top2[0] - top2[1])


def check_family(kind: str, device: torch.device, log=_log) -> dict:
    """The correctness checks of (a) on one tiny random model family."""
    from pill.checkpoint import load_weights, save_weights
    from pill.models import fingerprint_llm
    from pill.plug import PillValueProj

    out: dict = {"family": kind}
    K, d_vpg = 4, 32
    base = _tiny(kind, device)
    vlm = _vlm(_tiny(kind, device), K, d_vpg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 2000, (2, 24), generator=g).to(device)
    mask = torch.ones_like(ids)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)

    # 1. text-only logits equal the base model's (zero-initialised plug-ins)
    with torch.no_grad(), _autocast(device):
        ref = base(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
        got = vlm(input_ids=ids, attention_mask=mask).logits.float()
    diff = float((got - ref).abs().max())
    out["text_logits_equal_base"] = {"max_abs_diff": diff, "tolerance": 1e-2, "ok": diff <= 1e-2}

    # 2. zero gates: visual values are zero in every layer, text values untouched
    b = _batch(2000, 2, 24, K, d_vpg, device)
    seen: list = []
    hooks = []
    for m in vlm.llm.modules():
        if isinstance(m, PillValueProj):
            hooks.append(m.base.register_forward_hook(lambda mod, i, o: seen.append(o.detach().clone())))
            hooks.append(m.register_forward_hook(lambda mod, i, o: seen.append(o.detach().clone())))
    with torch.no_grad(), _autocast(device):
        vlm(**{k: v for k, v in b.items() if k != "labels"}, logits="none")
    for h in hooks:
        h.remove()
    visual = b["modality_ids"].bool()
    pairs = list(zip(seen[0::2], seen[1::2]))
    zero = all(bool((gated[visual] == 0).all()) and torch.equal(gated[~visual], raw[~visual]) and
               bool(raw[visual].abs().sum() > 0) for raw, gated in pairs)
    out["zero_gate_values"] = {"layers": len(pairs), "ok": zero and len(pairs) == vlm.llm.config.num_hidden_layers}

    # 3. greedy generation: KV cache == recomputation (non-zero plug-ins, one row with an image)
    _randomise(vlm)
    gen_ids, gen_mods = b["input_ids"][:, :16], b["modality_ids"][:, :16]
    kw = dict(attention_mask=torch.ones_like(gen_ids), modality_ids=gen_mods, image_features=b["image_features"],
              max_new_tokens=8, eos_token_id=[])
    with _autocast(device):
        cached = vlm.generate(gen_ids, use_cache=True, **kw)
        full = vlm.generate(gen_ids, use_cache=False, **kw)
    same = torch.equal(cached, full)
    kv = {"tokens": list(cached.shape), "equal": same, "ok": same}
    if not same:  # a difference is only acceptable at a near-tie of the two best logits (bf16 rounding)
        j = int((cached != full).any(0).nonzero()[0])
        row = int((cached[:, j] != full[:, j]).nonzero()[0])
        margin = top2_margin(vlm, gen_ids[row:row + 1], gen_mods[row:row + 1], b["image_features"][row:row + 1],
                             cached[row:row + 1, :j], device)
        kv.update(first_difference_step=j, row=row, top2_margin=margin, ok=margin <= BF16_TIE)
    out["kv_cache_equals_recompute"] = kv

    # 4. 30 stage-2 training steps on one batch lower the loss
    tvlm = _vlm(_tiny(kind, device), K, d_vpg)
    tvlm.set_stage("finetune")
    tvlm.enable_plugin_recompute(True)
    tvlm.train()
    opt = torch.optim.AdamW([p for p in tvlm.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(31):
        with _autocast(device):
            loss = tvlm(**b).loss
        losses.append(float(loss))
        if len(losses) == 31:
            break
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    out["training_lowers_loss"] = {"loss_first": losses[0], "loss_after_30": losses[-1],
                                   "ok": math.isfinite(losses[-1]) and losses[-1] < losses[0]}

    # 5. save and load: the trained tensors give the same logits in a fresh model
    tvlm.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pill_weights.safetensors"
        fp = {"llm_fingerprint": fingerprint_llm(tvlm.llm)}
        save_weights(path, tvlm.pill_state_dict(), fp)
        fresh = _vlm(_tiny(kind, device), K, d_vpg)
        tensors, _ = load_weights(path, {"llm_fingerprint": fingerprint_llm(fresh.llm)})
        loaded = fresh.load_pill_state_dict(tensors)
    fresh.eval()
    with torch.no_grad(), _autocast(device):
        a = tvlm(**{k: v for k, v in b.items() if k != "labels"}).logits
        c = fresh(**{k: v for k, v in b.items() if k != "labels"}).logits
    out["save_load_round_trip"] = {"tensors": len(loaded), "ok": torch.equal(a, c)}

    # 6. SDPA, and which kernel: without padding (causal, no mask) and with a padded row (a mask)
    inp = {k: v for k, v in b.items() if k != "labels"}
    padded = {**inp, "attention_mask": inp["attention_mask"].clone()}
    padded["attention_mask"][0, :3] = 0
    with torch.no_grad(), _autocast(device):
        k_plain = _kernels(lambda: vlm(**inp, logits="none"), device)
        k_pad = _kernels(lambda: vlm(**padded, logits="none"), device)
    impl = getattr(vlm.llm.config, "_attn_implementation", None)  # pill_sdpa: SDPA via pill.attention
    forced = None
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        try:
            with torch.no_grad(), _autocast(device), sdpa_kernel([SDPBackend.FLASH_ATTENTION,
                                                                   SDPBackend.EFFICIENT_ATTENTION]):
                vlm(**padded, logits="none")
            forced = True
        except RuntimeError as e:
            forced = f"no fused kernel: {str(e).splitlines()[0]}"
    ok = impl in ("sdpa", "pill_sdpa") and bool(k_plain) and (device.type != "cuda" or (bool(_fused(k_plain)) and forced is True))
    out["sdpa"] = {"attn_implementation": impl, "kernels_no_padding": k_plain, "kernels_padding": k_pad,
                   "flash_or_efficient_forced": forced, "ok": ok}
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    if log:
        log(f"  {kind}: " + ", ".join(f"{k} {'ok' if v['ok'] else 'FAILED'}" for k, v in out.items()
                                     if isinstance(v, dict)))
    return out


def check_host_syncs(device: torch.device) -> dict:
    """CUDA: the synchronising calls of one training step (forward + backward) at 2 and 4 layers,
    as ``torch.cuda.set_sync_debug_mode("warn")`` reports them; equal counts = none per layer."""
    if device.type != "cuda":
        return {"ok": True, "skipped": "CUDA only (on CPU, tests/test_host_syncs.py counts the read-backs)"}
    counts = {}
    for layers in (2, 4):
        vlm = _vlm(_tiny("llama", device, layers=layers), 4, 32)
        _randomise(vlm)
        vlm.set_stage("finetune")
        vlm.enable_plugin_recompute(True)
        vlm.train()
        b = _batch(2000, 2, 24, 4, 32, device)
        with _autocast(device):  # once untimed: lazy initialisations sync
            vlm(**b).loss.backward()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with _autocast(device):
                    vlm(**b).loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[str(layers)] = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
    return {"syncs_per_step": counts, "ok": counts["2"] == counts["4"]}


# -- (b) speed and memory ----------------------------------------------------------------------

def _trainable_bytes(module: nn.Module, opt: Optional[torch.optim.Optimizer]) -> int:
    """Bytes of a contender's own tensors: its trainable parameters and their optimizer state."""
    n = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    if opt is not None:
        for st in opt.state.values():
            n += sum(t.numel() * t.element_size() for t in st.values() if torch.is_tensor(t) and t.dim() > 0)
    return n


def build_contenders(base: nn.Module, s: dict, names, device: torch.device, compile_backend: str) -> dict:
    from bench.training import ProjectedLLM

    out = {}
    for name in names:
        if name in ("pill", "pill_compiled", "pill_fused", "compute_all"):
            m = _vlm(shared_copy(base), s["K"], s["d_vpg"])
            m.set_stage("finetune")
            m.enable_plugin_recompute(True)  # as `pill train` runs stage 2 (train.recompute_plugins)
            if name == "pill_compiled":
                m.compile_layers(backend=compile_backend)
            if name == "compute_all":
                use_compute_all(m)
        elif name == "frozen":
            m = ProjectedLLM(shared_copy(base), s["d_vpg"])
        elif name == "lora_qv":
            from peft import LoraConfig, get_peft_model

            llm = get_peft_model(shared_copy(base), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                                target_modules=["q_proj", "v_proj"]))
            m = ProjectedLLM(llm, s["d_vpg"])
        else:
            raise ValueError(f"unknown contender {name!r}")
        out[name] = m.to(device).train()
    return out


def _step_fn(module: nn.Module, opt, batch: dict, device: torch.device, memory: dict):
    """One training step (bf16 autocast forward, backward, AdamW, zero_grad); records the step's
    peak of allocated bytes above what was allocated before it (CUDA)."""
    def step():
        if device.type == "cuda":
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        with _autocast(device):
            out = module(**batch)
        loss = out if torch.is_tensor(out) else out.loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            memory["step_peak_bytes"] = max(memory.get("step_peak_bytes", 0),
                                            torch.cuda.max_memory_allocated() - before)
        return loss.detach()

    return step


def frozen_step_flops(s: dict) -> dict:
    """FLOPs of one frozen-bound step: forward plus the input-gradient backward (no weight
    gradients in the LLM), causal attention counted at half, LM head on the answer quarter."""
    d, f, L, V = s["d"], s["f"], s["layers"], s["vocab"]
    hd = d // s["heads"]
    d_kv = s["kv_heads"] * hd
    tokens = s["batch"] * s["length"]
    linear = L * (2 * d * d + 2 * d * d_kv + 3 * d * f)  # q, o; k, v; gate, up, down
    matmul = 2 * linear * tokens * 2  # forward + input gradients
    attn_fwd = L * s["batch"] * 2 * 2 * s["length"] ** 2 * d * 0.5  # QK^T and PV, causal half
    attention = attn_fwd * 3  # forward + backward (dQ, dK, dV: twice the forward)
    n_answer = s["batch"] * max(1, int(s["length"] * 0.25))
    head = 2 * d * V * n_answer * 2
    total = matmul + attention + head
    return {"total": total, "linear": matmul, "attention": attention, "lm_head": head,
            "formula": "4 P_linear B T + 3 * (L B 2 T^2 d) + 4 d V N_answer"}


def peak_tflops(name: Optional[str]) -> tuple[Optional[float], str]:
    for key, value in PEAK_TFLOPS:
        if name and key.lower() in name.lower():
            return value, f"dense bf16 data-sheet peak for {key}"
    return None, "unknown device: pass --peak-tflops"


def bench_speed(s: dict, device: torch.device, args, result: dict, save: Callable[[], None],
                time_left: Callable[[], float]) -> dict:
    from bench.common import interleave, ratio, summary
    from bench.generation import base_generate
    from bench.training import make_optimizer

    out: dict = {"shapes": s, "contenders": list(args.contenders)}
    result["speed"] = out
    t = time.perf_counter()
    base = _big(s, device)
    for p in base.parameters():
        p.requires_grad_(False)
    weight_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    out["weight_bytes"] = weight_bytes
    out["build_s"] = round(time.perf_counter() - t, 1)
    _log(f"  base LLM: {sum(p.numel() for p in base.parameters()):,} parameters, bf16, built in {out['build_s']} s")
    modules = build_contenders(base, s, args.contenders, device, args.compile_backend)
    opts = {n: make_optimizer(m) for n, m in modules.items()}
    batch = _batch(s["vocab"], s["batch"], s["length"], s["K"], s["d_vpg"], device)
    memory = {n: {} for n in modules}
    steps = {n: _step_fn(m, opts[n], batch, device, memory[n]) for n, m in modules.items()}
    if "pill_fused" in steps:  # W_g and W_d as one d -> 2r matmul (bench/experiments.py's patch), this step only
        from bench.experiments import patched

        def fused(step=steps["pill_fused"]):
            with patched("fused_adapter"):
                return step()
        steps["pill_fused"] = fused
    out["trainable"] = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in modules.items()}

    # first call of each contender alone: the compiled one compiles here
    out["first_step_s"] = {}
    for n, fn in steps.items():
        t = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- one contender failing (OOM, a compiler error) ends only its row
            out.setdefault("errors", {})[n] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
            for o in (opts[n],):
                o.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        _sync(device)
        out["first_step_s"][n] = round(time.perf_counter() - t, 2)
        _log(f"  first step {n}: {out['first_step_s'][n]} s")
    steps = {n: fn for n, fn in steps.items() if n not in out.get("errors", {})}
    save()

    # as many rounds as the budget allows (the first steps, compilation aside, bound a round's time)
    round_s = sum(v for n, v in out["first_step_s"].items() if n in steps and n != "pill_compiled")
    warmup, reps = s["warmup"], s["reps"]
    while reps > 2 and (warmup + reps) * round_s > time_left() - 45:
        reps -= 1
    out["rounds"] = {"warmup": warmup, "reps": reps}
    times = interleave(steps, warmup, reps, device, log=None)
    out["step_time"] = {n: summary(v) for n, v in times.items()}
    rows = [("pill", "frozen"), ("pill_compiled", "frozen"), ("pill_compiled", "pill"), ("pill_fused", "pill"),
            ("pill", "lora_qv"), ("compute_all", "pill"), ("lora_qv", "frozen")]
    out["step_time_ratios"] = {f"{a}/{b}": ratio(times[a], times[b]) for a, b in rows if a in times and b in times}
    for n, v in out["step_time"].items():
        _log(f"  step {n}: {v['median_s'] * 1e3:.1f} ms")
    save()

    # peak memory: the shared weights once + the contender's own tensors + its step's peak above them
    if device.type == "cuda":
        own = {n: _trainable_bytes(modules[n], opts[n]) for n in steps}
        peak = {n: weight_bytes + own[n] + memory[n].get("step_peak_bytes", 0) for n in steps}
        out["peak_memory_bytes"] = peak
        out["peak_memory_ratio_vs_frozen"] = {n: v / peak["frozen"] for n, v in peak.items()} if "frozen" in peak else {}
        out["memory_method"] = ("bf16 weights (held once, shared by the contenders) + the contender's trainable "
                                "parameters and AdamW state + torch.cuda.max_memory_allocated() of its step above "
                                "what was allocated before the step")

    # MFU of the frozen bound
    fl = frozen_step_flops(s)
    out["frozen_step_flops"] = fl
    if "frozen" in times:
        achieved = fl["total"] / out["step_time"]["frozen"]["median_s"]
        pk, src = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else peak_tflops(
            torch.cuda.get_device_name(0) if device.type == "cuda" else None)
        out["frozen_mfu"] = {"achieved_tflops": achieved / 1e12, "peak_tflops": pk, "peak_source": src,
                             "mfu": achieved / (pk * 1e12) if pk else None}

    # ScienceQA: steps of the paper's batch 4 at length 512 (an upper bound: most prompts are shorter)
    steps_per_epoch = math.ceil(SCIENCEQA_TRAIN / s["batch"])
    sqa = {"train_problems": SCIENCEQA_TRAIN, "batch": s["batch"], "length": s["length"],
           "steps_per_epoch": steps_per_epoch, "lavin_7b_hours_published": LAVIN_7B_HOURS,
           "pill_paper_claim_hours": LAVIN_7B_HOURS * PILL_CLAIM_OF_LAVIN, "epochs": PAPER_EPOCHS}
    for n in ("pill", "pill_compiled"):
        if n in times:
            epoch_h = steps_per_epoch * out["step_time"][n]["median_s"] / 3600
            sqa[n] = {"epoch_hours": epoch_h, "paper_epochs_hours": epoch_h * PAPER_EPOCHS}
    out["scienceqa_extrapolation"] = sqa
    for o in opts.values():
        o.state.clear()
    del opts
    save()

    # generation: batch 1, BOS + K visual + text, greedy with the KV cache, no early stop
    if "pill" in modules and "frozen" in modules and time_left() > 30:
        vlm, llm = modules["pill"], modules["frozen"].llm
        _randomise(vlm, std=0.02)
        vlm.eval()
        T = 1 + s["K"] + s["gen_text"]
        ids, mods = batch["input_ids"][:1, :T], batch["modality_ids"][:1, :T]
        mask = torch.ones_like(ids)
        feats = batch["image_features"][:1]
        with torch.no_grad(), _autocast(device):
            embeds = vlm.embed(ids, mods, image_features=feats).to(torch.bfloat16)

        def run_pill():
            with _autocast(device):
                return vlm.generate(ids, mask, mods, image_features=feats, max_new_tokens=s["gen_tokens"],
                                    eos_token_id=[])

        def run_base():
            with _autocast(device):
                return base_generate(llm, embeds, mask, s["gen_tokens"])

        gt = interleave({"pill": run_pill, "base": run_base}, s["gen_warmup"], s["gen_reps"], device)
        n = s["gen_tokens"]
        out["generation"] = {"prompt_tokens": T, "visual_tokens": s["K"], "new_tokens": n, "batch": 1,
                             **{k: {**summary(v), "tokens_per_s": n / summary(v)["median_s"]} for k, v in gt.items()},
                             "ratio_tokens_per_s_vs_base": ratio(gt["base"], gt["pill"])}
        _log(f"  generation: pill {out['generation']['pill']['tokens_per_s']:.1f} tok/s, "
             f"base {out['generation']['base']['tokens_per_s']:.1f} tok/s")
    elif "generation" not in out:
        out["generation"] = {"skipped": "out of time budget"}
    return out


# -- report -----------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"# pill GPU check ({m['mode']})", "",
             f"Device: {m['device_name']} ({m['device']}), torch {m['torch']}, transformers {m['transformers']}, "
             f"peft {m['peft']}; {m['date']}; {m['seconds'].get('total', '?')} s.", "",
             "## (a) Correctness (bf16)", "", "| check | " + " | ".join(result["correctness"]["families"]) + " |",
             "|---|" + ":---:|" * len(result["correctness"]["families"])]
    fams = result["correctness"]["families"]
    checks = [k for k, v in next(iter(fams.values())).items() if isinstance(v, dict)] if fams else []
    for c in checks:
        cells = []
        for f in fams.values():
            v = f[c]
            extra = f" ({v['max_abs_diff']:.1e})" if "max_abs_diff" in v else \
                f" ({v['loss_first']:.3f} -> {v['loss_after_30']:.3f})" if "loss_first" in v else \
                f" ({', '.join(x.replace('aten::_scaled_dot_product_', '') for x in v['kernels_no_padding'])})" \
                if "kernels_no_padding" in v else ""
            cells.append(("yes" if v["ok"] else "**no**") + extra)
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    hs = result["correctness"].get("host_syncs")
    if hs:
        lines += ["", "Host syncs of a training step: " + (hs.get("skipped") or
                  f"{hs['syncs_per_step']} at 2 / 4 layers ({'equal' if hs['ok'] else '**not equal**'})")]
    sp = result.get("speed")
    if sp and "step_time" in sp:
        sh = sp["shapes"]
        lines += ["", f"## (b) Speed and memory: d {sh['d']}, {sh['layers']} layers, {sh['heads']} heads, "
                  f"vocab {sh['vocab']}, batch {sh['batch']} x {sh['length']}, {sh['K']} visual tokens per row", "",
                  "| contender | step (ms) | first step (s) | trainable | peak memory (GiB) | / frozen |",
                  "|---|---:|---:|---:|---:|---:|"]
        for n, v in sp["step_time"].items():
            pk = sp.get("peak_memory_bytes", {}).get(n)
            r = sp.get("peak_memory_ratio_vs_frozen", {}).get(n)
            lines.append(f"| {n} | {v['median_s'] * 1e3:.1f} | {sp['first_step_s'][n]:.1f} | {sp['trainable'][n]:,} | "
                         + (f"{pk / 2**30:.2f} | {r:.3f} |" if pk else "n/a | n/a |"))
        if sp.get("errors"):
            lines += [""] + [f"- {n} failed: {e}" for n, e in sp["errors"].items()]
        lines += ["", "| step-time ratio | median | min |", "|---|---:|---:|"]
        for k, v in sp["step_time_ratios"].items():
            lines.append(f"| {k} | {v['median']:.3f} | {v['min']:.3f} |")
        g = sp.get("generation", {})
        if "pill" in g:
            lines += ["", f"Generation (batch 1, {g['prompt_tokens']}-token prompt, {g['new_tokens']} new tokens): "
                      f"pill {g['pill']['tokens_per_s']:.1f} tok/s, base {g['base']['tokens_per_s']:.1f} tok/s, "
                      f"ratio {g['ratio_tokens_per_s_vs_base']['median']:.3f}."]
        mfu = sp.get("frozen_mfu")
        if mfu:
            lines += ["", f"Frozen bound: {mfu['achieved_tflops']:.1f} TFLOP/s achieved"
                      + (f", MFU {mfu['mfu']:.1%} of {mfu['peak_tflops']:.0f} ({mfu['peak_source']})." if mfu["mfu"]
                         else f" ({mfu['peak_source']}).")]
        q = sp.get("scienceqa_extrapolation", {})
        if "pill" in q:
            lines += ["", f"ScienceQA ({q['train_problems']:,} training problems, batch {q['batch']}, every sample "
                      f"at {q['length']} tokens: an upper bound), one GPU:", "",
                      "| | one epoch (h) | 20 epochs (h) |", "|---|---:|---:|"]
            for n in ("pill", "pill_compiled"):
                if n in q:
                    lines.append(f"| {n} | {q[n]['epoch_hours']:.2f} | {q[n]['paper_epochs_hours']:.2f} |")
            lines += [f"| LaVIN-7B, published | | {q['lavin_7b_hours_published']:.2f} |",
                      f"| PILL paper's claim (90 % of LaVIN) | | {q['pill_paper_claim_hours']:.2f} |"]
    if result.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(result["skipped"])]
    lines += ["", f"All correctness checks passed: {'yes' if result['correctness'].get('ok') else '**no**'}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: the code paths in seconds (tests)")
    p.add_argument("--device", help="cuda (default) or cpu (with --smoke)")
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--markdown", default="gpu_check.md")
    p.add_argument("--budget-s", type=float, default=450.0, help="stop starting phases after this many seconds")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma-separated: {', '.join(CONTENDERS)}")
    p.add_argument("--compile-backend", help="torch.compile backend of pill_compiled (default inductor; "
                                             "eager with --smoke: dynamo tracing without code generation)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for the MFU")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    args = p.parse_args(argv)
    args.contenders = tuple(c for c in args.contenders.split(",") if c)
    unknown = set(args.contenders) - set(CONTENDERS)
    if unknown:
        raise SystemExit(f"--contenders: unknown {sorted(unknown)}; choose from {', '.join(CONTENDERS)}")
    mode = "smoke" if args.smoke else "full"
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run with --smoke for the CPU check of the code paths")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("gpu_check: the full check needs a CUDA GPU (LLaMA-2-7B shapes); use --smoke on CPU")
    args.compile_backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import peft
    import transformers

    from bench.common import machine

    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    s = dict(SHAPES[mode])
    result: dict = {"meta": {"mode": mode, "device": device.type,
                             "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else machine()["cpu"],
                             "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                             "peft": peft.__version__, "python": platform.python_version(),
                             "command": "python " + " ".join(sys.argv), "compile_backend": args.compile_backend,
                             "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                             "budget_s": args.budget_s, "seconds": {}},
                    "correctness": {"families": {}}, "skipped": []}

    def save() -> None:
        result["meta"]["seconds"]["total"] = round(time.perf_counter() - t0, 1)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
        Path(args.markdown).write_text(markdown(result))

    def phase(name: str, fn: Callable[[], object], need_s: float):
        left = deadline - time.perf_counter()
        if left < need_s:
            result["skipped"].append(f"{name} (needs ~{need_s:.0f} s, {left:.0f} s left of --budget-s)")
            _log(f"[{name}] skipped: out of time budget")
            return None
        _log(f"[{name}]")
        t = time.perf_counter()
        try:
            return fn()
        finally:
            result["meta"]["seconds"][name] = round(time.perf_counter() - t, 1)
            save()

    corr = result["correctness"]
    for kind in ("llama", "qwen2"):
        r = phase(f"correctness_{kind}", lambda kind=kind: check_family(kind, device), 10)
        if r is not None:
            corr["families"][kind] = r
    hs = phase("host_syncs", lambda: check_host_syncs(device), 10)
    if hs is not None:
        corr["host_syncs"] = hs
    corr["ok"] = bool(corr["families"]) and all(f["ok"] for f in corr["families"].values()) and \
        corr.get("host_syncs", {}).get("ok", False)
    save()
    phase("speed", lambda: bench_speed(s, device, args, result, save, lambda: deadline - time.perf_counter()),
          60 if mode == "full" else 1)
    if device.type == "cuda":
        result["meta"]["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    save()
    print(markdown(result))
    print(f"wrote {args.out} and {args.markdown} ({result['meta']['seconds']['total']:.0f} s)")
    return 0 if corr["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
