"""Every file of a finished run, corrupted, truncated or deleted: chat, eval and resume each end in
one clear line (a PillError; ``pill`` exits 1 with one line on stderr) or in the documented
recovery (README, Training), never in a traceback.

One tiny run (2 steps, random-init model, its own feature cache) is trained once; each case damages
one file of a fresh copy.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from pill.cli import main
from pill.errors import PillError

# file -> where it lies in the copy ("cache/" is the run's feature cache)
FILES = {
    "config": "run/config.yaml",
    "weights": "run/pill.safetensors",
    "checkpoint weights": "run/checkpoints/step-000001/pill.safetensors",
    "resume state": "run/checkpoints/step-000001/state.json",
    "resume tensors": "run/checkpoints/step-000001/state.safetensors",
    "checkpoint record": "run/checkpoints/step-000001/COMPLETE",
    "metrics": "run/metrics.jsonl",
    "feature shard": "cache/*/shard-*.safetensors",
    "feature index": "cache/*/index.json",
}
DAMAGES = ("corrupt", "truncate", "delete")
# The files whose damage each action reports as one clear line naming the file. Every other case
# succeeds: the action does not read the file, or recovers (resume rewrites config.yaml and
# pill.safetensors, drops unreadable metrics lines, computes damaged feature-cache entries again,
# and a checkpoint folder without its COMPLETE record is a save that never finished: resume starts
# over and replaces it).
READS = {
    "chat": {"config", "weights"},
    "eval": {"config", "weights"},
    "resume": {"checkpoint weights", "resume state", "resume tensors", "checkpoint record"},
}


def fails(action: str, target: str, damage: str) -> bool:
    return target in READS[action] and not (target == "checkpoint record" and damage == "delete")
NAMED = {"config": "config.yaml", "weights": "pill.safetensors", "checkpoint weights": "step-000001",
         "resume state": "step-000001", "resume tensors": "step-000001", "checkpoint record": "step-000001"}


@pytest.fixture(scope="module")
def base(tiny_run_config, tmp_path_factory):
    from pill.runconfig import load_config
    from pill.train.loop import train

    root = tmp_path_factory.mktemp("corruption_base")
    cfg = tiny_run_config(**{"train.cache_dir": str(root / "cache")})
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    train(load_config(root / "config.yaml"), root / "run", progress=False)
    return root


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(data[:len(data) // 2])
    else:  # flip 8 bytes in the middle: the file keeps its size
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 8]) + data[mid + 8:])


def _cli(argv, capsys) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("target", list(FILES))
def test_a_damaged_run_file_is_one_clear_line_or_a_recovery(base, tmp_path, capsys, synth_small, target, damage):
    from pill.runconfig import load_config
    from pill.train.loop import train

    root = Path(shutil.copytree(base, tmp_path / "copy"))
    run = root / "run"
    (path,) = root.glob(FILES[target])
    _damage(path, damage)

    chat = ["chat", "--run", run, "--device", "cpu", "--max-new-tokens", "1", "What is shown?"]
    evaluate = ["eval", "scienceqa", "--run", run, "--data", synth_small, "--limit", "1", "--batch-size", "1",
                "--mode", "likelihood", "--out", tmp_path / "eval", "--device", "cpu"]
    for action, argv in (("chat", chat), ("eval", evaluate)):
        code, lines = _cli(argv, capsys)
        if fails(action, target, damage):
            assert code == 1 and len(lines) == 1, (action, lines)
            assert lines[0].startswith(f"pill {argv[0]}") and NAMED[target] in lines[0], (action, lines)
        else:
            assert code == 0, (action, lines)

    config = root / "config.yaml"  # the config the run was started with, its cache in this copy
    data = yaml.safe_load(config.read_text())
    data["train"]["cache_dir"] = str(root / "cache")
    config.write_text(yaml.safe_dump(data))
    try:
        summary = train(load_config(config), run, resume=True, progress=False)
    except PillError as e:
        assert fails("resume", target, damage), f"resume failed: {e}"
        assert "\n" not in str(e) and NAMED[target] in str(e), str(e)
        return
    assert not fails("resume", target, damage), "resume ignored a damaged checkpoint"
    assert summary["steps"] == 2
    err = capsys.readouterr().err
    if target.startswith("feature") and (target, damage) != ("feature index", "delete"):
        assert "warning: feature cache" in err, err
    # the recovered run is whole again: its weights and config check out (as chat and eval load them)
    from pill.build import check_run_config, run_chain
    from pill.checkpoint import load_weights

    run_chain(run)
    load_weights(run / "pill.safetensors")
    check_run_config(run, load_config(run / "config.yaml"))
