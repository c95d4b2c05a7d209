"""A shortened `pill demo` on the embedded default models: every phase runs, every file is written."""
import json

import pytest


def test_benchmark_is_reused_only_when_it_matches(tmp_path, capsys):
    from pill.data.synth import GENERATOR_VERSION
    from pill.demo import DemoSettings, _synth

    st = DemoSettings(out=str(tmp_path), n_train=6, n_test=3, seed=2)
    _synth(tmp_path / "data", st)
    info_file = tmp_path / "data" / "synth_info.json"
    assert "writing 6 training" in capsys.readouterr().out
    _synth(tmp_path / "data", st)
    assert "reusing" in capsys.readouterr().out
    info = json.loads(info_file.read_text())
    info_file.write_text(json.dumps({**info, "version": GENERATOR_VERSION - 1}))  # an older generator's files
    _synth(tmp_path / "data", st)
    assert "writing 6 training" in capsys.readouterr().out
    assert json.loads(info_file.read_text())["version"] == GENERATOR_VERSION
    _synth(tmp_path / "data", DemoSettings(out=str(tmp_path), n_train=6, n_test=3, seed=3))
    assert "writing 6 training" in capsys.readouterr().out


@pytest.mark.embedded
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_quick_demo_writes_report_and_plots(tmp_path, monkeypatch, capsys, precision):
    """Both training precisions, on every CPU (bf16 is emulated, and slower, where the CPU lacks it)."""
    from pill.demo import DemoSettings, run_demo

    monkeypatch.setenv("PILL_PRECISION", precision)
    st = DemoSettings(out=str(tmp_path / "demo"), n_train=16, n_test=8, align_steps=2, finetune_steps=2,
                      batch_size=4, max_new_tokens=16, quick=True)
    report = run_demo(st)
    assert report["precision"] == {"name": precision, "reason": f"forced by PILL_PRECISION={precision}"}
    printed = capsys.readouterr().out
    assert f"precision: {precision} (forced by PILL_PRECISION={precision})" in printed
    out = tmp_path / "demo"
    saved = json.loads((out / "report.json").read_text())
    assert saved["accuracy_before"] == report["accuracy_before"]
    for key in ("accuracy_before", "accuracy_after"):
        assert 0.0 <= saved[key] <= 1.0
    assert saved["wall_seconds"] > 0 and saved["test_problems"] == 8
    assert set(saved["per_type_after"]) <= {"color", "shape", "exists", "position", "count"}
    for name in ("gates.png", "loss.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for stage in ("align", "finetune"):
        assert (out / stage / "pill.safetensors").is_file()
    from safetensors.torch import load_file

    w = load_file(str(out / "finetune" / "pill.safetensors"))
    # block-10 features, standardised with the statistics of the 16 training images (16 tokens each)
    assert w["pill_projector.image.weight"].shape == (576, 112) and int(w["pill_feature_norm.image.count"]) == 16 * 16
    assert (out / "eval-after" / "predictions.json").is_file()
    gates = json.loads((out / "finetune" / "gates.json").read_text())
    assert len(gates["mean_abs_gate"]) == 30


def test_audio_demo_stages_read_the_audio_benchmark(tmp_path):
    from pill.demo import DemoSettings, resolve_settings, stage_config
    from pill.errors import ConfigError

    st = DemoSettings(out=str(tmp_path), modality="audio", align_steps=3, finetune_steps=4)
    precision, st = resolve_settings(st)
    data = tmp_path / "data"
    align = stage_config(st, precision, data, tmp_path, "align")
    finetune = stage_config(st, precision, data, tmp_path, "finetune")
    audio = align.model.encoders["audio"]
    assert (audio.name, audio.max_seconds, audio.pool, audio.feature_norm) == ("whisper-base", 5.0, 4, True)
    assert align.data.json == str(data / "captions_llava.json") and align.data.image_folder == str(data / "audio")
    assert (align.optim.max_steps, finetune.optim.max_steps) == (3, 4)
    assert finetune.data.root == str(data) and finetune.init_from == str(tmp_path / "align")
    assert finetune.model.encoders["audio"] == audio
    with pytest.raises(ConfigError, match=r"demo modality: one of image, audio, image\+audio, got 'smell'"):
        resolve_settings(DemoSettings(modality="smell"))
    st.audio_pool = 8
    assert stage_config(st, precision, data, tmp_path, "finetune").model.encoders["audio"].pool == 8


def test_demo_pool_flags_fit_the_modality(tmp_path, capsys):
    from pill.cli import main

    assert main(["demo", "--modality", "audio", "--pool", "2", "--out", str(tmp_path)]) == 1
    assert "--audio-pool N pools Whisper's 50 frames per second" in capsys.readouterr().err
    assert main(["demo", "--audio-pool", "2", "--out", str(tmp_path)]) == 1
    assert "--audio-pool: for --modality audio or image+audio" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any work


def test_demo_set_overrides_both_stages_or_one(tmp_path):
    """``pill demo --set``: a plain key=value reaches both stages, align:/finetune: one; typed and checked."""
    from pill.cli import main
    from pill.demo import DemoSettings, resolve_settings, stage_config
    from pill.errors import ConfigError

    st = DemoSettings(out=str(tmp_path), overrides=("optim.lr=3e-3", "finetune:optim.gate_lr_scale=2",
                                                    "align:data.max_length=128", "finetune:init_from=null"))
    precision, st = resolve_settings(st)
    align, finetune = (stage_config(st, precision, tmp_path, tmp_path, s) for s in ("align", "finetune"))
    assert align.optim.lr == finetune.optim.lr == 3e-3
    assert (align.optim.gate_lr_scale, finetune.optim.gate_lr_scale) == (1.0, 2.0)
    assert (align.data.max_length, finetune.data.max_length) == (128, 160)
    assert finetune.init_from is None
    with pytest.raises(ConfigError, match="stage prefix is align: or finetune:, got stage3:"):
        resolve_settings(DemoSettings(overrides=("stage3:optim.lr=1",)))
    with pytest.raises(ConfigError, match="unknown field 'lrx'"):
        stage_config(DemoSettings(overrides=("optim.lrx=1",)), precision, tmp_path, tmp_path, "align")
    assert main(["demo", "--out", str(tmp_path / "x"), "--set", "nope:optim.lr=1"]) != 0


@pytest.mark.embedded
@pytest.mark.slow
def test_quick_audio_demo_writes_report_and_plots(tmp_path, monkeypatch):
    import shutil

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed; enable with: sudo bash .ci/install-espeak")
    from safetensors.torch import load_file

    from pill.demo import DemoSettings, run_demo

    monkeypatch.setenv("PILL_PRECISION", "float32")
    st = DemoSettings(out=str(tmp_path / "demo-audio"), n_train=16, n_test=8, align_steps=2, finetune_steps=2,
                      batch_size=4, max_new_tokens=16, quick=True, modality="audio")
    report = run_demo(st)
    out = tmp_path / "demo-audio"
    assert report["modality"] == "audio" and report["test_problems"] == 8
    assert set(report["per_type_after"]) <= {"digit", "tone", "beeps", "order"}
    assert (out / "gates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    w = load_file(str(out / "finetune" / "pill.safetensors"))
    assert w["pill_projector.audio.weight"].shape == (576, 512)  # Whisper-base's width
    assert int(w["pill_feature_norm.audio.count"]) == 16 * 63  # 16 training clips, 63 tokens each (5 s, pool 4)


@pytest.mark.embedded
@pytest.mark.slow
def test_quick_image_audio_demo_trains_one_model_on_both_benchmarks(tmp_path, monkeypatch):
    import shutil

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed; enable with: sudo bash .ci/install-espeak")
    from safetensors.torch import load_file

    from pill.demo import DemoSettings, run_demo

    monkeypatch.setenv("PILL_PRECISION", "float32")
    st = DemoSettings(out=str(tmp_path / "demo-image-audio"), n_train=12, n_test=6, align_steps=2, finetune_steps=2,
                      batch_size=4, max_new_tokens=8, quick=True, modality="image+audio")
    report = run_demo(st)
    out = tmp_path / "demo-image-audio"
    assert report["modality"] == "image+audio" and report["test_problems"] == 12  # 6 of each benchmark
    assert set(report["per_benchmark_after"]) == {"image", "audio"}
    assert set(report["per_type_after"]) <= {"color", "shape", "position", "count", "exists",
                                             "digit", "tone", "beeps", "order"}
    w = load_file(str(out / "finetune" / "pill.safetensors"))
    assert int(w["pill_feature_norm.image.count"]) == 12 * 16 and int(w["pill_feature_norm.audio.count"]) == 12 * 63
    gates = json.loads((out / "finetune" / "gates.json").read_text())
    assert set(gates["by_modality"]) == {"image", "audio"}
    assert all(len(g["mean_abs_gate"]) == 30 for g in gates["by_modality"].values())
    assert (out / "gates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
