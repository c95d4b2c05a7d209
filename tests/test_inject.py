import pytest
import torch

from pill import ConfigError, PillConfig, plug, set_stage, unplug
from pill.errors import UnsupportedModelError
from pill.models import build_llm_from_config
from pill.plug import PillAttnInput, PillFFNInput, PillValueProj, parameter_groups, pill_parameters

FAMILIES = ["llama", "mistral", "qwen2"]


@pytest.mark.parametrize("kind", FAMILIES)
def test_text_only_logits_equal_base_model(kind):
    model = build_llm_from_config(kind)
    ids = torch.randint(0, 2000, (2, 16))
    with torch.no_grad():
        base = model(ids).logits
        plug(model, PillConfig())
        plugged = model(ids).logits
    assert (plugged - base).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", FAMILIES)
def test_unplug_restores_modules_and_flags(kind):
    model = build_llm_from_config(kind)
    model.lm_head.weight.requires_grad_(True)
    before = {n: (m, [p.requires_grad for p in m.parameters(recurse=False)]) for n, m in model.named_modules()}
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    plug(model)
    assert any(isinstance(m, PillValueProj) for m in model.modules())
    unplug(model)
    after = dict(model.named_modules())
    assert set(after) == set(before)
    for n, (m, flags) in before.items():
        assert after[n] is m
        assert [p.requires_grad for p in m.parameters(recurse=False)] == flags
    assert not hasattr(model, "pill_handle")
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])
    ids = torch.randint(0, 2000, (1, 8))
    model(ids, modality_ids=None)  # the pre-hook is gone: plain kwargs pass through


def test_plug_wraps_three_submodules_per_layer_and_reports_them():
    model = build_llm_from_config("llama", num_hidden_layers=3)
    plug(model, PillConfig(layers=[0, 2]))
    replaced = sorted(model.pill_handle.replaced)
    assert replaced == sorted(f"model.layers.{i}.{s}" for i in (0, 2)
                              for s in ("input_layernorm", "post_attention_layernorm", "self_attn.v_proj"))
    assert isinstance(model.model.layers[0].input_layernorm, PillAttnInput)
    assert isinstance(model.model.layers[2].post_attention_layernorm, PillFFNInput)
    assert not isinstance(model.model.layers[1].input_layernorm, PillAttnInput)
    # the base model is frozen; every trainable parameter is a plug-in
    for n, p in model.named_parameters():
        assert p.requires_grad == ("pill_" in n), n


def test_sdpa_stays_in_use(monkeypatch):
    model = build_llm_from_config("llama")
    plug(model)
    calls = []
    orig = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids = torch.randint(0, 2000, (1, 6))
    mods = torch.tensor([[0, 1, 1, 0, 0, 0]])
    model(ids, modality_ids=mods)
    assert model.config._attn_implementation == "pill_sdpa"  # SDPA through pill.attention
    assert len(calls) == model.config.num_hidden_layers


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*'gpt2'.*FAMILIES.*llama"):
        plug(model)


def test_plug_twice_and_bad_layers():
    model = build_llm_from_config("llama")
    with pytest.raises(ConfigError, match="pill.layers.*2 decoder layers"):
        plug(model, PillConfig(layers=[0, 5]))
    with pytest.raises(ConfigError, match="not plugged"):
        set_stage(model, "align")
    with pytest.raises(ConfigError, match="not plugged"):
        unplug(model)
    plug(model)
    with pytest.raises(ConfigError, match="already plugged"):
        plug(model)


@pytest.mark.parametrize("data, field", [
    ({"r": 0}, "pill.r"),
    ({"rank": 4}, "'rank'"),
    ({"gate": "layer"}, "pill.gate"),
    ({"adapter": "lora"}, "pill.adapter"),
    ({"mag": "yes"}, "pill.mag"),
    ({"layers": [1, 1]}, "pill.layers"),
    ({"num_modalities": 1}, "pill.num_modalities"),
])
def test_config_errors_name_the_field(data, field):
    with pytest.raises(ConfigError, match=field):
        PillConfig.from_dict(data)


def test_config_roundtrip():
    cfg = PillConfig.from_dict({"r": 8, "gate": "head", "layers": [0, 1], "init_std": 1})
    assert PillConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.init_std == 1.0


