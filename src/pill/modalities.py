"""The modality registry: what a non-text input is called, where it sits in a prompt, how it is read.

Every token of a prompt carries a modality id (design note, section 1): text is 0, and each
registered modality has its own id, placeholder, expert (the MoMAE expert of the same index),
encoder and projector. Image is one entry; adding a modality is one :func:`register_modality`
call plus its encoder; audio (id 2, ``<audio>``) is the second entry. This module stays import-light (no torch): data loaders use it.

A modality's placeholder (``<image>``) becomes ``num_tokens`` slot tokens of its id in the
tokenised prompt (:class:`pill.processor.PillProcessor`); batches carry its preprocessed inputs
under ``inputs_key`` (``pixel_values``), cached encoder features under ``features_key``
(``image_features``) and the inputs' cache references under ``refs_key`` (``image_keys``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from .errors import ConfigError

TEXT = 0


@dataclass(frozen=True)
class Modality:
    """One non-text modality.

    Attributes:
        name: the key in configs and samples (``image``); LLaVA JSON reads ``field`` (``image``).
        id: its modality id (>= 1) and the index of its MoMAE expert.
        placeholder: the prompt text that marks where one input goes (``<image>``).
        load: ``load(ref, name=None, **options) -> decoded input`` (a path or encoded bytes -> a PIL
            image); a DataError names ``name`` (else the path). ``pill serve`` passes an upload's
            file name and, for the image, its pixel limit and stored size as ``options``.
        noun: singular word for messages ("image").
        field: the LLaVA JSON key of the inputs' paths (default: ``name``).
        batch_key: the batch key of the preprocessed inputs (default ``<name>_values``).
        mime: the media-type family of its files (``image``): ``pill serve`` takes uploads sent as
            ``<mime>/*`` (or ``application/octet-stream``) and its page's file chooser filters on it.
        describe: ``decoded input -> dict`` of facts shown with an upload (an image's width and
            height; ``summary``: a short text such as ``"96 × 96"``); None: nothing to add.
    """

    name: str
    id: int
    placeholder: str
    load: Callable[..., Any]
    noun: str = ""
    field: str = ""
    batch_key: str = ""
    mime: str = ""
    describe: Optional[Callable[[Any], dict]] = None

    @property
    def inputs_key(self) -> str:
        return self.batch_key or f"{self.name}_values"

    @property
    def json_field(self) -> str:
        return self.field or self.name

    @property
    def features_key(self) -> str:
        return f"{self.name}_features"

    @property
    def refs_key(self) -> str:
        return f"{self.name}_keys"

    @property
    def label(self) -> str:
        return self.noun or self.name


_BY_NAME: dict[str, Modality] = {}


def register_modality(m: Modality) -> Modality:
    """Add ``m`` to the registry; its name, id and placeholder must all be new."""
    if m.id < 1:
        raise ConfigError(f"modality {m.name!r}: id must be >= 1 (0 is text), got {m.id}")
    for other in _BY_NAME.values():
        if m.name == other.name or m.id == other.id or m.placeholder == other.placeholder:
            raise ConfigError(f"modality {m.name!r} (id {m.id}, {m.placeholder}) clashes with the registered "
                              f"modality {other.name!r} (id {other.id}, {other.placeholder})")
    _BY_NAME[m.name] = m
    return m


def unregister_modality(name: str) -> None:
    """Remove a registered modality (tests and plug-in packages that add their own)."""
    _BY_NAME.pop(name, None)


def modality(name: str) -> Modality:
    """The registered modality ``name``; ConfigError lists the known ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown modality {name!r}; registered: {', '.join(_BY_NAME)}") from None


def modality_by_id(mid: int) -> Optional[Modality]:
    return next((m for m in _BY_NAME.values() if m.id == mid), None)


def modalities() -> list[Modality]:
    """Every registered modality, by id."""
    return sorted(_BY_NAME.values(), key=lambda m: m.id)


def next_free_id() -> int:
    return 1 + max((m.id for m in _BY_NAME.values()), default=0)


def _load_image(ref, **kw):
    from .data.images import load_image

    return load_image(ref, **kw)


def _describe_image(img) -> dict:
    from .data.images import describe_image

    return describe_image(img)


def _load_audio(ref, **kw):
    from .data.audio import load_audio

    return load_audio(ref, **kw)


IMAGE_MODALITY = register_modality(Modality("image", 1, "<image>", _load_image, noun="image",
                                            batch_key="pixel_values", mime="image", describe=_describe_image))
IMAGE = IMAGE_MODALITY.id
IMAGE_PLACEHOLDER = IMAGE_MODALITY.placeholder
# Audio clips (WAV, FLAC, ... -> mono 16 kHz), encoded by a Whisper encoder (pill.encoders.whisper).
def _describe_audio(clip) -> dict:
    from .data.audio import describe_audio

    return describe_audio(clip)


AUDIO_MODALITY = register_modality(Modality("audio", 2, "<audio>", _load_audio, noun="audio clip", mime="audio",
                                            describe=_describe_audio))
AUDIO = AUDIO_MODALITY.id
AUDIO_PLACEHOLDER = AUDIO_MODALITY.placeholder

__all__ = ["TEXT", "IMAGE", "IMAGE_PLACEHOLDER", "AUDIO", "AUDIO_PLACEHOLDER", "Modality", "register_modality", "unregister_modality",
           "modality", "modality_by_id", "modalities", "next_free_id"]
