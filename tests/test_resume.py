"""Resuming a run: its state loads without running code, and a resumed run is the run it claims to be."""
from __future__ import annotations

import hashlib
import json
import random
import shutil

import numpy as np
import pytest
import torch

from pill.errors import CheckpointError


class _WritesAFile:
    """Unpickling this writes ``path``: what a planted ``state.pt`` could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('ran')",)


def _plant_pickle(ckpt, marker):
    torch.save({"optimizer": _WritesAFile(marker), "step": 1}, ckpt / "state.pt")
    # the planted file does run code when unpickled the way earlier versions read it
    probe = marker.with_name("probe")
    torch.save(_WritesAFile(probe), ckpt.parent / "probe.pt")
    torch.load(ckpt.parent / "probe.pt", weights_only=False)
    assert probe.read_text() == "ran"
    (ckpt.parent / "probe.pt").unlink()


def test_a_pickled_resume_state_is_refused_and_runs_no_code(run_copy, tmp_path):
    from pill.runconfig import load_config
    from pill.train.loop import train

    run, config = run_copy
    (run / "pill.safetensors").unlink()  # an unfinished run: step 1 is its last checkpoint
    ckpt = run / "checkpoints" / "step-000001"
    for name in ("state.json", "state.safetensors"):  # a checkpoint in the old, pickled format
        (ckpt / name).unlink(missing_ok=True)
    marker = tmp_path / "pwned"
    _plant_pickle(ckpt, marker)
    with pytest.raises(CheckpointError, match=r"state\.pt: a pickled resume state.*can run code"):
        train(load_config(config), run, resume=True, progress=False)
    assert not marker.exists()
    assert not (run / "pill.safetensors").exists()


def test_a_pickle_planted_beside_the_state_is_never_read(run_copy, tmp_path):
    from pill.runconfig import load_config
    from pill.train.loop import train

    run, config = run_copy
    (run / "pill.safetensors").unlink()
    marker = tmp_path / "pwned"
    _plant_pickle(run / "checkpoints" / "step-000001", marker)
    summary = train(load_config(config), run, resume=True, progress=False)
    assert summary["steps"] == 2 and (run / "pill.safetensors").is_file()
    assert not marker.exists()


def test_resume_state_round_trip_is_exact():
    from pill.checkpoint import decode_state, encode_state, rng_state

    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.95))
    p.grad = torch.randn(3, 4)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    random.random(), np.random.rand(), torch.rand(1)
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": [rng_state()], "step": 7}
    text, payload = encode_state(state)
    back = decode_state(text, payload)
    assert back["step"] == 7 and back["scheduler"] == sched.state_dict()
    assert back["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]  # tuples stay tuples
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(back["optimizer"]["state"][0][k], v)
    r = back["rng"][0]
    assert r["python"] == random.getstate() and torch.equal(r["torch"], torch.get_rng_state())
    np_now = np.random.get_state()
    assert r["numpy"][0] == np_now[0] and np.array_equal(r["numpy"][1], np_now[1]) and r["numpy"][2:] == np_now[2:]
    random.setstate(r["python"])  # accepted as they are
    np.random.set_state(r["numpy"])
    json.loads(text)  # plain JSON


def test_a_malformed_resume_state_is_a_clear_error(run_copy):
    from pill.checkpoint import load_resume_state

    run, _ = run_copy
    ckpt = run / "checkpoints" / "step-000001"
    (ckpt / "state.json").write_text('{"step": {"__tensor__": "999"}}')
    with pytest.raises(CheckpointError, match=r"state\.json: damaged .*delete step-000001"):
        load_resume_state(ckpt)
    complete = json.loads((ckpt / "COMPLETE").read_text())
    for text in ('{"step": {"__tensor__": "999"}}', "[1, 2]"):  # recorded as it is: still refused, clearly
        (ckpt / "state.json").write_text(text)
        complete["sha256"]["state.json"] = hashlib.sha256(text.encode()).hexdigest()
        (ckpt / "COMPLETE").write_text(json.dumps(complete))
        with pytest.raises(CheckpointError, match=r"state\.json: (cannot read resume state|not a pill resume)"):
            load_resume_state(ckpt)


# -- a resumed run is the run it claims to be -------------------------------------------------

def _changed_config(config, tmp_path, changes: dict):
    import yaml

    data = yaml.safe_load(config.read_text())
    for key, value in changes.items():
        *sections, last = key.split(".")
        node = data
        for part in sections:
            node = node.setdefault(part, {})
        node[last] = value
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("changes, shown", [
    ({"model.llm": "qwen2"}, "model.llm 'llama' -> 'qwen2'"),
    ({"model.pool": 1}, "model.pool 2 -> 1"),
    ({"optim.lr": 1.0e-3}, "optim.lr 0.003 -> 0.001"),
    ({"optim.batch_size": 2}, "optim.batch_size 4 -> 2"),
    ({"train.seed": 1}, "train.seed 0 -> 1"),
    ({"pill.r": 8}, "pill.r 32 -> 8"),
    ({"stage": "align"}, "stage 'finetune' -> 'align'"),
    ({"pill.layers": [0]}, "pill.layers None -> [0]"),
    ({"optim.lr": 1.0e-3, "train.seed": 1}, "optim.lr 0.003 -> 0.001; train.seed 0 -> 1"),
])
def test_resume_refuses_a_config_that_changes_the_run(run_copy, tmp_path, changes, shown):
    from pill.runconfig import load_config
    from pill.train.loop import TrainingError, train

    run, config = run_copy
    (run / "pill.safetensors").unlink()
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(TrainingError, match="changes the run") as e:
        train(load_config(_changed_config(config, tmp_path, changes)), run, resume=True, progress=False)
    assert shown in str(e.value)
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # config.yaml, checkpoints and metrics untouched


def test_safe_changes_are_logged_and_metrics_do_not_repeat_steps(run_copy, tmp_path, capsys):
    from pill.runconfig import load_config
    from pill.train.loop import train

    run, config = run_copy
    (run / "pill.safetensors").unlink()  # killed after step 2 was logged, before it was saved
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    stale = run / "checkpoints" / ".step-000002.abcd"  # a save cut short by the kill
    stale.mkdir()
    (stale / "pill.safetensors").write_bytes(b"half")
    (run / ".pill.safetensors.123.ab12cd34.tmp").write_bytes(b"half")
    path = _changed_config(config, tmp_path, {"optim.max_steps": 3, "train.log_every": 1, "train.save_every": 5})
    summary = train(load_config(path), run, resume=True, progress=False)
    out = capsys.readouterr().out
    assert "resume: optim.max_steps None -> 3" in out and "resume: train.save_every 1 -> 5" in out
    assert "removed 2 temporary files" in out and not stale.exists()
    assert not list(run.glob(".*.tmp"))
    assert summary["steps"] == 3
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert load_config(run / "config.yaml").optim.max_steps == 3


def test_resume_onto_another_base_model_is_refused(run_copy):
    from pill.build import build_vlm
    from pill.runconfig import load_config
    from pill.train.loop import train

    run, config = run_copy
    cfg = load_config(config)
    vlm = build_vlm(cfg)
    with torch.no_grad():  # the same config, other base weights
        vlm.llm.get_input_embeddings().weight.add_(1.0)
    with pytest.raises(CheckpointError, match="different base model"):
        train(cfg, run, resume=True, vlm=vlm, progress=False)