def _trainable_groups(model):
    return sorted(g for g, ps in parameter_groups(model).items() if all(p.requires_grad for _, p in ps))


def test_parameter_groups_cover_every_plugin_parameter_once():
    model = build_llm_from_config("llama")
    plug(model)
    groups = parameter_groups(model)
    assert sorted(groups) == ["attn_adapter", "expert:0", "expert:1", "gate"]
    named = [n for ps in groups.values() for n, _ in ps]
    assert sorted(named) == sorted(pill_parameters(model))
    assert "model.layers.1.post_attention_layernorm.pill_experts.experts.1.w_down.weight" in \
        [n for n, _ in groups["expert:1"]]
    assert all(".pill_gate." in n for n, _ in groups["gate"])
    assert all(".pill_adapter." in n for n, _ in groups["attn_adapter"])
    shared = build_llm_from_config("llama")
    plug(shared, PillConfig(momae=False))
    assert sorted(parameter_groups(shared)) == ["attn_adapter", "expert:shared", "gate"]


def test_stage_switching():
    model = build_llm_from_config("llama")
    plug(model)
    assert _trainable_groups(model) == ["attn_adapter", "expert:0", "expert:1", "gate"]
    set_stage(model, "align")
    assert _trainable_groups(model) == ["expert:1"]
    st = model.pill_handle.state
    assert st.gate_enabled is False and st.swap_last is True and st.align_modality == 1
    set_stage(model, "finetune")
    assert st.gate_enabled is True and st.swap_last is False
    with pytest.raises(ConfigError, match="stage"):
        set_stage(model, "pretrain")
    with pytest.raises(ConfigError, match="align_modality.*1..1"):
        set_stage(model, "align", align_modality=2)


def test_align_stage_without_momae_trains_the_shared_adapter():
    model = build_llm_from_config("llama")
    plug(model, PillConfig(momae=False))
    set_stage(model, "align")
    assert _trainable_groups(model) == ["expert:shared"]
    assert model.pill_handle.state.swap_last is False


def test_align_with_three_modalities_swaps_text_with_the_aligned_modality():
    model = build_llm_from_config("llama")
    plug(model, PillConfig(num_modalities=3))
    set_stage(model, "align", align_modality=2)
    assert _trainable_groups(model) == ["expert:1", "expert:2"]
    calls = {}
    last = model.model.layers[-1].post_attention_layernorm.pill_experts.experts
    for m, ex in enumerate(last):
        ex.register_forward_hook(lambda mod, inp, out, m=m: calls.setdefault(m, []).append(inp[0].shape[0]))
    mods = torch.tensor([[0, 0, 0, 0, 1, 2, 2]])  # 4 text, 1 image, 2 audio
    model(torch.randint(0, 2000, (1, 7)), modality_ids=mods)
    # text -> audio expert, image stays; audio -> the text expert, which is frozen and still zero in
    # this stage, so it adds nothing and is skipped (the audio rows pass through untouched)
    assert calls == {2: [4], 1: [1]}


def _randomise(model):
    for n, p in pill_parameters(model).items():
        torch.nn.init.normal_(p, std=0.2)


