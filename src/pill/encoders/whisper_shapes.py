"""Whisper's limits that configs are checked against, importable without torch (``pill --help`` and
config validation read them through the encoder registry)."""
from __future__ import annotations

from typing import Optional

MAX_POOL = 50  # one token per second
MAX_SECONDS = 30.0  # Whisper's input window


def whisper_pools(layer: Optional[int] = None) -> range:
    """The frame-pooling factors a Whisper encoder accepts (50 frames per second of audio)."""
    return range(1, MAX_POOL + 1)


__all__ = ["MAX_POOL", "MAX_SECONDS", "whisper_pools"]
