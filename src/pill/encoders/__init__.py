"""Frozen encoders (one file per family) and the registry that builds them by name."""
from __future__ import annotations

from .base import Encoder, ImageEncoder, VisualPromptGenerator
from .hub import resolve_checkpoint
from .registry import (ENCODERS, EncoderEntry, encoder_names, get_encoder, load_encoder, meta_encoder,
                       register_encoder, unregister_encoder, validate_encoder_settings)

__all__ = ["Encoder", "ImageEncoder", "VisualPromptGenerator", "EncoderEntry", "ENCODERS", "encoder_names",
           "get_encoder", "load_encoder", "meta_encoder", "register_encoder", "unregister_encoder",
           "validate_encoder_settings", "resolve_checkpoint"]
