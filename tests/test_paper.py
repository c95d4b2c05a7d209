"""The paper configs reproduce the reference code's runs (DsaltYfish/PILL), number for number.

Expected values are those the reference scripts compute: ``lr = blr * batch_size * accum_iter / 256``
(train_sqa.py, pretrain_cc595k.py, train_instruct.py), AdamW betas (0.9, 0.95), weight decay 0.02 on
every trained matrix, no gradient clipping, warm-up in epochs."""
from pathlib import Path

import pytest
import torch

from pill.errors import ConfigError
from pill.runconfig import OptimConfig, load_config

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"

# config -> (stage, lr, global batch, micro batch, epochs, warm-up epochs, max length)
EXPECTED = {
    "stage1_cc595k.yaml": ("align", 1e-3, 256, 32, 3, 0.03, 128),
    "stage2_scienceqa.yaml": ("finetune", 2.5e-4, 32, 4, 20, 1, 512),
    "stage2_llava665k.yaml": ("finetune", 1.25e-4, 32, 2, 5, 0.1, 1024),
}


def test_every_paper_config_is_covered():
    assert sorted(p.name for p in PAPER.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_paper_config_has_the_reference_numbers(name):
    stage, lr, batch, micro, epochs, warmup_epochs, max_length = EXPECTED[name]
    cfg = load_config(PAPER / name)
    o = cfg.optim
    assert cfg.stage == stage
    assert o.effective_lr == pytest.approx(lr, rel=1e-12)
    assert (o.batch_size, o.micro_batch_size, o.epochs) == (batch, micro, epochs)
    assert o.batch_size // o.micro_batch_size == {256: 8, 32: 8 if micro == 4 else 16}[batch]  # accum_iter
    assert o.warmup_ratio * o.epochs == pytest.approx(warmup_epochs)
    assert o.betas == [0.9, 0.95] and o.weight_decay == 0.02 and o.gate_weight_decay == 0.02
    assert o.grad_clip is None and o.min_lr_ratio == 0.0
    assert cfg.data.max_length == max_length
    assert cfg.model.vpg == "blip2-qformer" and cfg.model.vpg_path == "Salesforce/blip2-flan-t5-xxl"
    assert cfg.model.image_mean == [0.485, 0.456, 0.406] and cfg.model.image_std == [0.229, 0.224, 0.225]
    assert cfg.model.llm == "meta-llama/Llama-2-7b-chat-hf" and cfg.model.dtype == "bfloat16"
    assert cfg.train.mixed_precision == "bf16"
    assert (cfg.pill.adapter, cfg.pill.r, cfg.pill.gate, cfg.pill.swiglu_gate_init) == \
        ("swiglu", 32, "token", "torch_default")
    assert cfg.data.prompt_style == "reference"
    if stage == "finetune":
        assert cfg.init_from == "runs/paper/stage1-cc595k"
    if cfg.data.format == "scienceqa":
        assert cfg.data.prompt_format == "QCM-ALE" and not cfg.data.use_caption and cfg.data.wrong_answer_p == 0.0


def test_base_lr_scales_with_the_global_batch():
    o = OptimConfig(base_lr=2e-3, lr_scaling="linear_256", batch_size=64)
    assert o.effective_lr == pytest.approx(5e-4)
    assert OptimConfig(lr=3e-4).effective_lr == 3e-4
    assert OptimConfig().effective_lr == 2e-3


@pytest.mark.parametrize("fields, words", [
    ({"lr": 1e-3, "base_lr": 2e-3, "lr_scaling": "linear_256"}, ("lr", "base_lr")),
    ({"base_lr": 2e-3}, ("lr_scaling",)),
    ({"lr": 1e-3, "lr_scaling": "linear_256"}, ("lr_scaling",)),
    ({"grad_clip": -1.0}, ("grad_clip",)),
    ({"betas": [0.9, 1.5]}, ("betas",)),
])
def test_bad_learning_rate_settings_name_the_fields(fields, words):
    with pytest.raises(ConfigError) as e:
        OptimConfig(**fields)
    assert all(w in str(e.value) for w in words)


def test_lr_and_base_lr_together_is_an_error_on_load(tmp_path):
    text = (PAPER / "stage2_scienceqa.yaml").read_text()
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path, ["optim.lr=1e-3"])
    assert "lr and base_lr" in str(e.value)
    cfg = load_config(path, ["optim.base_lr=null", "optim.lr_scaling=null", "optim.lr=1e-3"])
    assert cfg.optim.effective_lr == 1e-3


def test_swiglu_gate_init_switch():
    from pill.modules import SwiGLUAdapter

    torch.manual_seed(0)
    normal = SwiGLUAdapter(512, 32)
    default = SwiGLUAdapter(512, 32, gate_init="torch_default")
    bound = 1 / 512 ** 0.5  # nn.Linear's kaiming_uniform(a=sqrt(5)) bound
    assert normal.w_gate.weight.std().item() == pytest.approx(0.02, rel=0.05)
    w = default.w_gate.weight
    assert w.abs().max().item() <= bound and w.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05)
    for a in (normal, default):  # both start as the zero map (up-projection zero)
        assert torch.equal(a(torch.randn(3, 512)), torch.zeros(3, 512))


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from pill.data.synth import make_synth

    root = tmp_path_factory.mktemp("synth")
    make_synth(root, n_train=8, n_test=4, seed=0, progress=False)
    return root