def test_align_swaps_last_layer_routing_and_skips_gates():
    model = build_llm_from_config("llama")
    plug(model)
    _randomise(model)
    set_stage(model, "align")
    calls = {}
    for i, layer in enumerate(model.model.layers):
        for m, ex in enumerate(layer.post_attention_layernorm.pill_experts.experts):
            ex.register_forward_hook(lambda mod, inp, out, key=(i, m): calls.setdefault(key, []).append(inp[0].shape[0]))
    ids = torch.randint(0, 2000, (1, 6))
    mods = torch.tensor([[0, 1, 1, 1, 0, 0]])
    model(ids, modality_ids=mods)
    assert calls[(0, 0)] == [3] and calls[(0, 1)] == [3]
    # last layer: the image expert sees the 3 text tokens, the text expert the 3 image tokens
    assert calls[(1, 1)] == [3] and calls[(1, 0)] == [3]
    # gates are off in align: visual values pass unchanged
    seen = []
    model.model.layers[0].self_attn.v_proj.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    model.model.layers[0].self_attn.v_proj.base.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    model(ids, modality_ids=mods)
    assert torch.equal(seen[0], seen[1])


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("variant", ["token", "head"])
def test_zero_gates_zero_visual_values_in_every_layer(kind, variant):
    model = build_llm_from_config(kind)
    plug(model, PillConfig(gate=variant))
    seen = []
    for layer in model.model.layers:
        layer.self_attn.v_proj.register_forward_hook(lambda m, i, o: seen.append(("gated", o.detach().clone())))
        layer.self_attn.v_proj.base.register_forward_hook(lambda m, i, o: seen.append(("raw", o.detach().clone())))
    ids = torch.randint(0, 2000, (2, 7))
    mods = torch.tensor([[0, 1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0]])
    model(ids, modality_ids=mods)
    visual = mods.bool()
    pairs = [(seen[k][1], seen[k + 1][1]) for k in range(0, len(seen), 2)]
    assert len(pairs) == model.config.num_hidden_layers
    for raw, gated in pairs:
        assert torch.equal(gated[visual], torch.zeros_like(gated[visual]))
        assert torch.equal(gated[~visual], raw[~visual])
        assert raw[visual].abs().sum() > 0


def test_modality_ids_shape_mismatch_is_clear():
    model = build_llm_from_config("llama")
    plug(model)
    with pytest.raises(ValueError, match="modality_ids has shape"):
        model(torch.randint(0, 100, (1, 5)), modality_ids=torch.zeros(1, 4, dtype=torch.long))


def test_bf16_base_model_keeps_float32_plugins():
    model = build_llm_from_config("llama").to(torch.bfloat16)
    plug(model)
    assert all(p.dtype == torch.float32 for p in pill_parameters(model).values())
    _randomise(model)
    out = model(torch.randint(0, 100, (1, 5)), modality_ids=torch.tensor([[0, 1, 1, 0, 0]])).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_pill_plug_is_the_module_and_the_function():
    import pill
    import pill.plug

    assert pill.plug.PREFIX == "pill_"
    model = build_llm_from_config("llama")
    assert pill.plug(model) is model and pill.plug.is_plugged(model)
    pill.unplug(model)


def test_no_layers_plugs_nothing_and_the_projector_alone_trains(tiny_run_config, tmp_path):
    """``pill.layers: []``: the LLM unchanged (LLaVA's stage 1, a baseline); only the projector trains."""
    import yaml

    from pill.runconfig import load_config
    from pill.train.loop import train

    model = build_llm_from_config("llama")
    ids = torch.randint(0, 2000, (2, 16))
    with torch.no_grad():
        base = model(ids).logits
        plug(model, PillConfig(layers=[]))
        assert torch.equal(model(ids).logits, base)
    assert not pill_parameters(model) and model.pill_handle.layers == []
    set_stage(model, "finetune")  # nothing to switch on

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_run_config(**{"pill.layers": [], "optim.max_steps": 2})))
    cfg = load_config(path)
    from pill.build import build_vlm

    vlm = build_vlm(cfg)
    before = {n: p.detach().clone() for n, p in vlm.named_parameters()}
    train(cfg, tmp_path / "run", vlm=vlm, progress=False)
    changed = {n for n, p in vlm.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("pill_projector.") for n in changed), changed
    assert {n for n, p in vlm.named_parameters() if p.requires_grad} == {n for n in before if n.startswith("pill_projector.")}


def _train_image_expert_a_little(model) -> None:
    """A partly trained image expert, as in the middle of stage 1."""
    with torch.no_grad():
        for n, p in pill_parameters(model).items():
            if ".experts.1." in n:
                p.normal_(std=0.2)


def _never_skip(monkeypatch) -> None:
    """Run every adapter, inert or not (the reference for the skip)."""
    import pill.modules.experts as experts_module
    import pill.plug as plug_module

    for m in (plug_module, experts_module):
        monkeypatch.setattr(m, "is_inert", lambda adapter: False)


def _adapter_calls(model) -> dict[str, int]:
    """Forward calls per plug-in kind (attention adapters, text experts, image experts), counted by hooks."""
    calls = {"attn": 0, "expert:0": 0, "expert:1": 0}

    def count(key):
        def hook(*_):
            calls[key] += 1
        return hook

    for m in model.modules():
        if isinstance(m, PillAttnInput):
            m.pill_adapter.register_forward_hook(count("attn"))
        elif isinstance(m, PillFFNInput):
            for i, e in enumerate(m.pill_experts.experts):
                e.register_forward_hook(count(f"expert:{i}"))
    return calls


