"""Checkpoint folders and hub ids for the encoders that load Hugging Face weights."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import PillError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resolve_checkpoint(name_or_path: str, patterns: Sequence[str] = ("*.json", "*.safetensors"),
                       prefixes: Optional[Sequence[str]] = None) -> Path:
    """A local checkpoint folder as is, or a hub id downloaded (only the files matching ``patterns``).

    ``prefixes``: of a sharded safetensors checkpoint, download only the shards that hold tensors
    whose names start with one of them (read from ``model.safetensors.index.json``): the vision
    tower and Q-Former of a BLIP-2 checkpoint without the shards of its language model."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or name_or_path.startswith((".", "/")):
        raise PillError(f"{name_or_path}: not a checkpoint folder")
    from huggingface_hub import snapshot_download

    if prefixes is None:
        return Path(snapshot_download(name_or_path, allow_patterns=list(patterns)))
    metadata = [p for p in patterns if not p.endswith(".safetensors")]
    folder = Path(snapshot_download(name_or_path, allow_patterns=metadata))
    index = folder / SAFETENSORS_INDEX
    if not index.is_file():  # a single weights file: nothing to choose
        return Path(snapshot_download(name_or_path, allow_patterns=list(patterns)))
    return Path(snapshot_download(name_or_path, allow_patterns=metadata + shards_holding(index, prefixes)))


SAFETENSORS_INDEX = "model.safetensors.index.json"


def shards_holding(index: Path, prefixes: Sequence[str]) -> list[str]:
    """The shard files of a safetensors index whose tensors include a name starting with ``prefixes``."""
    try:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PillError(f"{index}: not a safetensors index ({e})") from None
    shards = sorted({f for name, f in weight_map.items() if name.startswith(tuple(prefixes))})
    if not shards:
        raise PillError(f"{index}: no tensor starts with {', '.join(prefixes)}")
    return shards


def preprocessor_config(folder: Path) -> dict:
    """The folder's ``preprocessor_config.json`` (image size, mean, std), or {} when it has none."""
    pp = Path(folder) / "preprocessor_config.json"
    if not pp.is_file():
        return {}
    try:
        return json.loads(pp.read_text())
    except json.JSONDecodeError as e:
        raise PillError(f"{pp}: not valid JSON ({e})") from None


def load_safetensors_prefixed(folder: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Tensors of a (possibly sharded) safetensors checkpoint whose names start with ``prefixes``."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PillError(f"{folder}: no *.safetensors weight files (only safetensors checkpoints are supported)")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                if k.startswith(prefixes):
                    out[k] = st.get_tensor(k)
    return out


def check_hidden_layer(layer: int, num_hidden_layers: int, where: str) -> int:
    """``layer`` as an index into a transformer's ``hidden_states`` (embeddings + one per layer)."""
    from ..errors import ConfigError

    n = num_hidden_layers + 1
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
        raise ConfigError(f"vpg_layer: {where} has hidden states 0..{n - 1} (negative counts from the end), "
                          f"got {layer}")
    return layer
