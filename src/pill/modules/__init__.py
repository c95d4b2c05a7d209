"""The plug-ins: adapters, modality experts and the attention gate."""
from .adapter import ClassicAdapter, SwiGLUAdapter, build_adapter, is_inert, mark_zero
from .experts import ModalityExperts, Routing, route
from .gate import ModalityAttentionGate

__all__ = ["SwiGLUAdapter", "ClassicAdapter", "build_adapter", "is_inert", "mark_zero", "ModalityExperts", "Routing", "route",
           "ModalityAttentionGate"]
