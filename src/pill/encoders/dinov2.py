"""DINOv2 patch tokens of a chosen hidden layer as visual tokens (self-supervised ViT; no text tower).

Loaded from a ``Dinov2Model`` (or ``Dinov2WithRegistersModel``) checkpoint folder or hub id. The class
token and any register tokens are dropped, so K = (image_size / patch_size)^2; the image size, mean
and std come from the checkpoint's ``preprocessor_config.json`` (its crop size) or, without one,
from its config and the ImageNet statistics.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import PillError
from .base import ImageEncoder
from .hub import check_hidden_layer, preprocessor_config, resolve_checkpoint

DEFAULT_LAYER = -2  # the penultimate layer, as for CLIP (and prismatic-vlms' DINO features)
# Shapes of facebook/dinov2-large (ViT-L/14; position embeddings for 518 px, used at 224 px), for
# meta-device parameter counts.
DINOV2_PRESET = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
                     patch_size=14, image_size=518)
DINOV2_PRESET_IMAGE_SIZE = 224
_MODELS = {"dinov2": ("Dinov2Config", "Dinov2Model"),
           "dinov2_with_registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel")}


def _side(value, default: int) -> int:
    """A preprocessor size entry (an int, or ``{"height", "width"}`` / ``{"shortest_edge"}``) as one side."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return int(value.get("height") or value.get("shortest_edge") or default)
    return default


class Dinov2VPG(ImageEncoder):
    """Patch tokens of hidden layer ``layer`` (default -2) of a DINOv2 ViT: (N, (S / patch)^2, hidden size)."""

    def __init__(self, model, layer: int = DEFAULT_LAYER, image_size: Optional[int] = None,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        super().__init__()
        cfg = model.config
        self.model = model
        self.layer = check_hidden_layer(layer, cfg.num_hidden_layers, cfg.model_type)
        self.skip = 1 + getattr(cfg, "num_register_tokens", 0)  # class token, then register tokens
        self.image_size = image_size or cfg.image_size
        self.num_tokens = (self.image_size // cfg.patch_size) ** 2
        self.dim = cfg.hidden_size
        self.name = f"{cfg.model_type}-layer{layer}"
        self.mean = tuple(mean or self.mean)
        self.std = tuple(std or self.std)
        self.freeze()

    @classmethod
    def from_pretrained(cls, name_or_path: str, layer: int = DEFAULT_LAYER, pretrained: bool = True) -> "Dinov2VPG":
        """Load a DINOv2 checkpoint (folder or hub id); ``pretrained=False``: its shapes, random weights."""
        import transformers

        folder = resolve_checkpoint(name_or_path)
        cfg = transformers.AutoConfig.from_pretrained(folder)
        if cfg.model_type not in _MODELS:
            raise PillError(f"{name_or_path}: model_type {cfg.model_type!r} is not a DINOv2 checkpoint "
                            f"({' or '.join(_MODELS)})")
        model_cls = getattr(transformers, _MODELS[cfg.model_type][1])
        model = model_cls.from_pretrained(folder) if pretrained else model_cls(cfg)
        conf = preprocessor_config(folder)
        size = _side(conf.get("crop_size") if conf.get("do_center_crop", True) else None,
                     _side(conf.get("size"), cfg.image_size))
        return cls(model, layer, size, conf.get("image_mean"), conf.get("image_std"))

    @classmethod
    def build(cls, path: str, layer: Optional[int] = None, pool: Optional[int] = None,
              pretrained: bool = True) -> "Dinov2VPG":
        """The registry's factory (no pool choice)."""
        return cls.from_pretrained(path, DEFAULT_LAYER if layer is None else layer, pretrained=pretrained)

    @classmethod
    def meta(cls, layer: Optional[int] = None, pool: Optional[int] = None) -> "Dinov2VPG":
        """DINOv2 ViT-L/14 shapes without weights, for parameter counts."""
        from transformers import Dinov2Config, Dinov2Model

        with torch.device("meta"):
            model = Dinov2Model(Dinov2Config(**DINOV2_PRESET))
            return cls(model, DEFAULT_LAYER if layer is None else layer, DINOV2_PRESET_IMAGE_SIZE)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        h = out.hidden_states[self.layer]  # (N, 1 + registers + P, d)
        return h[:, self.skip:]  # (N, K, d)
