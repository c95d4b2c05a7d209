"""Every LLM family of pill.families.FAMILIES, through one list of cases and shared checks.

Each case is a tiny random model (2 layers, width 64, GQA 4/2 heads) built from the family's
transformers config class. Adding a family: a row in pill.families.FAMILIES and a case here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import transformers
from pill import PillConfig, plug, set_stage, unplug
from pill.errors import UnsupportedModelError
from pill.families import FAMILIES, family_of, supported_types
from pill.plug import PillValueProj, parameter_groups, pill_parameters

VOCAB = 512
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}
_GEMMA = dict(head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
              attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16)


@dataclass(frozen=True)
class Case:
    id: str
    config_class: str
    model_type: str
    extra: dict = field(default_factory=dict)


CASES = [
    Case("llama", "LlamaConfig", "llama"),
    Case("llama3-rope", "LlamaConfig", "llama", {"rope_scaling": _LLAMA3_ROPE}),
    Case("mistral", "MistralConfig", "mistral", {"sliding_window": 4}),
    Case("qwen2", "Qwen2Config", "qwen2"),
    Case("qwen3", "Qwen3Config", "qwen3", {"head_dim": 16}),
    Case("gemma2", "Gemma2Config", "gemma2", _GEMMA),
    Case("gemma3_text", "Gemma3TextConfig", "gemma3_text", _GEMMA),
    Case("phi3", "Phi3Config", "phi3"),
    Case("smollm3", "SmolLM3Config", "smollm3"),
    Case("olmo2", "Olmo2Config", "olmo2"),  # post-norm: plug-ins in front of self_attn and mlp
]
IDS = [c.id for c in CASES]


def build(case: Case, seed: int = 0):
    cfg = getattr(transformers, case.config_class)(**{**_SMALL, **case.extra})
    torch.manual_seed(seed)  # attention: SDPA where the family supports it (Gemma 2's soft-capping: eager)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    assert model.config.model_type == case.model_type
    return model


def _ids(batch=2, length=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


MODS = torch.tensor([[0, 1, 1, 1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0, 0]])


def _randomise(model, groups=("attn_adapter", "expert:*")):
    from fnmatch import fnmatchcase

    torch.manual_seed(2)
    with torch.no_grad():
        for g, ps in parameter_groups(model).items():
            if any(fnmatchcase(g, pat) for pat in groups):
                for _, p in ps:
                    p.normal_(std=0.2)


def test_every_supported_family_has_a_case():
    assert {c.model_type for c in CASES} == set(supported_types())


def test_unknown_and_refused_families_are_named(monkeypatch):
    import pill.families

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*pill\.families\.FAMILIES.*gemma2.*llama"):
        plug(gpt2)
    monkeypatch.setitem(pill.families.FAMILIES, "llama", pill.families.Family(refused="no reason, a test"))
    llama = build(CASES[0])
    with pytest.raises(UnsupportedModelError, match=r"'llama'.*no reason, a test.*supported model types: gemma2"):
        plug(llama)
    assert not hasattr(llama, "pill_handle") and all(p.requires_grad for p in llama.parameters())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_zero_init_plugged_text_logits_equal_base(case):
    model = build(case)
    ids = _ids()
    with torch.no_grad():
        base = model(ids).logits
        plug(model, PillConfig())
        plugged = model(ids).logits
        text_mods = model(ids, modality_ids=torch.zeros_like(ids)).logits
    assert (plugged - base).abs().max().item() <= 1e-5
    assert (text_mods - base).abs().max().item() <= 1e-5
    row = family_of(model)
    handle = model.pill_handle
    assert sorted(handle.replaced) == sorted(
        f"model.layers.{i}.{s}" for i in range(2) for s in (row.attn_norm, row.value, row.ffn_norm) if s)
    assert sorted(handle.added) == sorted(f"model.layers.{i}.{s}" for i in range(2) for s, norm in
                                          (("pill_attn_input", row.attn_norm), ("pill_ffn_input", row.ffn_norm))
                                          if norm is None)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_zero_gates_equal_zeroed_visual_values(case):
    """With the gates at zero, each layer's attention output is that of the model whose
    visual tokens' values are zeroed (their keys still take part in the softmax)."""
    model = build(case)
    plug(model)
    _randomise(model)  # adapters and experts random, gates still zero
    state = model.pill_handle.state
    row = family_of(model)
    ids = _ids()

    def attention_outputs(zero_visual_values: bool, gate: bool):
        outs, hooks = [], []
        for layer in model.model.layers:
            hooks.append(layer.self_attn.register_forward_hook(lambda m, i, o: outs.append(o[0].detach().clone())))
            if zero_visual_values:
                wrapper = layer.get_submodule(row.value)
                value = wrapper.base
                width = wrapper.value_width or value.out_features  # the v slice of a fused [q | k | v]

                def zero(m, i, o, width=width):
                    o = o.clone()
                    o[..., -width:][MODS.bool()] = 0
                    return o

                hooks.append(value.register_forward_hook(zero))
        state.gate_enabled = gate
        try:
            with torch.no_grad():
                model(ids, modality_ids=MODS)
        finally:
            state.gate_enabled = True
            for h in hooks:
                h.remove()
        return outs

    gated = attention_outputs(zero_visual_values=False, gate=True)
    zeroed = attention_outputs(zero_visual_values=True, gate=False)
    ungated = attention_outputs(zero_visual_values=False, gate=False)
    assert len(gated) == len(zeroed) == model.config.num_hidden_layers
    for g, z, u in zip(gated, zeroed, ungated):
        assert torch.allclose(g, z, atol=1e-6)
        assert not torch.allclose(g, u, atol=1e-4)  # the visual values did matter


