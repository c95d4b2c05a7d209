"""Visual prompt generators (frozen image encoders) and a by-name loader."""
from __future__ import annotations

from typing import Optional

from ..errors import PillError
from .base import VisualPromptGenerator

VPG_NAMES = ("efficientnet-lite0", "blip2-qformer", "clip")


def load_vpg(name: str = "efficientnet-lite0", path: Optional[str] = None, *, pool: Optional[int] = None,
             pretrained: bool = True, layer: Optional[int] = None) -> VisualPromptGenerator:
    """Build a frozen VPG by name.

    Args:
        name: ``efficientnet-lite0`` (embedded default, 49 x 1280), ``blip2-qformer`` (32 x 768,
            from ``path``: a BLIP-2 checkpoint folder or hub id) or ``clip`` (CLIP/SigLIP patch
            tokens from ``path``).
        pool: EfficientNet only: average-pool the feature grid to pool x pool tokens.
        pretrained: EfficientNet only: False builds random weights (tests).
        layer: which layer's output becomes the tokens. EfficientNet: a block index (0-15;
            default: the head); CLIP: a hidden-state index (default -2, as LLaVA).
    """
    if name == "efficientnet-lite0":
        from .efficientnet import EfficientNetVPG

        return EfficientNetVPG(pretrained=pretrained, pool=pool, layer=layer)
    if name == "blip2-qformer":
        from .blip2 import Blip2VPG

        if layer is not None:
            raise PillError("vpg blip2-qformer has no layer choice (its tokens are the Q-Former's queries)")
        if path is None:
            raise PillError("vpg blip2-qformer needs a path: a BLIP-2 checkpoint folder or hub id (e.g. Salesforce/blip2-opt-2.7b)")
        return Blip2VPG.from_pretrained(path)
    if name == "clip":
        from .clip import ClipVPG

        if path is None:
            raise PillError("vpg clip needs a path: a CLIP or SigLIP checkpoint folder or hub id (e.g. openai/clip-vit-large-patch14-336)")
        return ClipVPG.from_pretrained(path, layer=-2 if layer is None else layer)
    raise PillError(f"unknown vpg {name!r}; choose one of: {', '.join(VPG_NAMES)}")


__all__ = ["VisualPromptGenerator", "load_vpg", "VPG_NAMES"]
