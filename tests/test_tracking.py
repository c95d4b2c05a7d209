"""Experiment tracking (``train.report_to``): a tiny run logs its scalars to TensorBoard (read back
from the event file) and, where the wandb package is installed, to Weights & Biases offline."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pill.errors import ConfigError
from pill.runconfig import REPORT_TO, TrainConfig

STEP_TAGS = ("train/loss", "train/lr", "train/tokens_per_s", "train/grad_norm")


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from pill.data.synth import make_synth

    root = tmp_path_factory.mktemp("synth")
    make_synth(root, n_train=12, n_test=4, seed=0, progress=False)
    return root


def tiny(synth_root, cache_dir, **train) -> TrainConfig:
    return TrainConfig.from_dict({
        "stage": "finetune",
        "model": {"llm": "llama", "random_init": True, "pool": 2},
        "data": {"format": "scienceqa", "root": str(synth_root), "split": "train", "max_length": 160},
        "optim": {"lr": 3.0e-3, "batch_size": 4, "micro_batch_size": 4, "warmup_ratio": 0.0},
        "train": {"save_every": 2, "cache_dir": str(cache_dir), "log_every": 1, **train},
    })


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of every TensorBoard event file under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(log_dir.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {log_dir}"
    out: dict[str, list[tuple[int, float]]] = {}
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_three_steps_reach_tensorboard(tmp_path, synth_root):
    from pill.train.loop import train

    run = tmp_path / "run"
    summary = train(tiny(synth_root, tmp_path / "cache", report_to=["tensorboard"]), run, max_steps=3, progress=False)
    assert summary["steps"] == 3
    scalars = read_scalars(run / "logs")
    for tag in STEP_TAGS:
        assert [s for s, _ in scalars[tag]] == [1, 2, 3], (tag, scalars.get(tag))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for (step, value), rec in zip(scalars["train/loss"], metrics):
        assert step == rec["step"] and value == pytest.approx(rec["loss"], rel=1e-6)
    assert all(v > 0 for _, v in scalars["train/grad_norm"])
    assert [v for _, v in scalars["train/grad_norm"]] == pytest.approx([r["grad_norm"] for r in metrics], rel=1e-6)
    # gates at the save after step 2 and at the end, one scalar per plugged layer
    gates = json.loads((run / "gates.json").read_text())
    layer_tags = sorted(t for t in scalars if t.startswith("gates/layer_"))
    assert layer_tags == [f"gates/layer_{i:02d}" for i in gates["layers"]] and layer_tags
    for tag in layer_tags + ["gates/mean"]:
        assert [s for s, _ in scalars[tag]] == [2, 3], tag
    final = {t: v[-1][1] for t, v in scalars.items() if t.startswith("gates/layer_")}
    assert [final[t] for t in layer_tags] == pytest.approx(gates["mean_abs_gate"], rel=1e-5)
    assert all(0 <= v <= 1 for v in gates["mean_abs_gate"])
    assert any(v > 0 for v in gates["mean_abs_gate"])  # the zero-init gates have moved in 3 steps


def test_no_tracker_writes_no_logs_but_still_the_gates(tmp_path, synth_root):
    from pill.train.loop import train

    run = tmp_path / "run"
    train(tiny(synth_root, tmp_path / "cache"), run, max_steps=1, progress=False)
    assert not (run / "logs").exists()
    assert json.loads((run / "gates.json").read_text())["layers"]
    assert "grad_norm" in json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


def test_report_to_is_validated(synth_root, tmp_path):
    with pytest.raises(ConfigError, match=r"train\.report_to: unknown tracker 'tensorbord'; choose from tensorboard"):
        tiny(synth_root, tmp_path, report_to=["tensorbord"])
    with pytest.raises(ConfigError, match=r"train\.report_to: expected a list"):
        tiny(synth_root, tmp_path, report_to="tensorboard")
    assert tiny(synth_root, tmp_path, tensorboard=True).train.report_to == ["tensorboard"]  # older configs
    assert tiny(synth_root, tmp_path, report_to=["wandb", "wandb", "tensorboard"]).train.report_to == \
        ["wandb", "tensorboard"]


def test_report_to_names_accelerate_trackers():
    from accelerate.utils import LoggerType

    assert set(REPORT_TO) <= {t.value for t in LoggerType}


def test_a_missing_tracker_package_is_one_line_before_any_model(tmp_path, synth_root, monkeypatch, capsys):
    import accelerate.utils
    import yaml

    import pill.train.loop
    from pill.cli import main

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)

    def no_model(*a, **k):
        raise AssertionError("the model was built before the tracker check")

    monkeypatch.setattr(pill.train.loop, "build_vlm", no_model)
    cfg = tiny(synth_root, tmp_path / "cache", report_to=["wandb"])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["train", str(path), "--output", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pill train: error: train.report_to: wandb needs its package, which is not installed "
                   "(pip install 'pill[wandb]')"]


def test_wandb_offline(tmp_path, synth_root, monkeypatch):
    """Runs where the optional ``pill[wandb]`` extra is installed."""
    pytest.importorskip("wandb")
    from pill.train.loop import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    train(tiny(synth_root, tmp_path / "cache", report_to=["wandb"]), run, max_steps=2, progress=False)
    runs = sorted((run / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, os.listdir(run / "logs")
    records = list(runs[0].glob("run-*.wandb"))  # the offline run's records, which `wandb sync` uploads
    assert len(records) == 1
    data = records[0].read_bytes()
    for key in (*STEP_TAGS, "gates/mean", "gates/layer_00", "optim.lr"):  # scalars and the config
        assert key.encode() in data, key