def test_fused_qkv_gates_the_value_slice_in_place():
    model = build(next(c for c in CASES if c.model_type == "phi3"))
    plug(model)
    with torch.no_grad():
        for _, p in parameter_groups(model)["gate"]:
            p.normal_(std=1.0)
    wrapper = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(wrapper, PillValueProj) and wrapper.value_width == 2 * 16
    seen = {}
    wrapper.base.register_forward_hook(lambda m, i, o: seen.update(raw=o.clone(), ptr=o.data_ptr()))
    wrapper.register_forward_hook(lambda m, i, o: seen.update(out=o.clone(), out_ptr=o.data_ptr()))
    with torch.no_grad():
        model(_ids(), modality_ids=MODS)
    raw, out, w = seen["raw"], seen["out"], wrapper.value_width
    assert seen["ptr"] == seen["out_ptr"]  # no copy of the fused output
    assert torch.equal(out[..., :-w], raw[..., :-w])  # q and k untouched
    assert torch.equal(out[..., -w:][~MODS.bool()], raw[..., -w:][~MODS.bool()])  # text values untouched
    assert not torch.allclose(out[..., -w:][MODS.bool()], raw[..., -w:][MODS.bool()])
    assert "model.layers.0.self_attn.qkv_proj.pill_gate.w_gate.weight" in pill_parameters(model)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_one_training_step_trains_every_group(case):
    model = build(case)
    plug(model)
    model.train()
    ids = _ids()
    groups = parameter_groups(model)
    assert sorted(groups) == ["attn_adapter", "expert:0", "expert:1", "gate"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for ps in groups.values() for _, p in ps}
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    before = {n: p.detach().clone() for ps in groups.values() for n, p in ps}
    loss = model(ids, modality_ids=MODS, labels=ids).loss
    loss.backward()
    for g, ps in groups.items():
        grads = [p.grad for _, p in ps]
        assert all(x is not None and torch.isfinite(x).all() for x in grads), g
        assert any(x.abs().sum() > 0 for x in grads), g
    opt.step()
    for g, ps in groups.items():
        assert any(not torch.equal(p, before[n]) for n, p in ps), g
    with torch.no_grad():
        after = model(ids, modality_ids=MODS, labels=ids).loss
    assert after < loss


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kv_cache_generation_equals_recompute(case, tiny_vpg):
    from pill.vlm import PillVLM

    vlm = PillVLM(build(case), tiny_vpg)
    _randomise(vlm.llm, ("*",))
    K = tiny_vpg.num_tokens
    ids = _ids(2, 10)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    ids[1, :2] = 0
    mods = torch.zeros_like(ids)
    mods[0, 2:2 + K] = 1
    mods[1, 4:4 + K] = 1
    feats = torch.randn(2, K, tiny_vpg.dim, generator=torch.Generator().manual_seed(3))
    kw = dict(attention_mask=mask, modality_ids=mods, image_features=feats, max_new_tokens=6, eos_token_id=-1)
    cached = vlm.generate(ids, use_cache=True, **kw)
    recomputed = vlm.generate(ids, use_cache=False, **kw)
    assert cached.shape == (2, 6)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_unplug_restores_the_model(case):
    model = build(case)
    model.lm_head.weight.requires_grad_(False)
    ids = _ids()
    with torch.no_grad():
        base = model(ids).logits
    before = {n: (m, [p.requires_grad for p in m.parameters(recurse=False)]) for n, m in model.named_modules()}
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    plug(model)
    _randomise(model, ("*",))
    set_stage(model, "align")
    with torch.no_grad():
        model(ids, modality_ids=MODS)
    unplug(model)
    after = dict(model.named_modules())
    assert set(after) == set(before)
    for n, (m, flags) in before.items():
        assert after[n] is m
        assert [p.requires_grad for p in m.parameters(recurse=False)] == flags
    assert not hasattr(model, "pill_handle")
    assert set(model.state_dict()) == set(sd)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
