"""BLIP-2 visual prompt generator: EVA-CLIP ViT + Q-Former + learned queries -> K = 32 tokens of width 768.

Only the vision tower, the Q-Former and the query tokens are loaded from a BLIP-2
checkpoint (a local folder or a hub id, of which only the shards holding them are downloaded);
its language model is never built.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..errors import PillError
from .base import ImageEncoder
from .hub import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, load_safetensors_prefixed, preprocessor_config, resolve_checkpoint

# Shapes of Salesforce/blip2-opt-2.7b (EVA-CLIP ViT-g/14 + Q-Former), for meta-device parameter counts.
BLIP2_PRESET = {
    "vision_config": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
                      "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
    "qformer_config": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                       "intermediate_size": 3072, "encoder_hidden_size": 1408, "cross_attention_frequency": 2},
    "num_query_tokens": 32,
}


# What pill reads of a BLIP-2 checkpoint; from a hub id only the shards holding these are downloaded
# (blip2-flan-t5-xxl's language model is most of its size).
WEIGHT_PREFIXES = ("vision_model.", "qformer.", "query_tokens")


class Blip2VPG(ImageEncoder):
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
    def from_pretrained(cls, name_or_path: str, pretrained: bool = True) -> "Blip2VPG":
        """Load from a BLIP-2 checkpoint folder (config.json + safetensors) or a hub id.

        ``pretrained=False``: the checkpoint's shapes with random weights (tests)."""
        from transformers import Blip2Config

        folder = resolve_checkpoint(name_or_path, patterns=("*.json", "*.safetensors") if pretrained else ("*.json",),
                                    prefixes=WEIGHT_PREFIXES if pretrained else None)
        cfg = Blip2Config.from_pretrained(folder)
        vpg = cls(cfg)
        if pretrained:
            state = load_safetensors_prefixed(folder, WEIGHT_PREFIXES)
            missing, unexpected = vpg.load_state_dict(state, strict=False)
            missing = [m for m in missing if not m.endswith("position_ids")]
            if missing:
                raise PillError(f"{folder}: BLIP-2 checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
        conf = preprocessor_config(folder)
        vpg.mean = tuple(conf.get("image_mean", vpg.mean))
        vpg.std = tuple(conf.get("image_std", vpg.std))
        return vpg.freeze()

    @classmethod
    def build(cls, path: str, layer: Optional[int] = None, pool: Optional[int] = None,
              pretrained: bool = True) -> "Blip2VPG":
        """The registry's factory (BLIP-2 has no layer or pool choice)."""
        return cls.from_pretrained(path, pretrained=pretrained)

    @classmethod
    def meta(cls, layer: Optional[int] = None, pool: Optional[int] = None) -> "Blip2VPG":
        return cls.from_preset("meta")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (N, P, d_vit)
        mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)  # (N, K, 768)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=mask)
        return out.last_hidden_state  # (N, K, 768)
