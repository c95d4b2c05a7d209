"""Runs as Hub model repositories: the model card, the exported folder, loading by repository id,
and ``pill push`` failing with one line when the Hub cannot be reached (the upload itself needs
the network and is not tested here)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pill.errors import CheckpointError
from pill.runconfig import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n"), text[:80]
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny two-stage run: align (2 steps), then finetune from it (2 steps, a resume checkpoint,
    TensorBoard logs)."""
    from pill.data.synth import make_synth
    from pill.train.loop import train

    tmp = tmp_path_factory.mktemp("hub")
    make_synth(tmp / "data", n_train=8, n_test=4, seed=0, progress=False)
    base = {"model": {"llm": "llama", "random_init": True, "pool": 2},
            "data": {"format": "scienceqa", "root": str(tmp / "data"), "split": "train", "max_length": 160},
            "optim": {"lr": 3e-3, "batch_size": 4, "micro_batch_size": 4, "warmup_ratio": 0.0},
            "train": {"save_every": 1, "cache_dir": str(tmp / "cache")}}
    align, finetune = tmp / "align", tmp / "finetune"
    train(TrainConfig.from_dict({**base, "stage": "align"}), align, max_steps=2, progress=False)
    cfg = TrainConfig.from_dict({**base, "stage": "finetune", "init_from": str(align),
                                 "train": {**base["train"], "report_to": ["tensorboard"]}})
    train(cfg, finetune, max_steps=2, progress=False)
    return {"align": align, "finetune": finetune, "tmp": tmp}


def test_training_writes_a_model_card(runs):
    run = runs["finetune"]
    text = (run / "README.md").read_text()
    front = _front_matter(text)
    assert front["library_name"] == "pill" and "pill" in front["tags"]
    assert "base_model" not in front  # a random test model has none
    body = text.split("---\n", 2)[2]
    assert "efficientnet-lite0" in body and "| align |" in body and "| finetune |" in body
    assert "Mean |tanh(gate)|" in body  # the gate values from gates.json
    assert (run / "checkpoints").is_dir() and (run / "logs").is_dir()


def test_card_command_draws_the_gate_plot(runs, capsys):
    from pill.cli import main

    run = runs["finetune"]
    assert main(["card", str(run), "--repo", "someone/pill-tiny"]) == 0
    assert (run / "gates.png").read_bytes()[:4] == b"\x89PNG"
    text = (run / "README.md").read_text()
    assert "![mean |tanh(gate)| per layer](gates.png)" in text
    assert 'load_run("someone/pill-tiny")' in text and "# pill-tiny" in text


def test_base_model_is_a_hub_id():
    from pill.hub import _base_model

    assert _base_model("smollm2-135m-instruct", False) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert _base_model("meta-llama/Llama-2-7b-hf", False) == "meta-llama/Llama-2-7b-hf"
    assert _base_model("/models/llama", False) is None and _base_model("llama", True) is None


def test_exported_folder_is_a_self_contained_repository(runs, tmp_path):
    from pill.build import load_run
    from pill.checkpoint import read_metadata
    from pill.hub import export_run

    out = export_run(runs["finetune"], tmp_path / "repo", repo_id="someone/pill-tiny")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["README.md", "config.yaml", "gates.json", "gates.png", "metrics.jsonl", "pill.safetensors"]
    assert yaml.safe_load((out / "config.yaml").read_text())["init_from"] is None
    assert read_metadata(out / "pill.safetensors")["stages"] == ["align", "finetune"]
    assert _front_matter((out / "README.md").read_text())["library_name"] == "pill"
    local, exported = load_run(runs["finetune"]), load_run(out)
    a, b = local.pill_state_dict(trainable_only=False), exported.pill_state_dict(trainable_only=False)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert exported.run_info["stages"] == ["align", "finetune"]


def test_load_run_takes_a_hub_id(runs, tmp_path, monkeypatch):
    import huggingface_hub

    from pill.build import load_run
    from pill.hub import export_run

    folder = export_run(runs["finetune"], tmp_path / "snapshot")
    asked = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        asked.append((repo_id, revision, allow_patterns))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    vlm = load_run("someone/pill-tiny@v1")
    assert asked[0][:2] == ("someone/pill-tiny", "v1")
    assert "pill.safetensors" in asked[0][2] and "config.yaml" in asked[0][2]
    assert vlm.run_info["run_dir"] == str(folder)


def test_load_run_offline_is_one_clear_error(monkeypatch):
    import huggingface_hub

    from pill.build import load_run

    def offline(*a, **k):
        raise huggingface_hub.errors.LocalEntryNotFoundError("Cannot find the requested files in the disk cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match=r"^someone/nothing: not a local run directory, and the Hub did not "
                                              r"provide it \(LocalEntryNotFoundError: Cannot find"):
        load_run("someone/nothing")
    with pytest.raises(CheckpointError, match="no config.yaml"):
        load_run("./not/here")  # a path, never looked up on the Hub


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline", "closed-port"])
def test_push_without_the_hub_is_one_line(runs, env):
    full = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_TOKEN": "hf_test", **env}
    proc = subprocess.run([sys.executable, "-m", "pill", "push", str(runs["finetune"]), "--repo", "someone/pill-tiny"],
                          capture_output=True, text=True, env=full, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("pill push: error: push to someone/pill-tiny: "), proc.stderr
    assert ("offline" in lines[0].lower()) if env["HF_HUB_OFFLINE"] == "1" else ("refused" in lines[0].lower())


def test_push_rejects_a_bad_repository_id(runs, capsys):
    from pill.cli import main

    with pytest.raises(SystemExit) as e:
        main(["push", str(runs["finetune"]), "--repo", "no-slash"])
    assert e.value.code == 2
    assert "--repo: must be a Hub repository id user/name, got 'no-slash'" in capsys.readouterr().err
