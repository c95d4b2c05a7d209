"""The plug-ins: adapters, modality experts and the attention gate."""
from .adapter import ClassicAdapter, SwiGLUAdapter, build_adapter, is_inert
from .experts import ModalityExperts, Routing, route
from .gate import ModalityAttentionGate

__all__ = ["SwiGLUAdapter", "ClassicAdapter", "build_adapter", "is_inert", "ModalityExperts", "Routing", "route",
           "ModalityAttentionGate"]
