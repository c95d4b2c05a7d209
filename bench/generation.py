"""Item 3: generation speed with the KV cache, PILL against the base LLM, one image in the prompt.

Both decode greedily the same number of new tokens (no early stop) from the same prompt
embeddings (BOS, K projected visual tokens, text). ``pill`` is ``PillVLM.generate``;
``base`` is the same LLM without plug-ins driven by a loop of the same shape (prefill, then
one cached step per token), the tightest fair bound; ``hf_generate`` is the base LLM's own
``generate`` for reference. Time covers the prefill and every decoding step.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .common import FeatureVPG, autocast, interleave, load_base_llm, ratio, summary, vpg_shape


@torch.no_grad()
def base_generate(llm, embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding of an unplugged HF LLM from prompt embeddings (B, T, d); returns (B, n)."""
    from pill.vlm import _cache_kw

    decoder, head, table = llm.get_decoder(), llm.get_output_embeddings(), llm.get_input_embeddings()
    kw = _cache_kw(decoder)  # "cache" in recent transformers, "past_key_values" before
    B = embeds.shape[0]
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=pos, use_cache=True)
    cache, logits = getattr(out, kw), head(out.last_hidden_state[:, -1])
    tokens = []
    for i in range(max_new_tokens):
        token = logits.argmax(-1)  # (B,)
        tokens.append(token)
        if i == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
        pos = attention_mask.sum(-1, keepdim=True) - 1
        out = decoder(inputs_embeds=table(token[:, None]), attention_mask=attention_mask, position_ids=pos,
                      use_cache=True, **{kw: cache})
        cache, logits = getattr(out, kw), head(out.last_hidden_state[:, -1])
    return torch.stack(tokens, dim=1)


def bench_generation(model: str, device: torch.device, new_tokens: int, warmup: int, reps: int,
                     text_tokens: int = 32, log: Optional[Callable[[str], None]] = print) -> dict:
    from pill.config import PillConfig
    from pill.vlm import PillVLM

    K, dim_vpg = vpg_shape(model)
    vlm = PillVLM(load_base_llm(model, device), FeatureVPG(K, dim_vpg), None, PillConfig()).eval()
    torch.manual_seed(0)
    for n, p in vlm.named_parameters():  # a trained state (non-zero adapters and gates); same cost either way
        if "pill_" in n and "projector" not in n:
            torch.nn.init.normal_(p, std=0.02)
    base = load_base_llm(model, device).eval()
    g = torch.Generator().manual_seed(0)
    T = 1 + K + text_tokens
    ids = torch.randint(10, base.config.vocab_size, (1, T), generator=g)
    ids[0, 0] = 1
    mods = torch.zeros_like(ids)
    mods[0, 1:1 + K] = 1
    ids[mods.bool()] = 0
    ids, mods = ids.to(device), mods.to(device)
    mask = torch.ones_like(ids)
    feats = torch.randn(1, K, dim_vpg, generator=g).to(device)
    with torch.no_grad():
        embeds = vlm.embed(ids, mods, image_features=feats)  # the same prompt embeddings for the base LLM

    def run_pill():
        with autocast(device):
            return vlm.generate(ids, mask, mods, image_features=feats, max_new_tokens=new_tokens, eos_token_id=[])

    def run_base():
        with autocast(device):
            return base_generate(base, embeds, mask, new_tokens)

    def run_hf():
        with torch.no_grad(), autocast(device):
            return base.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    n_pill, n_base = run_pill().shape[1], run_base().shape[1]
    if log:
        log(f"  generation: prompt {T} tokens ({K} visual), {new_tokens} new tokens, batch 1")
    times = interleave({"pill": run_pill, "base": run_base, "hf_generate": run_hf}, warmup, reps, device)
    out = {"prompt_tokens": T, "visual_tokens": K, "new_tokens": new_tokens, "batch": 1, "warmup": warmup,
           "reps": reps, "generated": {"pill": n_pill, "base": n_base}}
    for n, t in times.items():
        out[n] = {**summary(t), "tokens_per_s": new_tokens / summary(t)["median_s"]}
    # tokens/s ratio = inverse time ratio
    r = ratio(times["base"], times["pill"])
    out["ratio_tokens_per_s_vs_base"] = r
    out["ratio_tokens_per_s_vs_hf_generate"] = ratio(times["hf_generate"], times["pill"])
    return out
