"""BLIP-2 visual prompt generator: EVA-CLIP ViT + Q-Former + learned queries -> K = 32 tokens of width 768.

Only the vision tower, the Q-Former and the query tokens are loaded from a BLIP-2
checkpoint (a local folder or a hub id); its language model is never built.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..errors import PillError
from .base import VisualPromptGenerator

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Shapes of Salesforce/blip2-opt-2.7b (EVA-CLIP ViT-g/14 + Q-Former), for meta-device parameter counts.
BLIP2_PRESET = {
    "vision_config": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
                      "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
    "qformer_config": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                       "intermediate_size": 3072, "encoder_hidden_size": 1408, "cross_attention_frequency": 2},
    "num_query_tokens": 32,
}


def _resolve(name_or_path: str, patterns: list[str]) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or name_or_path.startswith((".", "/")):
        raise PillError(f"{name_or_path}: not a checkpoint folder")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, allow_patterns=patterns))


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


class Blip2VPG(VisualPromptGenerator):
    """BLIP-2 Q-Former output as visual tokens: (N, num_query_tokens, qformer hidden size)."""

    name = "blip2-qformer"
    mean = OPENAI_CLIP_MEAN
    std = OPENAI_CLIP_STD

    def __init__(self, config):
        super().__init__()
        from transformers import Blip2QFormerModel, Blip2VisionModel

        self.vision_model = Blip2VisionModel(config.vision_config)
        self.qformer = Blip2QFormerModel(config.qformer_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.num_tokens = config.num_query_tokens
        self.dim = config.qformer_config.hidden_size
        self.image_size = config.vision_config.image_size
        self.freeze()

    @classmethod
    def from_preset(cls, device: str = "meta") -> "Blip2VPG":
        """The BLIP-2 (ViT-g + Q-Former) shapes without weights, for parameter and memory counts."""
        from transformers import Blip2Config

        cfg = Blip2Config(vision_config=BLIP2_PRESET["vision_config"], qformer_config=BLIP2_PRESET["qformer_config"],
                          num_query_tokens=BLIP2_PRESET["num_query_tokens"])
        with torch.device(device):
            return cls(cfg)

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "Blip2VPG":
        """Load from a BLIP-2 checkpoint folder (config.json + safetensors) or a hub id."""
        from transformers import Blip2Config

        folder = _resolve(name_or_path, ["*.json", "*.safetensors"])
        cfg = Blip2Config.from_pretrained(folder)
        vpg = cls(cfg)
        state = load_safetensors_prefixed(folder, ("vision_model.", "qformer.", "query_tokens"))
        missing, unexpected = vpg.load_state_dict(state, strict=False)
        missing = [m for m in missing if not m.endswith("position_ids")]
        if missing:
            raise PillError(f"{folder}: BLIP-2 checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
        pp = folder / "preprocessor_config.json"
        if pp.is_file():
            conf = json.loads(pp.read_text())
            vpg.mean = tuple(conf.get("image_mean", vpg.mean))
            vpg.std = tuple(conf.get("image_std", vpg.std))
        return vpg.freeze()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (N, P, d_vit)
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)  # (N, K, 768)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=mask)
        return out.last_hidden_state  # (N, K, 768)
