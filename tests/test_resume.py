"""Resuming a run: its state loads without running code, and a resumed run is the run it claims to be."""
from __future__ import annotations

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
    with pytest.raises(CheckpointError, match="cannot read resume state"):
        load_resume_state(ckpt)
    (ckpt / "state.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="state.json"):
        load_resume_state(ckpt)
