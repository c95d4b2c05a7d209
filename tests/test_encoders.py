"""The encoder registry and the frozen encoder families (tiny random checkpoints, no download)."""
import json

import pytest
import torch
import torch.nn as nn
from PIL import Image

from pill.encoders import (EncoderEntry, ImageEncoder, encoder_names, get_encoder, load_encoder, meta_encoder,
                           register_encoder, unregister_encoder, validate_encoder_settings)
from pill.errors import ConfigError, PillError

BUILTIN = ["efficientnet-lite0", "blip2-qformer", "clip", "dinov2"]


def _img(color=(200, 30, 30)):
    return Image.new("RGB", (40, 30), color)


def _model_config(**fields):
    from pill.config import from_dict
    from pill.runconfig import ModelConfig

    return from_dict(ModelConfig, fields, "model")


# -- the registry ----------------------------------------------------------------------------

def test_registry_lists_each_encoder():
    from pill.encoders import ENCODERS
    from pill.encoders.dinov2 import Dinov2VPG

    assert encoder_names()[:4] == BUILTIN and encoder_names("image")[:4] == BUILTIN
    assert encoder_names("audio")[:2] == ["whisper-base", "whisper"]
    assert [e.name for e in ENCODERS] == BUILTIN + ["whisper-base", "whisper"]
    entry = get_encoder("dinov2")
    assert (entry.modality, entry.cls, entry.needs_path, entry.build) == ("image", Dinov2VPG, True, Dinov2VPG.build)
    eff, blip2 = get_encoder("efficientnet-lite0"), get_encoder("blip2-qformer")
    assert (eff.needs_path, eff.accepts_layer, eff.accepts_pool) == (False, True, True)
    assert (blip2.needs_path, blip2.accepts_layer, blip2.accepts_pool) == (True, False, False)
    assert (entry.accepts_layer, entry.accepts_pool) == (True, False)
    assert "Salesforce/blip2-opt-2.7b" in get_encoder("blip2-qformer").path_hint


def test_unknown_encoder_lists_the_registered_names():
    with pytest.raises(ConfigError, match="unknown encoder 'resnet'; choose one of: efficientnet-lite0, blip2-qformer, "
                                          "clip, dinov2"):
        get_encoder("resnet")
    with pytest.raises(ConfigError, match="^vpg: unknown encoder"):
        load_encoder("resnet")
    with pytest.raises(ConfigError, match=r"model\.vpg: unknown encoder 'resnet'"):
        _model_config(vpg="resnet")


BAD_SETTINGS = [
    (("blip2-qformer", None, None, None), r"vpg_path: required for vpg 'blip2-qformer': a BLIP-2 checkpoint"),
    (("clip", None, None, None), "vpg_path: required for vpg 'clip'"),
    (("dinov2", "", None, None), "vpg_path: required for vpg 'dinov2'"),
    (("efficientnet-lite0", None, 16, None), r"vpg_layer: .*a block index in -16\.\.15"),
    (("blip2-qformer", "ckpt", 3, None), "vpg_layer: not for vpg 'blip2-qformer'"),
    (("efficientnet-lite0", None, None, 8), r"pool: .*\(7 for vpg_layer None\), got 8"),
    (("efficientnet-lite0", None, 10, 15), r"pool: .*\(14 for vpg_layer 10\)"),
    (("dinov2", "ckpt", None, 2), "pool: not for vpg 'dinov2' .only for efficientnet-lite0"),
]


@pytest.mark.parametrize("settings, message", BAD_SETTINGS)
def test_bad_settings_name_the_field(settings, message):
    name, path, layer, pool = settings
    with pytest.raises(ConfigError, match=message):
        validate_encoder_settings(name, path, layer, pool)
    with pytest.raises(ConfigError, match=message):  # load_encoder checks before it builds anything
        load_encoder(name, path, layer=layer, pool=pool, pretrained=False)
    with pytest.raises(ConfigError, match=r"model\." + message):
        _model_config(vpg=name, vpg_path=path, vpg_layer=layer, pool=pool)


