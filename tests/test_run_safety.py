"""Nothing finishes broken, and what goes wrong is one clear line: bad numbers, non-finite weights,
incomplete or looping runs, a missing LLM, a full disk, a damaged feature cache, unreadable images."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from pill.cli import main
from pill.errors import CheckpointError, ConfigError, DataError, PillError


def _cli(argv, capsys):
    """Run ``pill ARGV`` in-process: (exit code, stderr lines)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.strip()]


def _write(tmp_path, cfg: dict, name="cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


# -- numbers: finite and in range, on load ----------------------------------------------------

@pytest.mark.parametrize("argv, code, words", [
    (["--set", "optim.lr=.inf", "--max-steps", "1"], 1, ["optim.lr", "finite"]),
    (["--set", "optim.lr=.nan"], 1, ["optim.lr", "finite"]),
    (["--set", "optim.lr=1e30", "--max-steps", "1"], 1, ["optim.lr", "(0, 1.0]", "1e+30"]),
    (["--set", "optim.gate_lr_scale=1e6"], 1, ["gate_lr_scale", "<= 1.0"]),
    (["--set", "optim.max_steps=-5"], 1, ["optim.max_steps", ">= 1", "-5"]),
    (["--set", "optim.max_steps=0"], 1, ["optim.max_steps", ">= 1"]),
    (["--set", "optim.betas=[0.9, 1.5]"], 1, ["optim.betas", "[0, 1)"]),
    (["--set", "optim.weight_decay=-1"], 1, ["optim.weight_decay"]),
    (["--set", "train.seed=-1"], 1, ["train.seed"]),
    (["--max-steps", "-3"], 2, ["--max-steps", "-3"]),
    (["--max-steps", "0"], 2, ["--max-steps", "0"]),
])
def test_bad_numbers_are_refused_before_training(tiny_run_config, tmp_path, capsys, argv, code, words):
    path = _write(tmp_path, tiny_run_config())
    status, lines = _cli(["train", path, "--output", tmp_path / "run", *argv], capsys)
    assert status == code and lines[-1].startswith("pill train: error:"), lines
    for w in words:
        assert w in lines[-1], lines[-1]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("max_steps", [0, -3, 1.5])
def test_library_max_steps_is_checked(tiny_run_config, tmp_path, max_steps):
    from pill.runconfig import TrainConfig
    from pill.train.loop import train

    with pytest.raises(ConfigError, match="max_steps"):
        train(TrainConfig.from_dict(tiny_run_config()), tmp_path / "run", max_steps=max_steps, progress=False)
    assert not (tmp_path / "run").exists()


# -- non-finite weights are never saved --------------------------------------------------------

def test_weights_that_turn_nonfinite_stop_the_run_and_the_good_checkpoint_stays(tiny_run_config, tmp_path):
    from pill.runconfig import TrainConfig
    from pill.train.loop import TrainingError, fit, setup

    cfg = TrainConfig.from_dict(tiny_run_config(**{"optim.epochs": 2, "train.save_every": 2}))
    s = setup(cfg, tmp_path / "run", progress=False)
    real_step, calls = s.optimizer.step, {"n": 0}

    def step(*a, **kw):  # the third update overflows one tensor
        out = real_step(*a, **kw)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                next(p for p in s.vlm.parameters() if p.requires_grad).mul_(float("inf"))
        return out

    s.optimizer.step = step
    with pytest.raises(TrainingError, match=r"step 3: the optimizer step left NaN or infinite values.*"
                                            r"last good checkpoint is kept: .*step-000002") as e:
        fit(s, progress=False)
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    kept = load_file(str(run / "checkpoints" / "step-000002" / "pill.safetensors"))
    assert all(torch.isfinite(t).all() for t in kept.values())
    assert not (run / "pill.safetensors").exists()
    assert "\n" not in str(e.value)


def test_an_infinite_learning_rate_set_in_code_stops_at_step_one(tiny_run_config, tmp_path):
    from pill.runconfig import TrainConfig
    from pill.train.loop import TrainingError, fit, setup

    cfg = TrainConfig.from_dict(tiny_run_config(**{"optim.epochs": 2, "train.save_every": 2}))
    cfg.optim.lr = float("inf")  # past the validation, as a script could
    s = setup(cfg, tmp_path / "run", progress=False)
    with pytest.raises(TrainingError, match="step 1: .*NaN or infinite.*No checkpoint was saved"):
        fit(s, progress=False)
    assert not list((tmp_path / "run").glob("**/*.safetensors"))


def test_saves_refuse_nonfinite_tensors(tmp_path):
    from pill.checkpoint import save_resume_state, save_weights

    good, bad = {"a": torch.ones(2)}, {"a": torch.tensor([1.0, float("nan")])}
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        save_weights(tmp_path / "pill.safetensors", bad, {})
    state = {"optimizer": {"state": {0: {"exp_avg": torch.tensor([float("inf")])}}}, "scheduler": {}, "rng": [{}],
             "step": 1}
    with pytest.raises(CheckpointError, match="state.safetensors.*NaN or infinite"):
        save_resume_state(tmp_path, 1, good, {}, state, keep_last=2)
    assert not list(tmp_path.rglob("*.safetensors")) and not list((tmp_path / "checkpoints").glob("*"))


# -- a loaded run holds what its config implies; init_from chains end --------------------------

def test_an_empty_weights_file_is_an_error_listing_the_missing_tensors(run_copy):
    from pill.build import load_run

    run, _ = run_copy
    full = load_file(str(run / "pill.safetensors"))
    from safetensors import safe_open

    with safe_open(str(run / "pill.safetensors"), "pt") as f:
        meta = f.metadata()
    meta.pop("tensors_sha256")  # valid files, as another tool would write them
    save_file({}, str(run / "pill.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=rf"{len(full)} of the {len(full)} tensors .* are missing: "):
        load_run(run)
    dropped = "pill_projector.image.weight"
    save_file({k: v for k, v in full.items() if k != dropped}, str(run / "pill.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=rf"1 of the {len(full)} tensors .* missing: {dropped}$"):
        load_run(run)
    full[dropped][0, 0] = float("nan")
    save_file(full, str(run / "pill.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=rf"1 tensors hold NaN or infinite values \(e.g. {dropped}\)"):
        load_run(run)


def test_a_weights_file_with_flipped_bytes_is_damaged(run_copy):
    from pill.build import load_run

    run, _ = run_copy
    data = bytearray((run / "pill.safetensors").read_bytes())
    data[-40:-36] = b"\x01\x02\x03\x04"  # inside the last tensor: still a valid file, other numbers
    (run / "pill.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="pill.safetensors: damaged"):
        load_run(run)


def _set_init_from(run: Path, target: Path) -> None:
    data = yaml.safe_load((run / "config.yaml").read_text())
    data["init_from"] = str(target)
    (run / "config.yaml").write_text(yaml.safe_dump(data))


def test_init_from_loops_are_errors_for_chat_eval_and_training(run_copy, tmp_path, capsys, synth_small):
    import shutil

    from pill.build import load_model, load_run
    from pill.runconfig import load_config
    from pill.train.loop import train

    run, config = run_copy
    _set_init_from(run, run)  # the run starts from itself
    with pytest.raises(CheckpointError, match="loop of runs"):
        load_run(run)
    other = shutil.copytree(run, tmp_path / "other")
    _set_init_from(run, other)
    _set_init_from(other, run)  # two runs that start from each other
    for argv in (["chat", "--run", run, "--device", "cpu", "hello"],
                 ["eval", "scienceqa", "--run", run, "--data", synth_small, "--limit", "1", "--device", "cpu"]):
        status, lines = _cli(argv, capsys)
        assert status == 1 and len(lines) == 1 and "loop of runs" in lines[0], lines
    with pytest.raises(CheckpointError, match="loop of runs"):
        load_model(str(other))  # what the library's chat and the web server load
    cfg = load_config(config)
    cfg.init_from = str(run)  # training from a run whose chain loops
    with pytest.raises(CheckpointError, match="loop of runs"):
        train(cfg, tmp_path / "new", progress=False)
    cfg.init_from = str(tmp_path / "new")
    (tmp_path / "new").mkdir()
    with pytest.raises(ConfigError, match="own directory"):
        train(cfg, tmp_path / "new", progress=False)


@pytest.mark.parametrize("changes, shown", [
    ({"pill.r": 8}, "pill.r 32 -> 8"),
    ({"model.feature_norm": True}, "model.feature_norm False -> True"),
])
def test_init_from_with_other_plugin_settings_names_the_keys(run_copy, tiny_run_config, tmp_path, changes, shown):
    from pill.runconfig import TrainConfig
    from pill.train.loop import train

    run, _ = run_copy
    cfg = TrainConfig.from_dict(tiny_run_config(init_from=str(run), **changes))
    with pytest.raises(CheckpointError, match="other plug-in or encoder settings") as e:
        train(cfg, tmp_path / "stage2", progress=False)
    assert shown in str(e.value)


# -- one line instead of a traceback ------------------------------------------------------------

@pytest.mark.parametrize("name, words", [
    ("/nonexistent/llm-folder", ["/nonexistent/llm-folder", "no such LLM folder"]),
    ("no-such-org/no-such-model", ["'no-such-org/no-such-model'", "neither the embedded default", "local folder",
                                   "hub id"]),
])
def test_a_missing_llm_is_one_line(tiny_run_config, tmp_path, capsys, monkeypatch, name, words):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, without a network
    cfg = tiny_run_config(**{"model.random_init": False, "model.llm": name})
    status, lines = _cli(["train", _write(tmp_path, cfg), "--output", tmp_path / "run"], capsys)
    assert status == 1 and len(lines) == 1, lines
    for w in words:
        assert w in lines[0], lines[0]


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tiny_run_config, tmp_path, monkeypatch):
    from pill.checkpoint import list_checkpoints, load_resume_state
    from pill.runconfig import TrainConfig
    from pill.train.loop import train

    run = tmp_path / "run"
    real_fsync = os.fsync

    def fsync(fd):  # the disk fills up once the first checkpoint is written
        if (run / "checkpoints" / "step-000002").exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr("pill.io.os.fsync", fsync)
    cfg = TrainConfig.from_dict(tiny_run_config(**{"optim.epochs": 3, "train.save_every": 2}))
    with pytest.raises(CheckpointError) as e:
        train(cfg, run, progress=False)
    msg = str(e.value)
    assert "cannot save the checkpoint of step 4" in msg and "No space left on device" in msg
    assert str(run / "checkpoints") in msg and "intact (step-000002)" in msg
    assert [p.name for p in list_checkpoints(run)] == ["step-000002"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]  # no temporary left
    tensors, state = load_resume_state(run / "checkpoints" / "step-000002")
    assert state["step"] == 2 and tensors


def test_a_full_disk_at_the_final_save_says_what_is_kept(tiny_run_config, tmp_path, monkeypatch):
    import pill.checkpoint
    from pill.runconfig import TrainConfig
    from pill.train.loop import TrainingError, train

    run = tmp_path / "run"
    real = pill.checkpoint.write_atomic

    def write_atomic(path, data, *a, **kw):
        if Path(path) == run / "pill.safetensors":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data, *a, **kw)

    monkeypatch.setattr(pill.checkpoint, "write_atomic", write_atomic)
    with pytest.raises(TrainingError, match=r"step 2: .*pill.safetensors: cannot write the trained tensors "
                                            r"\(No space left on device\).*last good checkpoint is kept: .*step-000001"):
        train(TrainConfig.from_dict(tiny_run_config()), run, progress=False)
    assert not (run / "pill.safetensors").exists()


def _one_image_cache(tmp_path):
    from pill.data import content_key
    from pill.encoders.efficientnet import EfficientNetVPG
    from pill.train.features import FeatureCache

    torch.manual_seed(0)
    vpg = EfficientNetVPG(pretrained=False, pool=1)
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(img)
    key = content_key(str(img))
    cache = FeatureCache(tmp_path / "c", vpg)
    assert cache.build({key: str(img)}, progress=False) == 1
    with torch.no_grad():
        direct = vpg(vpg.preprocess([Image.open(img).convert("RGB")]))
    return vpg, cache.dir, key, str(img), direct


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_a_damaged_feature_cache_shard_is_computed_again(tmp_path, capsys, damage):
    from pill.train.features import FeatureCache

    vpg, folder, key, img, direct = _one_image_cache(tmp_path)
    shard = next(folder.glob("shard-*.safetensors"))
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "garbage":
        shard.write_bytes(b"\x00garbage" * 50)
    else:
        shard.unlink()
    capsys.readouterr()
    cache = FeatureCache(tmp_path / "c", vpg)
    assert cache.build({key: img}, progress=False) == 1
    err = capsys.readouterr().err
    assert "warning: feature cache shard" in err and "computed again" in err
    assert torch.allclose(cache.get([key]), direct, atol=1e-6)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_a_damaged_feature_cache_index_is_computed_again(tmp_path, capsys, text):
    from pill.train.features import FeatureCache

    vpg, folder, key, img, direct = _one_image_cache(tmp_path)
    (folder / "index.json").write_text(text)
    capsys.readouterr()
    cache = FeatureCache(tmp_path / "c", vpg)
    assert cache.build({key: img}, progress=False) == 1
    assert capsys.readouterr().err.count("warning: feature cache index") == 1
    assert torch.allclose(cache.get([key]), direct, atol=1e-6)
    assert key in json.loads((folder / "index.json").read_text())


def test_a_shard_lost_during_a_run_is_one_clear_error(tmp_path):
    from pill.train.features import FeatureCache

    vpg, folder, key, img, _ = _one_image_cache(tmp_path)
    cache = FeatureCache(tmp_path / "c", vpg)
    next(folder.glob("shard-*.safetensors")).write_bytes(b"junk")
    with pytest.raises(DataError, match=r"feature cache shard .*shard-.*delete the shard"):
        cache.get([key])


@pytest.fixture
def llava_with_a_bad_image(tmp_path, synth_small):
    """A LLaVA JSON of 6 samples whose third image is a file that is not an image."""
    import shutil

    folder = tmp_path / "images"
    folder.mkdir()
    records = []
    for i, src in enumerate(sorted((synth_small / "images" / "train").glob("*/image.png"))[:6]):
        shutil.copy(src, folder / f"{i}.png")
        records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "Shapes."}]})
    (folder / "2.png").write_bytes(b"this is not a png")
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path / "data.json", folder


@pytest.mark.parametrize("feature_cache", [True, False])
def test_skip_bad_skips_and_counts_an_unreadable_llava_image(tiny_run_config, tmp_path, capsys, llava_with_a_bad_image,
                                                             feature_cache):
    from pill.runconfig import TrainConfig
    from pill.train.loop import setup, train

    json_path, folder = llava_with_a_bad_image
    data = {"format": "llava", "json": str(json_path), "image_folder": str(folder), "max_length": 160}
    cfg = tiny_run_config(**{"train.feature_cache": feature_cache, "train.cache_dir": str(tmp_path / "cache")})
    cfg["data"] = {**data, "skip_bad": True}
    s = setup(TrainConfig.from_dict(cfg), tmp_path / "run", progress=True)
    err = capsys.readouterr().err
    assert len(s.dataset) == 5 and "s2" not in [x.id for x in s.dataset.samples]
    assert "skipped 1 (bad_image)" in err and "sample s2" in err and "2.png" in err
    cfg["data"] = {**data, "skip_bad": False}
    with pytest.raises(DataError, match="2.png"):
        train(TrainConfig.from_dict(cfg), tmp_path / "run2", max_steps=1, progress=False)


def test_the_run_config_is_written_atomically(tmp_path, monkeypatch):
    from pill.runconfig import TrainConfig, load_config, save_config

    path = tmp_path / "config.yaml"
    save_config(TrainConfig.from_dict({"data": {"root": "."}}), path)
    before = path.read_text()

    def fail(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("pill.io.os.replace", fail)
    with pytest.raises(OSError):
        save_config(TrainConfig.from_dict({"data": {"root": "elsewhere"}}), path)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    assert load_config(path).data.root == "."