def test_the_optimizer_gets_the_effective_rate_betas_and_gate_decay(synth_root, tmp_path):
    from pill.runconfig import TrainConfig
    from pill.train.loop import setup

    cfg = TrainConfig.from_dict({
        "stage": "finetune",
        "model": {"llm": "llama", "random_init": True, "pool": 2},
        "data": {"format": "scienceqa", "root": str(synth_root), "split": "train", "max_length": 160},
        "optim": {"base_lr": 2e-3, "lr_scaling": "linear_256", "batch_size": 8, "micro_batch_size": 4,
                  "betas": [0.9, 0.95], "weight_decay": 0.02, "gate_weight_decay": 0.02, "grad_clip": None,
                  "warmup_ratio": 0.0},
        "train": {"feature_cache": False},
    })
    s = setup(cfg, tmp_path / "run", progress=False)
    groups = s.optimizer.param_groups
    assert all(g["initial_lr"] == pytest.approx(2e-3 * 8 / 256) for g in groups)
    assert all(g["betas"] == (0.9, 0.95) for g in groups)
    gate_ids = {id(p) for m in s.vlm.modules() if type(m).__name__ == "ModalityAttentionGate" for p in m.parameters()}
    gate_group = next(g for g in groups if {id(p) for p in g["params"]} == gate_ids)
    assert gate_group["weight_decay"] == 0.02


def test_image_normalisation_override_changes_pixels_and_fingerprint():
    from PIL import Image

    from pill.build import load_encoder_from_config
    from pill.errors import ConfigError as CE
    from pill.runconfig import EncoderConfig, ModelConfig

    plain = load_encoder_from_config(EncoderConfig("efficientnet-lite0", pool=2), pretrained=False)
    custom = load_encoder_from_config(EncoderConfig("efficientnet-lite0", pool=2, image_mean=[0.5, 0.5, 0.5],
                                                    image_std=[0.25, 0.25, 0.25]), pretrained=False)
    img = Image.new("RGB", (32, 32), (255, 0, 128))
    x = custom.preprocess([img])
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([2.0, -2.0, (128 / 255 - 0.5) / 0.25]), atol=1e-5)
    assert plain.fingerprint() != custom.fingerprint()
    assert ModelConfig(image_mean=[0.5] * 3, image_std=[0.2] * 3).encoder_configs()["image"].image_std == [0.2] * 3
    with pytest.raises(CE, match="image_mean and image_std"):
        ModelConfig(image_mean=[0.5] * 3)


def test_blip2_from_a_hub_id_downloads_only_the_shards_it_reads(tmp_path, monkeypatch):
    """blip2-flan-t5-xxl's language model is most of its size: only the shards with the vision
    tower, the Q-Former and the queries are fetched (a fake hub serves a sharded checkpoint)."""
    import fnmatch
    import json
    import shutil

    import huggingface_hub
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from pill.encoders import load_encoder

    cfg = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            encoder_hidden_size=32),
        text_config=dict(model_type="opt", hidden_size=64, ffn_dim=256, num_hidden_layers=4,
                         num_attention_heads=2, vocab_size=2000, word_embed_proj_dim=64),
        num_query_tokens=5)
    torch.manual_seed(0)
    remote = tmp_path / "remote"
    Blip2ForConditionalGeneration(cfg).save_pretrained(remote, max_shard_size="200KB")
    index = json.loads((remote / "model.safetensors.index.json").read_text())["weight_map"]
    wanted = {f for n, f in index.items() if n.startswith(("vision_model.", "qformer.", "query_tokens"))}
    assert set(index.values()) - wanted, "the test checkpoint needs shards of the language model alone"
    fetched = []

    def fake_download(repo_id, allow_patterns=None, **kw):
        local = tmp_path / "snapshot"
        local.mkdir(exist_ok=True)
        for f in remote.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, local / f.name)
                fetched.append(f.name)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    vpg = load_encoder("blip2-qformer", "someone/blip2-tiny")
    shards = {f for f in fetched if f.endswith(".safetensors")}
    assert shards == wanted
    local = load_encoder("blip2-qformer", str(remote))
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(vpg(x), local(x))


def test_a_reference_style_run_trains_and_evaluates_the_reference_way(synth_root, tmp_path):
    """One step of the paper recipe's shape (base_lr, no clipping, reference prompts) on a tiny model,
    then the reference protocol with real sampling on the saved run."""
    from pill.build import load_run
    from pill.eval.evaluate import evaluate_scienceqa
    from pill.runconfig import TrainConfig
    from pill.train.loop import train

    cfg = TrainConfig.from_dict({
        "stage": "finetune",
        "model": {"llm": "llama", "random_init": True, "pool": 2},
        "pill": {"swiglu_gate_init": "torch_default"},
        "data": {"format": "scienceqa", "root": str(synth_root), "split": "train", "prompt_format": "QCM-ALE",
                 "prompt_style": "reference", "max_length": 256},
        "optim": {"base_lr": 2e-3, "lr_scaling": "linear_256", "batch_size": 4, "micro_batch_size": 2,
                  "betas": [0.9, 0.95], "weight_decay": 0.02, "gate_weight_decay": 0.02, "grad_clip": None,
                  "max_steps": 1},
        "train": {"feature_cache": False, "mixed_precision": "no"},
    })
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["steps"] == 1 and torch.isfinite(torch.tensor(summary["final_loss"]))
    vlm = load_run(tmp_path / "run")
    assert vlm.prompt_style == "reference"
    result = evaluate_scienceqa(vlm, synth_root, "test", prompt_format="QCM-ALE", protocol="reference", limit=2,
                                max_new_tokens=4, batch_size=2, seed=1, progress=False)
    again = evaluate_scienceqa(vlm, synth_root, "test", prompt_format="QCM-ALE", protocol="reference", limit=2,
                               max_new_tokens=4, batch_size=2, seed=1, progress=False)
    assert result["count"] == 2 and result["prompt_style"] == "reference"
    assert result["predictions"] == again["predictions"] and result["Avg"] == again["Avg"]  # seeded
