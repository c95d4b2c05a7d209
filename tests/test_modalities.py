"""N modalities in the core: a second modality ("probe", a tiny random encoder over small vectors
stored as .npy files) beside image and text, end to end -- data, routing, gates, training,
saving, loading and generation."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from pill.errors import ConfigError, DataError
from pill.modalities import IMAGE, TEXT, Modality, modality, next_free_id, register_modality, unregister_modality
from pill.encoders import Encoder, EncoderEntry, register_encoder, unregister_encoder

PROBE_DIM, PROBE_TOKENS = 8, 3


def load_probe(ref, name=None):
    import io

    try:
        return np.load(io.BytesIO(ref) if isinstance(ref, (bytes, bytearray)) else ref).astype(np.float32)
    except (OSError, ValueError) as e:
        raise DataError(f"{name or ref}: not a probe reading ({e})") from None


class ProbeEncoder(Encoder):
    """A frozen random map from an 8-vector to 3 tokens of width 16."""

    name = "tiny-probe"
    modality = "probe"
    num_tokens = PROBE_TOKENS
    dim = 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.proj = nn.Linear(PROBE_DIM, PROBE_TOKENS * self.dim)
        self.freeze()

    @classmethod
    def build(cls, path, layer, pool, pretrained):
        return cls()

    def preprocess(self, readings):
        return torch.from_numpy(np.stack(readings))  # (N, 8)

    def forward(self, x):  # (N, 8) -> (N, K, d)
        return self.proj(x).view(x.shape[0], PROBE_TOKENS, self.dim)


@pytest.fixture(scope="module")
def probe():
    m = register_modality(Modality("probe", next_free_id(), "<probe>", load_probe, noun="probe reading"))
    yield m
    unregister_modality("probe")


@pytest.fixture(scope="module")
def probe_encoder(probe):
    """The encoder ``tiny-probe``, registered as a plug-in package would register its own."""
    register_encoder(EncoderEntry("tiny-probe", "probe", ProbeEncoder))
    yield
    unregister_encoder("tiny-probe")


def write_data(root: Path, n: int = 12) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "files").mkdir(parents=True)
    records = []
    for i in range(n):
        colour = (255, 0, 0) if i % 2 else (0, 0, 255)
        Image.new("RGB", (32, 32), colour).save(root / "files" / f"{i}.png")
        np.save(root / "files" / f"{i}.npy", rng.normal(size=PROBE_DIM) + (3 if i % 3 == 0 else -3))
        order = ["<image>", "<probe>"] if i % 2 else ["<probe>", "<image>"]
        records.append({"id": f"s{i}", "image": f"{i}.png", "probe": [f"{i}.npy"],
                        "conversations": [{"from": "human", "value": f"{order[0]}\nand\n{order[1]}\nWhat do they show?"},
                                          {"from": "gpt", "value": ("red" if i % 2 else "blue") + (" high" if i % 3 == 0 else " low")}]})
    records.append({"id": "text-only", "conversations": [{"from": "human", "value": "Say hi."},
                                                         {"from": "gpt", "value": "hi"}]})
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json"


def config(root: Path, data_json: Path, **changes):
    from pill.runconfig import TrainConfig

    raw = {"stage": "finetune",
           "model": {"llm": "llama", "random_init": True, "pool": 2, "encoders": {"probe": {"name": "tiny-probe"}}},
           "data": {"format": "llava", "json": str(data_json), "image_folder": str(data_json.parent / "files"),
                    "max_length": 96},
           "optim": {"lr": 5e-3, "batch_size": 4, "micro_batch_size": 4, "max_steps": 3, "warmup_ratio": 0.0},
           "train": {"cache_dir": str(root / "cache"), "save_every": 100}}
    for k, v in changes.items():
        section, key = k.split(".")
        raw[section][key] = v
    return TrainConfig.from_dict(raw)


def test_registry_names_ids_and_placeholders(probe):
    assert modality("image").id == IMAGE and modality("probe").id == probe.id != IMAGE
    with pytest.raises(ConfigError, match="clashes"):
        register_modality(Modality("probe2", probe.id, "<probe2>", load_probe))
    with pytest.raises(ConfigError, match="unknown modality 'smell'"):
        modality("smell")
    from pill.runconfig import TrainConfig

    with pytest.raises(ConfigError, match="encoders.smell"):
        TrainConfig.from_dict({"data": {"root": "."}, "model": {"encoders": {"smell": {"name": "x"}}}})


def test_samples_mix_modalities_and_each_token_goes_to_its_own_expert(tmp_path, probe, probe_encoder):
    from pill.build import build_vlm, load_dataset_samples
    from pill.data.collate import Collator, PillDataset

    data = write_data(tmp_path)
    cfg = config(tmp_path, data)
    vlm = build_vlm(cfg)
    assert set(vlm.encoders) == {"image", "probe"} and vlm.pill_config.num_modalities == probe.id + 1
    samples = load_dataset_samples(cfg, progress=False)
    assert samples[0].inputs() == {"image": [str(data.parent / "files" / "0.png")],
                                   "probe": [str(data.parent / "files" / "0.npy")]}
    ds = PillDataset(samples, vlm.processor, 96, progress=False)
    batch = Collator(vlm.processor)([ds[i] for i in range(4)])
    mods = batch["modality_ids"]
    K = vlm.encoders["image"].num_tokens
    assert int((mods == IMAGE).sum()) == 4 * K and int((mods == probe.id).sum()) == 4 * PROBE_TOKENS
    assert batch["pixel_values"].shape[0] == 4 and batch["probe_values"].shape == (4, PROBE_DIM)
    # the second sample puts the image first, the first the probe reading: slots follow the text
    first = [int(m) for m in mods[0] if m != TEXT]
    second = [int(m) for m in mods[1] if m != TEXT]
    assert first[0] == probe.id and second[0] == IMAGE

    # routing: give every expert its own non-zero output and check which one each token took
    layer = vlm.llm.model.layers[0]
    experts = layer.post_attention_layernorm.pill_experts
    with torch.no_grad():
        x = torch.randn(*mods.shape, vlm.llm.config.hidden_size)
        for e in experts.experts:
            e.w_up.weight.normal_()
        out = experts(x, mods)
        for m in (TEXT, IMAGE, probe.id):
            rows = mods == m
            assert torch.allclose(out[rows], experts.experts[m](x[rows]), atol=1e-5)

    # gates: every non-text token of every modality is gated, text tokens never
    seen = {}
    gate = layer.self_attn.v_proj.pill_gate
    def record(module, args, kwargs):
        seen["rows"] = kwargs.get("rows")

    handle = gate.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            vlm(**{k: v for k, v in batch.items() if k not in ("ids", "image_keys", "probe_keys", "labels")})
    finally:
        handle.remove()
    assert seen["rows"].numel() == int((mods != TEXT).sum())


def test_train_save_load_and_generate_with_two_modalities(tmp_path, probe, probe_encoder):
    from safetensors.torch import load_file

    from pill.build import load_run
    from pill.chat import ChatSession
    from pill.train.loop import train

    data = write_data(tmp_path)
    cfg = config(tmp_path, data)
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["steps"] == 3
    w = load_file(str(tmp_path / "run" / "pill.safetensors"))
    assert w["pill_projector.probe.weight"].shape == (64, ProbeEncoder.dim)
    assert w["pill_projector.image.weight"].shape[0] == 64
    # the probe expert learned (in the first layer: the last layer's FFN output at probe positions
    # never reaches the loss)
    assert w[f"llm.model.layers.0.post_attention_layernorm.pill_experts.experts.{probe.id}.w_up.weight"].abs().sum() > 0
    caches = {p.name.split("-")[0] + "-" + p.name.split("-")[1] for p in (tmp_path / "cache").iterdir()}
    assert any(c.startswith("tiny-probe") for c in caches)  # its own feature-cache namespace

    vlm = load_run(tmp_path / "run")
    for name in ("pill_projector.probe.weight", "pill_projector.image.weight"):
        assert torch.equal(dict(vlm.named_parameters())[name].detach(), w[name])
    files = data.parent / "files"
    session = ChatSession(vlm, max_new_tokens=4)
    answer = session.ask("What do they show?", [str(files / "1.png")], inputs={"probe": [str(files / "1.npy")]})
    assert isinstance(answer, str)
    assert session.messages[0]["content"].startswith("<image>\n") and "<probe>" in session.messages[0]["content"]

    # KV-cache decoding equals recomputing the whole sequence, with both modalities in the prompt
    batch = vlm.processor(["<probe>\n<image>\nWhat?"], [[vlm.modalities["image"].load(str(files / "2.png"))]],
                          inputs=[{"probe": [load_probe(str(files / "2.npy"))]}])
    a = vlm.generate(**batch, max_new_tokens=5, use_cache=True)
    b = vlm.generate(**batch, max_new_tokens=5, use_cache=False)
    assert torch.equal(a, b)


def test_missing_or_mismatched_inputs_name_the_sample(tmp_path, probe, probe_encoder):
    from pill.build import load_dataset_samples
    from pill.data import BadSample

    data = write_data(tmp_path, n=2)
    records = json.loads(data.read_text())
    records[0]["probe"] = []
    data.write_text(json.dumps(records))
    with pytest.raises(BadSample, match="sample s0: 1 <probe> placeholder"):
        load_dataset_samples(config(tmp_path, data), progress=False)
    records[0]["probe"] = ["missing.npy"]
    data.write_text(json.dumps(records))
    with pytest.raises(BadSample, match="sample s0: probe reading file not found"):
        load_dataset_samples(config(tmp_path, data), progress=False)
