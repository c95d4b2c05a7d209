"""The one place that decides the training precision: bf16 autocast or float32.

``auto`` (the default of ``train.mixed_precision`` and ``pill demo --precision``) means bf16 where
the hardware runs it natively -- a CUDA GPU with bf16, or a CPU with ``avx512_bf16`` / ``amx_bf16``
-- and float32 everywhere else: on a CPU without those instructions bf16 is emulated and slower
than float32. The environment variable ``PILL_PRECISION`` (``auto``, ``bf16``, ``float32``) says
what ``auto`` means on this machine, so that either path can be forced from outside (the test
suite runs both on every CPU). A precision named in a config wins over the variable.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import ConfigError

ENV = "PILL_PRECISION"
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# names a user may write -> accelerate's mixed_precision value
_NAMES = {"auto": "auto", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16",
          "no": "no", "float32": "no", "fp32": "no"}


@dataclass(frozen=True)
class Precision:
    """A decision: ``mixed_precision`` is accelerate's value (``no``, ``bf16``, ``fp16``)."""

    mixed_precision: str
    reason: str

    @property
    def name(self) -> str:
        return "float32" if self.mixed_precision == "no" else self.mixed_precision

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The native-bf16 instruction sets this CPU reports (empty where it has none or cannot tell)."""
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return [f for f in BF16_CPU_FLAGS if f in flags]


def _normalise(value: str, where: str) -> str:
    key = str(value).strip().lower()
    if key not in _NAMES:
        raise ConfigError(f"{where}: must be one of auto, bf16, float32 (or no, fp16), got {value!r}")
    return _NAMES[key]


def resolve_precision(requested: str = "auto", *, cuda: bool | None = None) -> Precision:
    """Decide the training precision for ``requested`` (``auto``, ``bf16``, ``no``/``float32``, ``fp16``).

    ``auto`` is replaced by ``$PILL_PRECISION`` when that is set, then decided by the hardware.
    ``cuda``: whether training runs on a CUDA GPU (default: whether one is available)."""
    choice = _normalise(requested, "precision")
    if choice != "auto":
        return Precision(choice, "as configured")
    env = os.environ.get(ENV, "").strip()
    if env:
        choice = _normalise(env, ENV)
        if choice != "auto":
            return Precision(choice, f"forced by {ENV}={env}")
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if cuda:
        import torch

        if torch.cuda.is_bf16_supported():
            return Precision("bf16", "auto: this GPU supports bf16")
        return Precision("no", "auto: this GPU has no bf16")
    flags = cpu_bf16_flags()
    if flags:
        return Precision("bf16", f"auto: this CPU has native bf16 ({', '.join(flags)})")
    return Precision("no", "auto: this CPU has no native bf16 (no avx512_bf16 or amx_bf16), "
                           f"where bf16 is emulated and slower; {ENV}=bf16 forces it")


__all__ = ["Precision", "resolve_precision", "cpu_bf16_flags", "ENV"]
