"""Datasets as ``Sample`` lists: ScienceQA, LLaVA JSON, and the built-in synthetic benchmark.

Every loader returns a :class:`SampleList` (a plain list of :class:`Sample` that also
carries a :class:`LoadReport` of what was read and what was skipped, and why).
:mod:`pill.data.collate` turns samples into token ids with labels on the assistant
turns only. This module stays import-light (no torch, no transformers).
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Union

from ..errors import DataError

from ..modalities import IMAGE_PLACEHOLDER as IMAGE_TOKEN
from ..modalities import modalities, modality


@dataclass
class Sample:
    """One training or evaluation example.

    Attributes:
        id: unique name of the sample (the ScienceQA qid, the LLaVA ``id``).
        messages: ``{"role": "system"|"user"|"assistant", "content": str}``; the text
            holds one placeholder per input (``<image>``, ...), in the order of that modality's inputs.
        images: image file paths (``str``) or encoded image ``bytes``.
        meta: loader-specific facts (ScienceQA: answer index, choices, subject, grade, ...).
        media: the inputs of the other registered modalities (:mod:`pill.modalities`), by name.
    """

    id: str
    messages: list[dict]
    images: list[Union[str, bytes]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    media: dict[str, list] = field(default_factory=dict)

    def inputs(self) -> dict[str, list]:
        """Every modality's inputs (name -> refs in placeholder order), those with none left out."""
        out = {"image": list(self.images)} if self.images else {}
        out.update({k: list(v) for k, v in self.media.items() if v})
        return out

    def with_inputs(self, inputs: dict[str, list]) -> "Sample":
        """A copy whose inputs are ``inputs`` (name -> refs)."""
        from dataclasses import replace

        rest = {k: list(v) for k, v in inputs.items() if k != "image"}
        return replace(self, images=list(inputs.get("image", [])), media=rest)


