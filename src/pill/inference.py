"""Load a trained run and ask it about images: the three-line Python entry point.

    from pill.inference import load_run
    vlm = load_run("runs/demo/finetune")
    print(vlm.chat("What colour is the circle?", images=["shapes.png"]))
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .errors import CheckpointError


def load_run(run_dir: str | Path, device: str = "cpu", dtype: Optional[torch.dtype] = None):
    """Rebuild the model of a finished training run and load its trained plug-ins.

    Reads ``run_dir/config.yaml`` (models, plug-in config) and ``run_dir/pill.safetensors``; the
    checkpoint's fingerprints must match the base LLM and VPG loaded now. When the run started
    from an earlier stage (``init_from``), tensors that this stage did not train come from there.
    Sets ``vlm.run_info`` = {run_dir, stages, llm, vpg} and ``vlm.system_prompt`` (the run's
    ``data.system_prompt``).
    """
    from .models import fingerprint_llm
    from .train.checkpoint import WEIGHTS, load_weights
    from .train.config import load_config
    from .train.loop import build_vlm

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir}: not a pill run directory (no config.yaml)")
    if not (run_dir / WEIGHTS).is_file():
        raise CheckpointError(f"{run_dir}: the run has no {WEIGHTS} (did it finish? resume it with --resume)")
    cfg = load_config(run_dir / "config.yaml")
    m = cfg.model
    if dtype is not None:
        m.dtype = str(dtype).replace("torch.", "")
    vlm = build_vlm(cfg, device=device)
    expect = {"llm_fingerprint": fingerprint_llm(vlm.llm), "vpg_fingerprint": vlm.vpg.fingerprint()}
    chain = []
    cur: Optional[Path] = run_dir
    while cur is not None:
        chain.append(cur)
        c = load_config(cur / "config.yaml")
        cur = Path(c.init_from) if c.init_from else None
        if cur is not None and not (cur / WEIGHTS).is_file():
            raise CheckpointError(f"{chain[-1]}: starts from {cur}, which has no {WEIGHTS}")
    stages = []
    for d in reversed(chain):  # earliest stage first; later stages overwrite what they trained
        tensors, meta = load_weights(d / WEIGHTS, expect)
        vlm.load_pill_state_dict(tensors)
        stages.append(meta.get("stage", "?"))
    vlm.set_stage(cfg.stage)
    vlm.eval()
    vlm.run_info = {"run_dir": str(run_dir), "stages": stages, "llm": m.llm, "vpg": m.vpg}
    vlm.system_prompt = cfg.data.system_prompt  # chat as the run was trained
    return vlm
