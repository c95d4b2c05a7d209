"""Checkpoints: trained tensors only (safetensors) + config + base-model fingerprints; resume states.

Layout of a run directory::

    config.yaml               the resolved training config
    pill.safetensors          the trained tensors of the finished stage (metadata: version, stage,
                              fingerprints, config)
    metrics.jsonl             one JSON object per logged step
    checkpoints/step-000100/  resumable states: pill.safetensors + state.json and state.safetensors
                              (optimizer, scheduler, RNG states, data position) + COMPLETE (the
                              step and each file's SHA-256, written last); the last ``keep_last``
                              are kept

Nothing in a run directory is unpickled: a resume state is JSON plus a safetensors file of its
tensors, so a planted file can never run code when it is loaded. Every write goes to a temporary
name first, is fsynced and then renamed into place, so a crash or a full disk during a save leaves
the previous checkpoint intact; tensors with non-finite values are never written.
"""
from __future__ import annotations

import hashlib
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
from safetensors.torch import load as load_safetensors_bytes, save as safetensors_bytes

from .errors import CheckpointError
from .io import fsync_dir, write_atomic

WEIGHTS = "pill.safetensors"
STATE = "state.json"  # the resume state; its tensors are in STATE_TENSORS
STATE_TENSORS = "state.safetensors"
LEGACY_STATE = "state.pt"  # pickled states of earlier versions: refused, unpickling can run code
COMPLETE = "COMPLETE"


def _encode_metadata(metadata: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata is str -> str: JSON-encode every non-string value."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _check_finite(tensors: dict[str, torch.Tensor], where: Path) -> None:
    bad = nonfinite(tensors)
    if bad:
        raise CheckpointError(f"{where}: not written, {len(bad)} tensors hold NaN or infinite values "
                              f"(e.g. {', '.join(bad[:3])})")


DIGEST = "tensors_sha256"  # metadata key: SHA-256 of the tensors (names, dtypes, shapes, bytes)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of ``tensors``: names, dtypes, shapes and raw bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _safetensors_payload(tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, Any]] = None) -> bytes:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {**(metadata or {}), DIGEST: tensors_digest(tensors)}
    return safetensors_bytes(tensors, metadata=_encode_metadata(meta))


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write ``tensors`` to ``path`` atomically (:func:`pill.io.write_atomic`); metadata values are
    JSON-encoded. Non-finite tensors are refused (CheckpointError), and so is a failed write: the
    file there before, if any, stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_finite(tensors, path)
    try:
        write_atomic(path, _safetensors_payload(tensors, metadata))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write the trained tensors ({e.strerror or e}); the file there "
                              "before, if any, is untouched") from None


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
        if k == DIGEST:
            out[k] = v
            continue
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
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({e})") from None
    if DIGEST in meta and tensors_digest(tensors) != meta[DIGEST]:
        raise CheckpointError(f"{path}: damaged (its tensors differ from the SHA-256 recorded when it was saved)")
    bad = nonfinite(tensors)
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} tensors hold NaN or infinite values (e.g. {', '.join(bad[:3])})")
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


# -- resume states as JSON + safetensors -----------------------------------------------------------
# JSON has no tuples, no integer keys and no arrays; those are tagged so that a state comes back
# exactly as it was saved (the RNG states need their tuples, the optimizer state its integer keys).

_NDARRAY_DTYPES = {"uint32", "int32", "int64", "uint8", "float32", "float64"}