def test_good_settings_pass():
    for name, path, layer, pool in [("efficientnet-lite0", None, 10, 14), ("efficientnet-lite0", None, -1, None),
                                    ("clip", "ckpt", 5, None), ("dinov2", "ckpt", -1, None)]:
        validate_encoder_settings(name, path, layer, pool)
        assert _model_config(vpg=name, vpg_path=path, vpg_layer=layer, pool=pool).vpg == name


class TinyEncoder(ImageEncoder):
    """A test-only encoder: a 4 x 4 grid of mean colours, projected to width 8."""

    name = "test-tiny"
    num_tokens = 16
    dim = 8
    image_size = 32

    def __init__(self, layer=None):
        super().__init__()
        self.proj = nn.Linear(3, self.dim)
        self.freeze()

    @classmethod
    def build(cls, path=None, layer=None, pool=None, pretrained=True):
        return cls(layer)

    @classmethod
    def meta(cls, layer=None, pool=None):
        with torch.device("meta"):
            return cls(layer)

    def forward(self, pixel_values):
        grid = nn.functional.adaptive_avg_pool2d(pixel_values, 4)  # (N, 3, 4, 4)
        return self.proj(grid.flatten(2).transpose(1, 2))  # (N, 16, 8)


@pytest.fixture
def tiny_entry():
    entry = register_encoder(EncoderEntry("test-tiny", "image", TinyEncoder, layer_hint="a layer", layers=range(2)))
    yield entry
    unregister_encoder("test-tiny")


def test_a_registered_encoder_is_configurable_and_built(tiny_entry, capsys):
    from pill.cli import main

    assert "test-tiny" in encoder_names("image")
    assert _model_config(vpg="test-tiny", vpg_layer=1).vpg == "test-tiny"
    with pytest.raises(ConfigError, match="vpg_layer: for vpg 'test-tiny' a layer in 0..1"):
        _model_config(vpg="test-tiny", vpg_layer=2)
    enc = load_encoder("test-tiny")
    assert isinstance(enc, TinyEncoder) and not any(p.requires_grad for p in enc.parameters())
    assert enc(enc.preprocess([_img()])).shape == (1, 16, 8)
    with pytest.raises(ConfigError, match="already registered"):
        register_encoder(tiny_entry)
    assert main(["params", "--llm", "smollm2-135m", "--vpg", "test-tiny", "--json"]) == 0
    parts = {r["part"]: r["trainable"] for r in json.loads(capsys.readouterr().out)["rows"]}
    assert parts["projector"] == 8 * 576


@pytest.mark.parametrize("name", [n for n in encoder_names("image") if get_encoder(n).meta])
def test_meta_parameter_counts_for_every_encoder(name, capsys):
    from pill.cli import main
    from pill.commands import count_parameters

    enc = meta_encoder(name)
    assert all(p.device.type == "meta" for p in enc.parameters())
    result = count_parameters("smollm2-135m", name, "align")
    parts = {r["part"]: r["trainable"] for r in result["rows"]}
    assert parts["projector"] == enc.dim * 576
    assert main(["params", "--llm", "smollm2-135m", "--vpg", name, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["vpg"] == name


def test_meta_counts_check_the_layer():
    assert meta_encoder("efficientnet-lite0", layer=10).dim == 112
    with pytest.raises(ConfigError, match="vpg_layer"):
        meta_encoder("blip2-qformer", layer=1)


def test_fingerprints_are_unchanged_by_the_registry():
    """Cached features and checkpoints are keyed by these values: they must not change."""
    from pill.encoders.blip2 import Blip2VPG
    from pill.encoders.efficientnet import EfficientNetVPG

    assert meta_encoder("efficientnet-lite0", layer=10, pool=3).fingerprint() == "f6b8dcbf4f162bca"
    assert Blip2VPG.from_preset("meta").fingerprint() == "eb9df897de15de86"
    e = EfficientNetVPG(pretrained=False)
    with torch.no_grad():
        for i, (_, t) in enumerate(sorted(e.state_dict().items())):
            t.fill_(0.5 + 0.01 * (i % 7)) if t.is_floating_point() else t.fill_(i)
    assert e.fingerprint() == "3859fd066f96dd99"


# -- DINOv2 ----------------------------------------------------------------------------------

def _dinov2_checkpoint(folder, registers=0, preprocessor=None):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    args = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2, image_size=28, patch_size=14)
    torch.manual_seed(0)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **args))
    else:
        model = Dinov2Model(Dinov2Config(**args))
    model.eval().save_pretrained(folder)
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return model


