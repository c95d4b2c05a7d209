"""pill: plug a frozen vision encoder into a frozen LLM with adapter experts and attention gates."""
from .config import PillConfig
from .errors import ConfigError, DataError, PillError
from .plug import plug, set_stage, unplug

__version__ = "0.1.0"


def __getattr__(name):  # heavy modules load on first use
    if name == "PillVLM":
        from .vlm import PillVLM

        return PillVLM
    if name == "PillProcessor":
        from .processor import PillProcessor

        return PillProcessor
    raise AttributeError(name)


__all__ = ["PillConfig", "PillVLM", "PillProcessor", "plug", "unplug", "set_stage",
           "PillError", "ConfigError", "DataError", "__version__"]
