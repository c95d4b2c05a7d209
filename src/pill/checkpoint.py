"""Checkpoints: trained tensors only (safetensors) + config + base-model fingerprints; resume states.

Layout of a run directory::

    config.yaml               the resolved training config
    pill.safetensors          the trained tensors of the finished stage (metadata: version, stage,
                              fingerprints, config)
    metrics.jsonl             one JSON object per logged step
    checkpoints/step-000100/  resumable states: pill.safetensors + state.pt (optimizer, scheduler,
                              RNG states, data position); the last ``keep_last`` are kept

Every write goes to a temporary name first and is then renamed into place, so a
crash during a save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CheckpointError

WEIGHTS = "pill.safetensors"
STATE = "state.pt"
COMPLETE = "COMPLETE"


def _encode_metadata(metadata: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata is str -> str: JSON-encode every non-string value."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write ``tensors`` to ``path`` atomically; metadata values are JSON-encoded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = _encode_metadata(metadata)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_metadata(path: str | Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file not found") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({e})") from None
    out = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[k] = v
    return out


def load_weights(path: str | Path, expect: Optional[dict[str, str]] = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a weights file; ``expect`` maps fingerprint keys (``llm_fingerprint``, ...) to the
    current model's values and a mismatch raises CheckpointError naming both."""
    meta = read_metadata(path)
    for key, value in (expect or {}).items():
        if key in meta and meta[key] != value:
            raise CheckpointError(
                f"{path}: trained for a different base model ({key} {meta[key]} in the checkpoint, "
                f"{value} for the model loaded now; model in the checkpoint: {meta.get('model', '?')})")
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    return tensors, meta


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_resume_state(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], metadata: dict,
                      state: dict, keep_last: int) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically (temporary folder, then rename); prune old ones."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step-{step:06d}."))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS),
                  metadata=_encode_metadata(metadata))
        torch.save(state, tmp / STATE)
        (tmp / COMPLETE).write_text(str(step))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete resumable checkpoints, oldest first (half-written temporary folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / COMPLETE).is_file() and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_resume_state(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, _ = load_weights(ckpt / WEIGHTS)
    try:
        state = torch.load(ckpt / STATE, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{ckpt / STATE}: cannot read resume state ({e})") from None
    return tensors, state