def _loss_and_grads(model, ids, mods):
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # as a projector's output would
    loss = model(inputs_embeds=embeds, modality_ids=mods).logits.square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), embeds.grad, grads


def test_plugins_that_add_nothing_are_skipped_and_the_results_are_the_same(monkeypatch):
    """Align stage from scratch: the attention adapters and the text expert are frozen and still zero,
    so they add exactly nothing; the layers skip them, with the same loss and gradients as running them."""
    torch.manual_seed(0)
    model = build_llm_from_config("llama")
    plug(model)
    set_stage(model, "align")
    _train_image_expert_a_little(model)
    set_stage(model, "align")
    ids = torch.randint(0, 2000, (2, 10))
    mods = torch.zeros(2, 10, dtype=torch.long)
    mods[:, 2:5] = 1
    calls = _adapter_calls(model)
    skipped = _loss_and_grads(model, ids, mods)
    layers = model.config.num_hidden_layers
    # the image expert runs on the image rows, and in the last layer (swapped) on the text rows
    assert calls == {"attn": 0, "expert:0": 0, "expert:1": layers}
    _never_skip(monkeypatch)
    run = _loss_and_grads(model, ids, mods)
    assert calls["attn"] == layers and calls["expert:0"] == layers  # now they ran (adding zeros)
    assert torch.equal(skipped[0], run[0]) and torch.allclose(skipped[1], run[1], rtol=0, atol=1e-7)
    assert set(skipped[2]) == set(run[2]) and all(n.count(".experts.1.") for n in skipped[2])
    for n, g in skipped[2].items():
        assert torch.allclose(g, run[2][n], rtol=0, atol=1e-7), n


def test_an_adapter_is_skipped_only_while_it_holds_its_zeros_and_nothing_trains_it():
    from pill.modules import is_inert

    torch.manual_seed(0)
    model = build_llm_from_config("llama")
    plug(model)
    adapter = model.model.layers[0].input_layernorm.pill_adapter
    ids = torch.randint(0, 2000, (1, 6))
    assert not is_inert(adapter)  # finetune: it trains, and its zero output projection gets a gradient
    with torch.no_grad():
        assert is_inert(adapter)  # no gradient asked: an untrained model's adapters add nothing
    set_stage(model, "align")
    assert is_inert(adapter)
    model.load_state_dict({k: v + 1 for k, v in model.state_dict().items() if k.endswith("layers.0.input_layernorm.pill_adapter.w_up.weight")},
                          strict=False)  # a load writes in place: the version counter moves
    assert not is_inert(adapter)
    set_stage(model, "align")  # set_stage reads the values again: not zero
    assert not is_inert(adapter)
    with torch.no_grad():
        adapter.w_up.weight.zero_()
    assert not is_inert(adapter)  # written since the stamp: not trusted until values are read again
    set_stage(model, "align")
    assert is_inert(adapter)
    adapter.w_up.weight.data.fill_(0.5)  # a write through .data, which no version counter sees ...
    set_stage(model, "align")  # ... is caught when the stage is set
    assert not is_inert(adapter)
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("autocast", [False, True])
def test_skipping_in_a_bf16_model_gives_the_same_logits(monkeypatch, autocast):
    """The skip's partial path (only the aligned modality's rows through their expert) with float32
    plug-ins on a bf16 base model, and under bf16 autocast: the same logits as running every expert."""
    import contextlib

    torch.manual_seed(0)
    model = build_llm_from_config("llama")
    if not autocast:
        model = model.to(torch.bfloat16)
    plug(model)
    _train_image_expert_a_little(model)
    set_stage(model, "align")
    ids, mods = torch.randint(0, 100, (2, 6)), torch.tensor([[0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def logits():
        with ctx:
            return model(ids, modality_ids=mods).logits

    calls = _adapter_calls(model)
    skipped = logits()
    assert calls["attn"] == calls["expert:0"] == 0 and calls["expert:1"] > 0
    _never_skip(monkeypatch)
    assert torch.equal(skipped, logits())
