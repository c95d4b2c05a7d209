"""CLIP / SigLIP vision tower patch tokens as visual tokens, as LLaVA uses them."""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import PillError
from .base import ImageEncoder
from .hub import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, check_hidden_layer, preprocessor_config, resolve_checkpoint

DEFAULT_LAYER = -2  # LLaVA's choice: the penultimate layer's patch tokens
# Shapes of openai/clip-vit-large-patch14-336 (LLaVA-1.5's tower), for meta-device parameter counts.
CLIP_PRESET = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768)


class ClipVPG(ImageEncoder):
    """Patch tokens of hidden layer ``layer`` (LLaVA: -2) of a CLIP or SigLIP vision tower.

    CLIP's class token is dropped, so K = (image_size / patch_size)^2 for both.
    """

    def __init__(self, vision_model, layer: int = DEFAULT_LAYER, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
        super().__init__()
        cfg = vision_model.config
        self.vision_model = vision_model
        self.layer = check_hidden_layer(layer, cfg.num_hidden_layers, cfg.model_type)
        self.has_cls = cfg.model_type.startswith("clip")
        self.image_size = cfg.image_size
        self.num_tokens = (cfg.image_size // cfg.patch_size) ** 2
        self.dim = cfg.hidden_size
        self.name = f"{cfg.model_type}-layer{layer}"
        self.mean, self.std = tuple(mean), tuple(std)
        self.freeze()

    @classmethod
    def from_pretrained(cls, name_or_path: str, layer: int = DEFAULT_LAYER, pretrained: bool = True) -> "ClipVPG":
        """Load the vision tower of a CLIP or SigLIP checkpoint (folder or hub id).

        ``pretrained=False``: the checkpoint's shapes with random weights (tests)."""
        from transformers import AutoConfig, CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

        folder = resolve_checkpoint(name_or_path)
        cfg = AutoConfig.from_pretrained(folder)
        kind = cfg.model_type
        if kind in ("clip", "clip_vision_model"):
            model_cls, config_cls, mean, std = CLIPVisionModel, CLIPVisionConfig, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        elif kind in ("siglip", "siglip_vision_model"):
            model_cls, config_cls, mean, std = SiglipVisionModel, SiglipVisionConfig, (0.5,) * 3, (0.5,) * 3
        else:
            raise PillError(f"{name_or_path}: model_type {kind!r} is not a CLIP or SigLIP checkpoint")
        model = model_cls.from_pretrained(folder) if pretrained else model_cls(config_cls.from_pretrained(folder))
        conf = preprocessor_config(folder)
        return cls(model, layer, conf.get("image_mean", mean), conf.get("image_std", std))

    @classmethod
    def build(cls, path: str, layer: Optional[int] = None, pool: Optional[int] = None,
              pretrained: bool = True) -> "ClipVPG":
        """The registry's factory (no pool choice)."""
        return cls.from_pretrained(path, DEFAULT_LAYER if layer is None else layer, pretrained=pretrained)

    @classmethod
    def meta(cls, layer: Optional[int] = None, pool: Optional[int] = None) -> "ClipVPG":
        """CLIP ViT-L/14-336 shapes without weights, for parameter counts."""
        from transformers import CLIPVisionConfig, CLIPVisionModel

        with torch.device("meta"):
            return cls(CLIPVisionModel(CLIPVisionConfig(**CLIP_PRESET)), DEFAULT_LAYER if layer is None else layer)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision_model(pixel_values=pixel_values, output_hidden_states=True)
        h = out.hidden_states[self.layer]  # (N, [1 +] P, d)
        return h[:, 1:] if self.has_cls else h  # (N, K, d)