class BadSample(DataError):
    """A malformed sample; ``reason`` is the key it is counted under when skipped."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class LoadReport:
    """What a loader read and what it skipped, counted per reason (nothing is dropped silently).

    Attributes:
        source: the file or folder read.
        total: samples seen; ``kept`` of them were returned.
        skipped: reason -> number of samples skipped for it.
        examples: reason -> the first few error messages.
        counts: other facts (``with_image``, ``with_hint``, ...).
    """

    source: str
    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, message: str, keep_examples: int = 3) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < keep_examples:
            shown.append(message)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        lines = [f"{self.source}: kept {self.kept} of {self.total} samples"]
        for key, value in self.counts.items():
            lines.append(f"  {key}: {value}")
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"  skipped {n} ({reason}), e.g. {self.examples[reason][0]}")
        return "\n".join(lines)

    def print_if_skipped(self) -> None:
        if self.skipped:
            print(self.summary(), file=sys.stderr)


class SampleList(list):
    """A ``list[Sample]`` with the :class:`LoadReport` of the loader that built it."""

    def __init__(self, samples=(), report: LoadReport | None = None):
        super().__init__(samples)
        self.report = report if report is not None else LoadReport(source="<memory>")


def image_key(image: Union[str, bytes]) -> str:
    """The reference of an input (an image, an audio clip, ...) within a run: its path, or
    ``sha256:<content key>`` for encoded bytes. Batches name their inputs by it; the feature cache
    stores each input under its :func:`content_key`, which a reference of bytes already carries."""
    if isinstance(image, (bytes, bytearray)):
        return "sha256:" + content_key(image)
    return str(image)


def content_key(image: Union[str, bytes]) -> str:
    """SHA-256 hex of an input's encoded bytes (read from disk for a path; a ``sha256:`` reference
    gives its own): the identity of its content, under which its features are cached."""
    import hashlib

    if isinstance(image, (bytes, bytearray)):
        return hashlib.sha256(image).hexdigest()
    if isinstance(image, str) and image.startswith("sha256:"):
        return image[len("sha256:"):]
    try:
        with open(image, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest() if hasattr(hashlib, "file_digest") else \
                hashlib.sha256(f.read()).hexdigest()  # Python 3.10
    except OSError as e:
        raise DataError(f"{image}: cannot read input file ({e.strerror or e})") from None


def check_placeholders(sample: Sample, source: str, kind: str = "sample") -> None:
    """Raise BadSample unless each modality's placeholders match its inputs one to one.

    ``kind`` names the unit in messages ("sample", or "problem" for ScienceQA)."""
    have = sample.inputs()
    for m in modalities():
        n = sum(msg["content"].count(m.placeholder) for msg in sample.messages)
        k = len(have.get(m.name, []))
        if n != k:
            what = (f"{n} {m.placeholder} placeholder(s) but no {m.label}" if not k else
                    f"{k} {m.label}(s) but no {m.placeholder} placeholder" if n == 0 else
                    f"{n} {m.placeholder} placeholder(s) but {k} {m.label}(s)")
            raise BadSample(f"{source}: {kind} {sample.id}: {what}", "placeholder_mismatch")
        for msg in sample.messages:
            if msg["role"] == "assistant" and m.placeholder in msg["content"]:
                raise BadSample(f"{source}: {kind} {sample.id}: {m.placeholder} in an assistant turn",
                                "placeholder_mismatch")
    for name in have:
        modality(name)  # an unknown modality name is an error


def check_image(path_or_bytes: Union[str, bytes], sample_id: str, source: str, *, decode: bool,
                max_pixels: int | None = None, kind: str = "sample") -> None:
    """Raise BadSample (missing_image / bad_image / image_too_large) for an unusable image.

    ``decode=False`` only checks that a path exists; ``decode=True`` opens and decodes
    the image fully with :func:`pill.data.images.load_image`.
    """
    import os

    if isinstance(path_or_bytes, str) and not os.path.isfile(path_or_bytes):
        if os.path.exists(path_or_bytes):
            raise BadSample(f"{source}: {kind} {sample_id}: image path is not a regular file: {path_or_bytes}",
                            "bad_image")
        raise BadSample(f"{source}: {kind} {sample_id}: image file not found: {path_or_bytes}", "missing_image")
    if not decode:
        return
    from .images import DEFAULT_MAX_PIXELS, load_image

    name = f"{source}: image of {kind} {sample_id}" if isinstance(path_or_bytes, (bytes, bytearray)) else None
    try:
        load_image(path_or_bytes, max_pixels=max_pixels or DEFAULT_MAX_PIXELS, name=name)
    except DataError as e:
        text = str(e)
        reason = "image_too_large" if ("above the limit" in text or "decompression bomb" in text) else "bad_image"
        raise BadSample(f"{kind} {sample_id}: {text}", reason) from None


def check_input_file(path: str, modality_name: str, sample_id: str, source: str, kind: str = "sample") -> None:
    """Raise BadSample (missing_input / bad_input) unless ``path`` is a regular file (non-image inputs
    are decoded when a batch is built, with errors naming the file)."""
    import os

    m = modality(modality_name)
    if not os.path.isfile(path):
        reason = "bad_input" if os.path.exists(path) else "missing_input"
        what = "is not a regular file" if os.path.exists(path) else "not found"
        raise BadSample(f"{source}: {kind} {sample_id}: {m.label} file {what}: {path}", reason)


def inside_root(root: Union[str, os.PathLike], ref: str, *, what: str, where: str, root_name: str,
                allow_outside: bool = False) -> str:
    """``root/ref``, or BadSample (``outside_root``) when it resolves outside ``root``.

    ``ref`` is a path from a data file (a LLaVA ``image``, a ScienceQA image name); ``../``, an
    absolute path and symlinks (of the file or of any folder on the way) are followed before the
    check, and nothing is opened: a refused path is never read. ``what`` names the input in the
    message ("image"), ``where`` the file and sample (``data.json: sample 7``), ``root_name`` the
    folder ("the image folder"). ``allow_outside`` (``data.allow_outside_root``) skips the check.
    """
    path = os.path.join(str(root), ref)
    if allow_outside:
        return path
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise BadSample(f"{where}: {what} path {ref!r} is outside {root_name} {root} (it resolves to {real}); "
                        "set data.allow_outside_root: true if your data really lives there", "outside_root")
    return path


def read_json(path, what: str = "JSON") -> Any:
    """``json.load`` with a DataError naming the file, line and column of a syntax error."""
    import json

    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed {what} at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: {what} file is not UTF-8 text ({e.reason} at byte {e.start})") from None


__all__ = ["IMAGE_TOKEN", "Sample", "SampleList", "LoadReport", "BadSample", "image_key", "content_key",
           "check_placeholders",
           "check_input_file", "inside_root",
           "check_image", "read_json"]
