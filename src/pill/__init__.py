"""pill: plug a frozen vision encoder into a frozen LLM with adapter experts and attention gates."""
from .config import PillConfig
from .errors import ConfigError, DataError, PillError

__version__ = "0.1.0"

# Torch-heavy names load on first use, so that `import pill.data` stays light.
_LAZY = {"PillVLM": "pill.vlm", "PillProcessor": "pill.processor", "plug": "pill.plug",
         "unplug": "pill.plug", "set_stage": "pill.plug", "load_run": "pill.build"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pill' has no attribute {name!r}")


__all__ = ["PillConfig", "PillVLM", "PillProcessor", "plug", "unplug", "set_stage", "load_run",
           "PillError", "ConfigError", "DataError", "__version__"]