def _pack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if torch.is_tensor(obj):
        key = str(len(tensors))
        tensors[key] = obj.detach().contiguous().cpu()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        if str(obj.dtype) not in _NDARRAY_DTYPES:
            raise TypeError(f"resume state: cannot store a numpy array of {obj.dtype}")
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_pack(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_pack(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _pack(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_pack(k, tensors), _pack(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"resume state: cannot store a {type(obj).__name__}")


def _unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_unpack(v, tensors) for v in obj["__tuple__"])
    if "__ndarray__" in obj:
        if obj.get("dtype") not in _NDARRAY_DTYPES:
            raise ValueError(f"unexpected array dtype {obj.get('dtype')!r}")
        return np.array(obj["__ndarray__"], dtype=obj["dtype"])
    if "__items__" in obj:
        return {_unpack(k, tensors): _unpack(v, tensors) for k, v in obj["__items__"]}
    return {k: _unpack(v, tensors) for k, v in obj.items()}


def encode_state(state: dict) -> tuple[str, bytes]:
    """A resume state (nested dicts, lists, tuples, numbers, tensors, numpy arrays) -> (JSON text,
    safetensors bytes of its tensors)."""
    text, tensors = _encode_state(state)
    return text, _safetensors_payload(tensors)


def _encode_state(state: dict) -> tuple[str, dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}
    return json.dumps(_pack(state, tensors)), tensors


def decode_state(text: str, payload: bytes) -> dict:
    """Inverse of :func:`encode_state`; reading it runs no code (JSON and safetensors only)."""
    return _unpack(json.loads(text), load_safetensors_bytes(payload))


def save_resume_state(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], metadata: dict,
                      state: dict, keep_last: int) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically (temporary folder, then rename); prune old ones.

    Tensors with non-finite values (weights or optimizer moments) are refused with a
    CheckpointError, and so is a failed write (a full disk): the checkpoints already there stay."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:06d}"
    text, state_tensors = _encode_state(state)
    _check_finite(tensors, final / WEIGHTS)
    _check_finite(state_tensors, final / STATE_TENSORS)
    payload = _safetensors_payload(state_tensors)
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step-{step:06d}."))
        files = {WEIGHTS: _safetensors_payload(tensors, metadata), STATE_TENSORS: payload,
                 STATE: text.encode("utf-8")}
        for name, data in files.items():
            write_atomic(tmp / name, data)
        # written last: the step and the SHA-256 of each file, checked when the checkpoint is resumed
        write_atomic(tmp / COMPLETE, json.dumps({"step": step, "sha256": {n: hashlib.sha256(d).hexdigest()
                                                                          for n, d in files.items()}}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except OSError as e:
        kept = [p.name for p in list_checkpoints(run_dir) if p != final]
        raise CheckpointError(f"{root}: cannot save the checkpoint of step {step} ({e.strerror or e}); the "
                              f"checkpoints already there are intact ({', '.join(kept) or 'none yet'})") from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete resumable checkpoints, oldest first (half-written temporary folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / COMPLETE).is_file() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete what an interrupted save left behind in ``run_dir`` (``checkpoints/.step-*`` folders,
    ``.*.tmp`` files); returns the paths removed. Call only when no other process trains this run."""
    run_dir = Path(run_dir)
    found = list((run_dir / "checkpoints").glob(".step-*")) + list(run_dir.glob(".*.tmp"))
    for p in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


def _verify_files(ckpt: Path) -> None:
    """Compare each file of a checkpoint folder with the SHA-256 its ``COMPLETE`` file recorded."""
    try:
        record = json.loads((ckpt / COMPLETE).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{ckpt / COMPLETE}: unreadable ({e}); delete {ckpt.name} to resume from the "
                              "checkpoint before it") from None
    digests = record.get("sha256") if isinstance(record, dict) else None
    if not isinstance(digests, dict):
        raise CheckpointError(f"{ckpt / COMPLETE}: records no file digests; delete {ckpt.name} to resume from the "
                              "checkpoint before it")
    for name in (WEIGHTS, STATE_TENSORS, STATE):
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing, so {ckpt.name} cannot be resumed (delete the folder to resume "
                                  "from the checkpoint before it)")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digests.get(name):
            raise CheckpointError(f"{path}: damaged (its SHA-256 differs from the one recorded when it was saved); "
                                  f"delete {ckpt.name} to resume from the checkpoint before it")


def load_resume_state(ckpt: Path, expect: Optional[dict[str, str]] = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The trained tensors and the resume state (``optimizer``, ``scheduler``, ``rng``, ``step``) of
    a checkpoint folder. ``expect``: fingerprints, as for :func:`load_weights`. A pickled state of
    an older pill (``state.pt``) is refused, never unpickled."""
    ckpt = Path(ckpt)
    if not (ckpt / STATE).is_file() and (ckpt / LEGACY_STATE).is_file():
        raise CheckpointError(f"{ckpt / LEGACY_STATE}: a pickled resume state, which pill does not load because "
                              "unpickling can run code; resume from a checkpoint written by this version, or "
                              "start the run again")
    _verify_files(ckpt)
    tensors, _ = load_weights(ckpt / WEIGHTS, expect)
    try:
        state = decode_state((ckpt / STATE).read_text(encoding="utf-8"), (ckpt / STATE_TENSORS).read_bytes())
        if not isinstance(state, dict):
            raise ValueError("the top level is not a mapping")
        missing = [k for k in ("optimizer", "scheduler", "rng", "step") if k not in state]
    except FileNotFoundError as e:
        raise CheckpointError(f"{e.filename}: missing, so {ckpt.name} cannot be resumed (delete the folder to "
                              "resume from the checkpoint before it)") from None
    except Exception as e:
        raise CheckpointError(f"{ckpt / STATE}: cannot read resume state ({type(e).__name__}: {e}); delete "
                              f"{ckpt.name} to resume from the checkpoint before it") from None
    if missing or not isinstance(state.get("step"), int) or not state.get("rng"):
        raise CheckpointError(f"{ckpt / STATE}: not a pill resume state (missing {', '.join(missing) or 'step/rng'})")
    return tensors, state
