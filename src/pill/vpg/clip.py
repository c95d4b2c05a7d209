"""CLIP / SigLIP vision tower patch tokens as visual tokens, as LLaVA uses them."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import PillError
from .base import VisualPromptGenerator
from .blip2 import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, _resolve


class ClipVPG(VisualPromptGenerator):
    """Patch tokens of hidden layer ``layer`` (LLaVA: -2) of a CLIP or SigLIP vision tower.

    CLIP's class token is dropped, so K = (image_size / patch_size)^2 for both.
    """

    def __init__(self, vision_model, layer: int = -2, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
        super().__init__()
        cfg = vision_model.config
        self.vision_model = vision_model
        self.layer = layer
        self.has_cls = cfg.model_type.startswith("clip")
        self.image_size = cfg.image_size
        self.num_tokens = (cfg.image_size // cfg.patch_size) ** 2
        self.dim = cfg.hidden_size
        self.name = f"{cfg.model_type}-layer{layer}"
        self.mean, self.std = tuple(mean), tuple(std)
        self.freeze()

    @classmethod
    def from_pretrained(cls, name_or_path: str, layer: int = -2) -> "ClipVPG":
        """Load the vision tower of a CLIP or SigLIP checkpoint (folder or hub id)."""
        from transformers import AutoConfig, CLIPVisionModel, SiglipVisionModel

        folder = _resolve(name_or_path, ["*.json", "*.safetensors"])
        cfg = AutoConfig.from_pretrained(folder)
        kind = cfg.model_type
        if kind in ("clip", "clip_vision_model"):
            model = CLIPVisionModel.from_pretrained(folder)
            mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        elif kind in ("siglip", "siglip_vision_model"):
            model = SiglipVisionModel.from_pretrained(folder)
            mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        else:
            raise PillError(f"{name_or_path}: model_type {kind!r} is not a CLIP or SigLIP checkpoint")
        pp = folder / "preprocessor_config.json"
        if pp.is_file():
            conf = json.loads(pp.read_text())
            mean, std = conf.get("image_mean", mean), conf.get("image_std", std)
        return cls(model, layer, mean, std)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision_model(pixel_values=pixel_values, output_hidden_states=True)
        h = out.hidden_states[self.layer]  # (N, [1 +] P, d)
        return h[:, 1:] if self.has_cls else h  # (N, K, d)