def test_dinov2_patch_tokens_of_a_chosen_layer(tmp_path):
    ref = _dinov2_checkpoint(tmp_path)
    enc = load_encoder("dinov2", str(tmp_path))
    assert (enc.name, enc.num_tokens, enc.dim, enc.image_size, enc.modality) == ("dinov2-layer-2", 4, 32, 28, "image")
    assert enc.mean == (0.485, 0.456, 0.406)  # no preprocessor_config.json: ImageNet statistics
    assert not any(p.requires_grad for p in enc.parameters())
    pix = enc.preprocess([_img(), _img((0, 0, 0))])
    assert pix.shape == (2, 3, 28, 28)
    with torch.no_grad():
        hidden = ref(pixel_values=pix, output_hidden_states=True).hidden_states  # embeddings + 3 layers
        out = enc(pix)
        first = load_encoder("dinov2", str(tmp_path), layer=1)(pix)
    assert len(hidden) == 4
    assert out.shape == (2, 4, 32) and torch.allclose(out, hidden[-2][:, 1:], atol=1e-6)  # class token dropped
    assert torch.allclose(first, hidden[1][:, 1:], atol=1e-6)
    assert enc.fingerprint() == load_encoder("dinov2", str(tmp_path)).fingerprint()
    assert enc.fingerprint() != load_encoder("dinov2", str(tmp_path), layer=1).fingerprint()
    assert enc.fingerprint() != load_encoder("dinov2", str(tmp_path), pretrained=False).fingerprint()
    with pytest.raises(ConfigError, match=r"vpg_layer: dinov2 has hidden states 0\.\.3"):
        load_encoder("dinov2", str(tmp_path), layer=4)


def test_dinov2_registers_and_preprocessor_config(tmp_path):
    ref = _dinov2_checkpoint(tmp_path, registers=2, preprocessor={
        "crop_size": {"height": 42, "width": 42}, "size": {"shortest_edge": 48}, "do_center_crop": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]})
    enc = load_encoder("dinov2", str(tmp_path), layer=-1)
    assert (enc.image_size, enc.num_tokens, enc.mean, enc.std) == (42, 9, (0.5,) * 3, (0.25,) * 3)
    pix = enc.preprocess([_img()])
    with torch.no_grad():
        hidden = ref(pixel_values=pix, output_hidden_states=True).hidden_states
        out = enc(pix)
    assert hidden[-1].shape[1] == 1 + 2 + 9
    assert torch.allclose(out, hidden[-1][:, 3:], atol=1e-6)  # class and register tokens dropped


def test_dinov2_rejects_another_model_type(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=28, patch_size=14)).save_pretrained(tmp_path)
    with pytest.raises(PillError, match="not a DINOv2 checkpoint"):
        load_encoder("dinov2", str(tmp_path))


