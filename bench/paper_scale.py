"""Item 6: PILL at paper scale, on paper -- LLaMA-2-7B + BLIP-2 built on the meta device.

Trainable parameters come from the model itself (``pill.commands.count_parameters``).
Memory at batch B x T (the paper's stage 2: 4 x 512, bf16 autocast, LLM weights in bf16,
plug-ins kept in float32 as master weights, AdamW):

    weights       2 * P_llm  (+ 2 * P_vpg when the VPG sits on the GPU; not with cached features)
    trainable     4 * P  (fp32 master)  +  4 * P  (fp32 gradients)  +  8 * P  (AdamW m, v)
                  + 2 * P  (bf16 copies autocast makes of the plug-in weights during the step)
    optimizer state (the issue's definition) = m + v + fp32 master = 12 * P

Activations = what autograd keeps for the backward pass. The LLM is frozen, so its linear
layers keep no inputs (PyTorch saves a linear's input only when its weight needs a gradient);
with fused (flash) attention no T x T matrix is kept. Per decoder layer and token, in bytes
(d hidden, f FFN width, h heads, d_kv = n_kv * head_dim, r adapter width):

    frozen LLaMA layer:   2 * (4d + 4)      two RMSNorms keep their fp32 input and 1 / rms
                        + 2 * (2d + 2 d_kv) q, k, v, attention output (bf16)
                        + 4h                attention log-sum-exp (fp32)
                        + 3 * 2f            SwiGLU MLP: gate, up, silu(gate) (bf16)
    PILL, plug-in activations kept (``train.recompute_plugins: false``), per token:
                          2d + 4 * 2r       attention adapter: its input n1 and 4 r-wide tensors
                        + 2d + 4 * 2r       MoMAE: the gathered n2, 4 r-wide tensors
                                            (the rows of each modality are found once per
                                            forward and shared by all layers)
                        and per image token:
                          2d                MAG: the gathered attention input a (its row index
                                            is the same shared one)
                        + 2 n_kv + 2 d_kv   tanh(g) and the image rows of v
    PILL as ``pill train`` runs it (``train.recompute_plugins``: norm + plug-in recomputed in
    backward): the two RMSNorms keep nothing (-2 * (4d + 4)); instead each recomputed block
    keeps its input, the layer input and the mid-layer residual (+2 * 2d, bf16; the routing ids
    are the model's one modality-id tensor); the MAG terms are as above.
    outside the layers:   B*T * (4d + 4 + 4 * head_dim + 2)   final norm, RoPE cos/sin, masks
                        + N_answer * 4V     fp32 log-softmax of the loss (head only on answers)
                        + N_images * K * 2 d_vpg             the projector's input

With gradient checkpointing of every decoder layer only each layer's input (2d bytes per
token, bf16) is kept, plus one layer's activations while that layer is recomputed.
:func:`measure_saved` checks the per-layer terms against autograd on the real layer shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

GB = 1e9
GiB = 2**30


@dataclass
class Shapes:
    layers: int = 32
    d: int = 4096
    f: int = 11008
    heads: int = 32
    kv_heads: int = 32
    vocab: int = 32000
    r: int = 32
    K: int = 32  # BLIP-2 Q-Former tokens per image
    d_vpg: int = 768

    @property
    def head_dim(self) -> int:
        return self.d // self.heads

    @property
    def d_kv(self) -> int:
        return self.kv_heads * self.head_dim


def layer_bytes_per_token(s: Shapes, pill: bool, recompute: bool = True) -> dict:
    """Bytes one decoder layer keeps for the backward, per token: text tokens, and the extra of
    image tokens."""
    norms = 2 * (4 * s.d + 4)
    frozen = norms + 2 * (2 * s.d + 2 * s.d_kv) + 4 * s.heads + 3 * 2 * s.f
    if not pill:
        return {"text": frozen, "image_extra": 0}
    mag = 2 * s.d + 2 * s.kv_heads + 2 * s.d_kv  # image rows only; their index is shared by all layers
    if recompute:
        return {"text": frozen - norms + 2 * 2 * s.d, "image_extra": mag}
    adapter = 2 * s.d + 4 * 2 * s.r
    momae = 2 * s.d + 4 * 2 * s.r  # the per-modality row indices are shared by all layers
    return {"text": frozen + adapter + momae, "image_extra": mag}


def activation_bytes(s: Shapes, batch: int, length: int, images_per_row: int = 1, answer_frac: float = 0.25,
                     checkpointing: bool = False, pill: bool = True, recompute: bool = True) -> int:
    """Estimated bytes kept for the backward of one forward of ``batch`` x ``length`` (formula above)."""
    tokens = batch * length
    image_tokens = batch * images_per_row * s.K
    per = layer_bytes_per_token(s, pill, recompute and not checkpointing)
    one_layer = tokens * per["text"] + image_tokens * per["image_extra"]
    outside = tokens * (4 * s.d + 4 + 4 * s.head_dim + 2) + int(batch * length * answer_frac) * 4 * s.vocab \
        + image_tokens * 2 * s.d_vpg
    if checkpointing:
        return s.layers * tokens * 2 * s.d + one_layer + outside
    return s.layers * one_layer + outside


def measure_saved(s: Shapes, length: int, layers: int, pill: bool = True, recompute: bool = True) -> int:
    """Bytes autograd saves for one forward of a real ``layers``-layer model with the shapes ``s``
    (batch 1, one image at the start, all bf16, no autocast), parameters excluded."""
    from pill import attention
    from pill.config import PillConfig
    from pill.models import build_llm_from_config
    from pill.vlm import PillVLM

    from .common import FeatureVPG, SavedActivations, training_batch
    from .training import ProjectedLLM

    llm = build_llm_from_config("llama", device="meta", hidden_size=s.d, intermediate_size=s.f,
                                num_hidden_layers=layers, num_attention_heads=s.heads,
                                num_key_value_heads=s.kv_heads, vocab_size=s.vocab,
                                max_position_embeddings=max(4096, length), rms_norm_eps=1e-5)
    llm = llm.to_empty(device="cpu")
    with torch.no_grad():
        for p in llm.parameters():
            p.zero_()  # values do not change what is saved; zeros are quick and finite
    if pill:
        model = PillVLM(llm, FeatureVPG(s.K, s.d_vpg), None, PillConfig(r=s.r))
        model.set_stage("finetune")
        model.enable_plugin_recompute(recompute)
        # the GPU's attention: bf16 SDPA (on CPU pill.attention would keep float32 copies for its backward)
        attention.restore(model)
    else:
        for p in llm.parameters():
            p.requires_grad_(False)
        model = ProjectedLLM(llm, s.d_vpg)
    model = model.to(torch.bfloat16)
    batch = training_batch(s.vocab, 1, length, s.K, s.d_vpg, torch.device("cpu"))
    batch["image_features"] = batch["image_features"].to(torch.bfloat16)
    with SavedActivations(model) as saved:
        out = model(**batch)
    del out
    return saved.bytes


def bench_paper_scale(measure: bool = True, log: Optional[Callable[[str], None]] = print,
                      measure_length: int = 512, measure_frozen: bool = True) -> dict:
    """Counts, bytes and the activation estimate; ``measure`` checks the formula with autograd
    on one and two real 7B-shaped layers (about 10 s of CPU per model)."""
    from pill.commands import count_parameters

    stage2 = count_parameters("llama2-7b", "blip2-qformer", "finetune")
    stage1 = count_parameters("llama2-7b", "blip2-qformer", "align")
    rows = {r["part"]: r for r in stage2["rows"]}
    P = stage2["trainable"]
    p_llm = rows["LLM (frozen)"]["parameters"]
    p_vpg = rows["VPG (frozen)"]["parameters"]
    s = Shapes()
    B, T = 4, 512
    weights_llm = 2 * p_llm
    weights_vpg = 2 * p_vpg
    master, grads, adam, casts = 4 * P, 4 * P, 8 * P, 2 * P
    act = {"no_checkpointing": activation_bytes(s, B, T), "checkpointing": activation_bytes(s, B, T, checkpointing=True),
           "keep_plugin_activations": activation_bytes(s, B, T, recompute=False),
           "frozen_llm_no_checkpointing": activation_bytes(s, B, T, pill=False)}
    fixed = weights_llm + master + grads + adam + casts
    totals = {}
    for k in ("no_checkpointing", "checkpointing"):
        totals[k] = {"features_cached": fixed + act[k], "vpg_on_gpu": fixed + weights_vpg + act[k]}
    budget = 48 * GB  # an A6000 has 48 GB (49,140 MiB usable, about 51.5e9 bytes); 48e9 is the safe side
    out = {
        "llm": "llama2-7b", "vpg": "blip2-qformer", "batch": B, "length": T, "answer_fraction": 0.25,
        "trainable_stage2": P, "trainable_stage1": stage1["trainable"],
        "trainable_rows": stage2["rows"],
        "llm_params": p_llm, "vpg_params": p_vpg,
        "weight_bytes_bf16": {"llm": weights_llm, "vpg": weights_vpg, "total": weights_llm + weights_vpg},
        "optimizer_state_bytes": master + adam,
        "trainable_bytes": {"fp32_master": master, "fp32_grads": grads, "adamw_m_v": adam, "bf16_autocast_copies": casts},
        "activation_bytes": act,
        "activation_formula": "L*B*T*a_layer + B*K*a_image + B*T*(4d+4+4*head_dim+2) + N_answer*4V + N_img*K*2*d_vpg; "
                              "checkpointing: L*B*T*2d + one layer + outside (see bench/paper_scale.py)",
        "layer_bytes_per_token": layer_bytes_per_token(s, True),
        "recompute_plugins": "no_checkpointing is what pill train does by default (train.recompute_plugins); "
                             "keep_plugin_activations: with it off",
        "total_bytes": totals,
        "fits_48gb": {k: {kk: vv < budget for kk, vv in v.items()} for k, v in totals.items()},
        "headroom_bytes_no_checkpointing_vpg_on_gpu": budget - totals["no_checkpointing"]["vpg_on_gpu"],
        "note": "excludes the CUDA context (~0.5 GB) and allocator fragmentation",
    }
    if log:
        log(f"  paper scale: {P:,} trainable; activations {act['no_checkpointing'] / GB:.1f} GB "
            f"({act['checkpointing'] / GB:.2f} GB with checkpointing); total "
            f"{totals['no_checkpointing']['vpg_on_gpu'] / GB:.1f} GB")
    if measure:
        # The per-layer terms, checked on the real LLaMA-2-7B layer shapes: 2 layers minus 1 layer,
        # one row of the batch (every term is per row, so the batch multiplies it).
        val = {"length": measure_length, "batch": 1}
        kinds = {"pill": (True, True), "pill_keep": (True, False), "frozen": (False, False)}
        for kind, (pill, recompute) in kinds.items():
            if kind == "frozen" and not measure_frozen:
                continue
            m1 = measure_saved(s, measure_length, 1, pill, recompute)
            per_layer = measure_saved(s, measure_length, 2, pill, recompute) - m1
            per = layer_bytes_per_token(s, pill, recompute)
            formula = measure_length * per["text"] + s.K * per["image_extra"]
            val[kind] = {"per_layer_measured": per_layer, "per_layer_formula": formula,
                         "per_layer_error": formula / per_layer - 1, "outside_measured": m1 - per_layer,
                         "outside_formula": activation_bytes(Shapes(layers=0), 1, measure_length, pill=pill)}
            if log:
                log(f"  {kind}: formula vs autograd, one 7B layer at 1 x {measure_length}: "
                    f"{formula / 2**20:.1f} vs {per_layer / 2**20:.1f} MiB ({formula / per_layer - 1:+.1%})")
        out["validation"] = val
        if measure_length == T:  # the measured terms give the estimate directly
            v, vk = val["pill"], val["pill_keep"]
            layer_in = 2 * s.d * T  # per row and layer, kept under checkpointing
            measured = {"no_checkpointing": B * (s.layers * v["per_layer_measured"] + v["outside_measured"]),
                        "checkpointing": B * (s.layers * layer_in + vk["per_layer_measured"] + vk["outside_measured"]),
                        "keep_plugin_activations": B * (s.layers * vk["per_layer_measured"] + vk["outside_measured"])}
            out["activation_bytes_measured_terms"] = measured
            act["keep_plugin_activations"] = max(act["keep_plugin_activations"], measured["keep_plugin_activations"])
            for k in ("no_checkpointing", "checkpointing"):
                act[k] = max(act[k], measured[k])  # the larger of formula and measurement
                totals[k] = {"features_cached": fixed + act[k], "vpg_on_gpu": fixed + weights_vpg + act[k]}
            out["total_bytes"] = totals
            out["fits_48gb"] = {k: {kk: vv < budget for kk, vv in v2.items()} for k, v2 in totals.items()}
            out["headroom_bytes_no_checkpointing_vpg_on_gpu"] = budget - totals["no_checkpointing"]["vpg_on_gpu"]
    return out
