"""``pill convert reference``: a checkpoint written by the reference PILL code becomes a pill run.

The synthetic checkpoint has the reference's names and shapes (``model/llm_model.py``: per layer
``adapter_attn`` / ``txt_adapter_ffn`` / ``vis_adapter_ffn`` GLUAdapters of ``down_sampler_gate``,
``down_sampler`` (r, d) and ``up_sampler`` (d, r), ``attention.vis_adapter_gate`` (n_heads, d); and
``vis_adapter_proj`` (d, d_vpg)), saved the way its ``utils/misc.py: save_model`` saves them. The
converted run's decoder layer is checked against the layer written out from the maths of the
design note (section 2) with the reference tensors."""
from __future__ import annotations

import argparse
import functools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pill.errors import CheckpointError, ConfigError

D, LAYERS, HEADS, R, D_VPG = 64, 2, 4, 32, 1280  # tiny LLaMA (MHA, as LLaMA-2-7B), EfficientNet pooled features


class Evil:  # any object other than tensors and the run's Namespace must be refused
    pass


@pytest.fixture
def mha(monkeypatch):
    """Random-init test LLMs with one KV head per query head, as LLaMA-2-7B."""
    from pill import models

    monkeypatch.setattr(models, "build_llm_from_config",
                        functools.partial(models.build_llm_from_config, num_key_value_heads=HEADS))