def test_a_vlm_on_dinov2_trains_one_step(tmp_path, tiny_llm, tokenizer):
    from pill.vlm import PillVLM

    _dinov2_checkpoint(tmp_path)
    enc = load_encoder("dinov2", str(tmp_path))
    torch.manual_seed(0)
    vlm = PillVLM(tiny_llm, enc, tokenizer)
    before = enc.fingerprint()
    batch = vlm.processor(["<image> what is it? a red box", "just text"], [[_img()], []], side="right")
    assert int(batch["modality_ids"][0].sum()) == 4
    labels = batch["input_ids"].clone()
    labels[batch["modality_ids"].bool()] = -100
    params = [p for p in vlm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    w0 = vlm.pill_projector["image"].weight.detach().clone()
    vlm.train()
    loss = vlm(**batch, labels=labels).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(vlm.pill_projector["image"].weight, w0)
    assert all(p.grad is None for p in enc.parameters()) and enc.fingerprint() == before


# -- EfficientNet, BLIP-2, CLIP ----------------------------------------------------------------

def test_blip2_vpg_from_local_checkpoint(tmp_path):
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    cfg = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            encoder_hidden_size=32),
        text_config=dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=100, word_embed_proj_dim=32),
        num_query_tokens=5)
    torch.manual_seed(0)
    ref = Blip2ForConditionalGeneration(cfg).eval()
    ref.save_pretrained(tmp_path)
    vpg = load_encoder("blip2-qformer", str(tmp_path))
    assert (vpg.num_tokens, vpg.dim) == (5, 32)
    pix = vpg.preprocess([_img(), _img((0, 0, 0))])
    assert pix.shape == (2, 3, 28, 28)
    with torch.no_grad():
        out = vpg(pix)
        expected = ref.get_qformer_features(pixel_values=pix) if hasattr(ref, "get_qformer_features") else None
    assert out.shape == (2, 5, 32)
    if expected is not None:
        exp = expected.last_hidden_state if hasattr(expected, "last_hidden_state") else expected[0]
        assert torch.allclose(out, exp, atol=1e-5)
    assert not any(p.requires_grad for p in vpg.parameters())


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_clip_and_siglip_patch_tokens(tmp_path, kind):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    args = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=32, patch_size=8)
    model = CLIPVisionModel(CLIPVisionConfig(**args)) if kind == "clip" else SiglipVisionModel(SiglipVisionConfig(**args))
    model.save_pretrained(tmp_path)
    vpg = load_encoder("clip", str(tmp_path))
    assert (vpg.num_tokens, vpg.dim) == (16, 32)
    assert vpg(vpg.preprocess([_img()])).shape == (1, 16, 32)
    assert load_encoder("clip", str(tmp_path), layer=0).fingerprint() != vpg.fingerprint()
    assert load_encoder("clip", str(tmp_path), pretrained=False).fingerprint() != vpg.fingerprint()
    with pytest.raises(ConfigError, match=r"vpg_layer: .* hidden states 0\.\.2"):
        load_encoder("clip", str(tmp_path), layer=3)


@pytest.mark.embedded
def test_embedded_efficientnet_recognises_a_photo():
    import os

    import matplotlib

    from pill.data.images import load_image
    from pill.encoders.efficientnet import EfficientNetVPG

    vpg = EfficientNetVPG()
    img = load_image(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))
    with torch.no_grad():
        logits = vpg.net.classify(vpg.preprocess([img]))
    assert int(logits.argmax()) == 652  # ImageNet "military uniform"
    assert vpg(vpg.preprocess([img])).shape == (1, 49, 1280)


def test_efficientnet_block_taps():
    from pill.encoders.efficientnet import EfficientNetVPG, feature_grid

    torch.manual_seed(0)
    head = EfficientNetVPG(pretrained=False)
    b10 = EfficientNetVPG(pretrained=False, layer=10)
    b10.net.load_state_dict(head.net.state_dict())
    pix = head.preprocess([_img(), _img((0, 0, 255))])
    assert (b10.num_tokens, b10.dim, b10.name) == (196, 112, "efficientnet-lite0-block10")
    with torch.no_grad():
        out = b10(pix)
        # block 10's output is an intermediate of the head's computation
        x = torch.nn.functional.relu6(head.net._conv_stem(pix))
        for blk in head.net._blocks[:11]:
            x = blk(x)
    assert out.shape == (2, 196, 112)
    assert torch.allclose(out, x.flatten(2).transpose(1, 2), atol=1e-5)
    pooled = EfficientNetVPG(pretrained=False, layer=-1, pool=3)  # the last block: 320 x 7 x 7
    assert (pooled.num_tokens, pooled.dim, pooled(pix).shape) == (9, 320, (2, 9, 320))
    assert [feature_grid(k) for k in (None, 0, 1, 3, 5, 10, 11, 15)] == [7, 112, 56, 28, 14, 14, 7, 7]
    assert load_encoder("efficientnet-lite0", pretrained=False, layer=10, pool=4).num_tokens == 16
    assert head.fingerprint() != EfficientNetVPG(pretrained=False, layer=15).fingerprint()
    with pytest.raises(PillError, match="block index in 0..15"):
        EfficientNetVPG(pretrained=False, layer=16)
    with pytest.raises(PillError, match=r"between 1 and the feature grid \(7\)"):
        EfficientNetVPG(pretrained=False, pool=8)
    with pytest.raises(PillError, match="no layer choice"):
        load_encoder("blip2-qformer", "somewhere", layer=3)
