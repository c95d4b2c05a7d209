"""Frozen encoders (one file per family) and the registry that builds them by name.

The registry imports no torch; the encoder classes load on first use.
"""
from __future__ import annotations

from .registry import (ENCODERS, EncoderEntry, encoder_names, get_encoder, load_encoder, meta_encoder,
                       register_encoder, unregister_encoder, validate_encoder_settings)

_LAZY = {"Encoder": "base", "ImageEncoder": "base", "VisualPromptGenerator": "base", "resolve_checkpoint": "hub"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Encoder", "ImageEncoder", "VisualPromptGenerator", "EncoderEntry", "ENCODERS", "encoder_names",
           "get_encoder", "load_encoder", "meta_encoder", "register_encoder", "unregister_encoder",
           "validate_encoder_settings", "resolve_checkpoint"]