def reference_state(seed: int = 0, r: int = R, layers: int = LAYERS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(layers):
        for slot in ("adapter_attn", "txt_adapter_ffn", "vis_adapter_ffn"):
            state[f"layers.{i}.{slot}.down_sampler_gate.weight"] = torch.randn(r, D, generator=g) * 0.2
            state[f"layers.{i}.{slot}.down_sampler.weight"] = torch.randn(r, D, generator=g) * 0.2
            state[f"layers.{i}.{slot}.up_sampler.weight"] = torch.randn(D, r, generator=g) * 0.2
        state[f"layers.{i}.attention.vis_adapter_gate.weight"] = torch.randn(HEADS, D, generator=g) * 0.3
    state["vis_adapter_proj.weight"] = torch.randn(D, D_VPG, generator=g) * 0.02
    return state


def save_reference(path: Path, state: dict, ddp: bool = True, extra=None) -> Path:
    """As the reference's save_model: trainable tensors under 'model' (DDP adds 'module.'), plus
    optimizer, epoch, scaler and the argparse Namespace of the run."""
    model = {("module." + k if ddp else k): v.to(torch.bfloat16) for k, v in state.items()}
    torch.save({"model": model, "optimizer": {"state": {}, "param_groups": [{"lr": 2.5e-4, "params": [0]}]},
                "epoch": 19, "scaler": {"scale": 65536.0}, "args": argparse.Namespace(blr=2e-3, batch_size=4),
                **(extra or {})}, path)
    return path


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "model.yaml"
    path.write_text("model: {llm: llama, random_init: true, pool: 2}\n"
                    "pill: {adapter: swiglu, r: 32, gate: token, swiglu_gate_init: torch_default}\n"
                    "data: {format: scienceqa, root: ., prompt_style: reference}\n")
    return path


def _run_cli(*args) -> int:
    from pill.cli import main

    return main([str(a) for a in args])


# -- the reference layer, from the maths -------------------------------------------------------

def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _swiglu(z, ref, prefix):  # A(z) = W_up(silu(W_g z) * (W_d z))
    wg, wd, wu = (ref[f"{prefix}.{n}.weight"].float() for n in ("down_sampler_gate", "down_sampler", "up_sampler"))
    return (F.silu(z @ wg.T) * (z @ wd.T)) @ wu.T


def _rope(x, theta):  # x (B, H, T, hd), rotate-half layout of the HF LLaMA weights
    hd, T = x.shape[-1], x.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_layer(x, image, layer, ref, i, cfg):
    """out = h + FFN(n2 + Expert[m](n2)), h = x + Attn(a, values of image tokens * tanh(W_gate a)),
    a = n1 + A_attn(n1) -- section 2 of the design note, with the reference's tensors."""
    eps, theta = cfg.rms_norm_eps, cfg.rope_parameters["rope_theta"]
    B, T, _ = x.shape
    hd = D // HEADS
    n1 = _rms(x, layer.input_layernorm.base.weight, eps)
    a = n1 + _swiglu(n1, ref, f"layers.{i}.adapter_attn")
    att = layer.self_attn
    q = (a @ att.q_proj.weight.T).view(B, T, HEADS, hd).transpose(1, 2)
    k = (a @ att.k_proj.weight.T).view(B, T, HEADS, hd).transpose(1, 2)
    v = (a @ att.v_proj.base.weight.T).view(B, T, HEADS, hd)
    gate = torch.tanh(a @ ref[f"layers.{i}.attention.vis_adapter_gate.weight"].float().T)  # (B, T, H)
    v = torch.where(image[..., None, None], v * gate[..., None], v).transpose(1, 2)
    q, k = _rope(q, theta), _rope(k, theta)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
    h = x + o @ att.o_proj.weight.T
    n2 = _rms(h, layer.post_attention_layernorm.base.weight, eps)
    expert = torch.where(image[..., None], _swiglu(n2, ref, f"layers.{i}.vis_adapter_ffn"),
                         _swiglu(n2, ref, f"layers.{i}.txt_adapter_ffn"))
    e = n2 + expert
    mlp = layer.mlp
    return h + (F.silu(e @ mlp.gate_proj.weight.T) * (e @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T


def test_converted_run_loads_and_computes_the_reference_layer(tmp_path, config, mha, capsys):
    from pill.build import load_run
    from pill.checkpoint import read_metadata

    state = reference_state()
    ckpt = save_reference(tmp_path / "checkpoint-19.pth", state)
    run = tmp_path / "run"
    assert _run_cli("convert", "reference", ckpt, "--out", run, "--config", config) == 0
    assert f"wrote {run}: {LAYERS * 10 + 1} plug-in tensors, stage finetune, epoch 19" in capsys.readouterr().out
    meta = read_metadata(run / "pill.safetensors")
    assert meta["stage"] == "finetune" and meta["epoch"] == 19 and meta["converted_from"] == str(ckpt)
    assert "llm_fingerprint" in meta and "vpg_fingerprint" in meta

    vlm = load_run(run)  # the fingerprints match the model the config builds
    assert vlm.prompt_style == "reference" and vlm.chat_template == "reference"
    ref = {k: v.to(torch.bfloat16) for k, v in state.items()}  # what the file holds
    assert torch.equal(vlm.pill_projector["image"].weight, ref["vis_adapter_proj.weight"].float())
    torch.manual_seed(1)
    x = torch.randn(2, 7, D)
    image = torch.zeros(2, 7, dtype=torch.bool)
    image[0, 1:4] = True
    image[1, 2:5] = True
    decoder = vlm.llm.model
    with torch.no_grad():
        hidden = decoder(inputs_embeds=x, modality_ids=image.long(), output_hidden_states=True).hidden_states
        for i in range(LAYERS):
            expected = reference_layer(hidden[i], image, decoder.layers[i], ref, i, vlm.llm.config)
            if i == LAYERS - 1:  # the last hidden state comes after the final norm
                expected = _rms(expected, decoder.norm.weight, vlm.llm.config.rms_norm_eps)
            assert torch.allclose(hidden[i + 1], expected, atol=1e-5), (i, (hidden[i + 1] - expected).abs().max())


def test_align_checkpoint_and_no_ddp_prefix(tmp_path, config, mha):
    from pill.build import load_run

    ckpt = save_reference(tmp_path / "pretrained-3.pth", reference_state(seed=2), ddp=False)
    assert _run_cli("convert", "reference", ckpt, "--out", tmp_path / "run", "--config", config,
                    "--stage", "align") == 0
    vlm = load_run(tmp_path / "run")
    assert vlm.stage == "align"
    with pytest.raises(CheckpointError, match="already holds a run"):
        from pill.convert import convert_reference, load_convert_config

        convert_reference(ckpt, tmp_path / "run", load_convert_config(config))


@pytest.mark.parametrize("change, words", [
    (lambda s: s.update({"layers.0.adapter_extra.weight": torch.zeros(2, 2)}), "'layers.0.adapter_extra.weight'"),
    (lambda s: s.update({"layers.5.adapter_attn.up_sampler.weight": torch.zeros(D, R)}),
     "'layers.5.adapter_attn.up_sampler.weight': layer 5, but the model has 2 layers"),
    (lambda s: s.update({"tok_embeddings.weight": torch.zeros(3, D)}), "'tok_embeddings.weight'"),
    (lambda s: s.pop("layers.1.attention.vis_adapter_gate.weight"),
     "'layers.1.attention.vis_adapter_gate.weight' is missing"),
    (lambda s: s.update({"layers.0.vis_adapter_ffn.down_sampler.weight": torch.zeros(8, D)}),
     "'layers.0.vis_adapter_ffn.down_sampler.weight' has shape (8, 64)"),
    (lambda s: s.update({"vis_adapter_proj.weight": torch.zeros(D, 768)}), "'vis_adapter_proj.weight' has shape"),
])
def test_anything_that_does_not_match_is_refused_by_name(tmp_path, config, mha, change, words, capsys):
    state = reference_state()
    change(state)
    ckpt = save_reference(tmp_path / "c.pth", state)
    assert _run_cli("convert", "reference", ckpt, "--out", tmp_path / "run", "--config", config) == 1
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run" / "pill.safetensors").exists()


def test_pickled_objects_are_refused_without_running_them(tmp_path, config, mha, capsys):
    ckpt = save_reference(tmp_path / "c.pth", reference_state(), extra={"hook": Evil()})
    assert _run_cli("convert", "reference", ckpt, "--out", tmp_path / "run", "--config", config) == 1
    err = capsys.readouterr().err
    assert "holds objects other than tensors, refused" in err and len(err.strip().splitlines()) == 1
    assert _run_cli("convert", "reference", tmp_path / "nothing.pth", "--out", tmp_path / "r", "--config",
                    config) == 1
    assert "checkpoint file not found" in capsys.readouterr().err


def test_a_config_with_other_plug_ins_is_refused(tmp_path, config):
    from pill.convert import convert_reference, load_convert_config

    ckpt = save_reference(tmp_path / "c.pth", reference_state())
    for override, field in (("pill.gate=head", "pill.gate"), ("pill.momae=false", "pill.momae"),
                            ("pill.adapter=classic", "pill.adapter")):
        with pytest.raises(ConfigError, match=field):
            convert_reference(ckpt, tmp_path / "run", load_convert_config(config, [override]))


def test_default_config_is_the_paper_scienceqa_one():
    from pill.convert import default_config_path, load_convert_config

    cfg = load_convert_config()
    assert default_config_path().name == "stage2_scienceqa.yaml"
    assert cfg.model.vpg_path == "Salesforce/blip2-flan-t5-xxl" and cfg.pill.r == 32
