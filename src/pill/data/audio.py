"""Loading audio safely: WAV / FLAC / OGG through soundfile, mono, resampled to 16 kHz, clear errors.

A decoded clip is a :class:`Waveform`: float32 samples at :data:`SAMPLE_RATE` plus the name of
where it came from, so that a later check (an encoder's length limit) can still name the file.
Resampling is ``scipy.signal.resample_poly`` (polyphase, anti-aliased).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from math import gcd
from typing import Any, Union

import numpy as np

from ..errors import DataError

SAMPLE_RATE = 16_000  # what Whisper-style encoders read
MIN_RATE, MAX_RATE = 1_000, 384_000
MAX_CHANNELS = 8
MAX_FILE_SECONDS = 3_600.0  # refuse to decode more than an hour, whatever the encoder's own limit


@dataclass(frozen=True)
class Waveform:
    """Mono float32 samples at ``SAMPLE_RATE`` (``samples``: (S,)) and the source's name."""

    samples: np.ndarray
    source: str = "<audio>"

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE

    def __len__(self) -> int:
        return len(self.samples)


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """``samples`` (S,) at ``rate`` Hz -> float32 at ``target`` Hz (polyphase filter)."""
    if rate == target:
        return np.asarray(samples, dtype=np.float32)
    from scipy.signal import resample_poly

    g = gcd(int(rate), int(target))
    return resample_poly(samples, target // g, int(rate) // g).astype(np.float32)


def to_waveform(x: Any, rate: int = SAMPLE_RATE, name: str = "<audio>") -> Waveform:
    """A :class:`Waveform` from an array of samples at ``rate`` Hz ((S,) mono or (S, C) channels,
    mixed down), or ``(samples, rate)``, or a Waveform (returned as is). DataError names ``name``
    when the array is empty, not finite, has too many channels or an unusable rate."""
    if isinstance(x, Waveform):
        return x
    if isinstance(x, tuple) and len(x) == 2 and np.isscalar(x[1]):
        x, rate = x
    try:
        a = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError):
        raise DataError(f"{name}: not audio samples (got {type(x).__name__}); pass a file path, encoded bytes, "
                        "or an array of samples") from None
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or not MIN_RATE <= rate <= MAX_RATE:
        raise DataError(f"{name}: sample rate {rate!r} Hz; expected a whole number in {MIN_RATE}..{MAX_RATE}")
    if a.ndim == 2:
        if a.shape[1] > MAX_CHANNELS:
            raise DataError(f"{name}: {a.shape[1]} channels; expected mono or up to {MAX_CHANNELS} channels "
                            "as (samples, channels)")
        a = a.mean(axis=1)
    elif a.ndim != 1:
        raise DataError(f"{name}: audio samples of shape {a.shape}; expected (samples,) or (samples, channels)")
    if a.size == 0:
        raise DataError(f"{name}: empty audio (no samples)")
    if not np.isfinite(a).all():
        raise DataError(f"{name}: audio holds NaN or infinite samples")
    return Waveform(resample(a, int(rate)), name)


def load_audio(source: Union[str, os.PathLike, bytes], name: str | None = None) -> Waveform:
    """Decode ``source`` (a path or encoded bytes: WAV, FLAC, OGG, ...) to a mono 16 kHz Waveform.

    Raises DataError naming the file when it is missing, unreadable, not audio, empty, longer
    than :data:`MAX_FILE_SECONDS`, or has an unusable rate or channel count.
    """
    import soundfile as sf

    label = name or (str(source) if not isinstance(source, (bytes, bytearray)) else "<audio bytes>")
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    except FileNotFoundError:
        raise DataError(f"{label}: audio file not found") from None
    except OSError as e:
        raise DataError(f"{label}: cannot read audio file ({e.strerror or e})") from None
    with fp:
        try:
            with sf.SoundFile(fp) as f:
                rate, frames, channels = f.samplerate, f.frames, f.channels
                if not MIN_RATE <= rate <= MAX_RATE:
                    raise DataError(f"{label}: sample rate {rate} Hz; expected {MIN_RATE}..{MAX_RATE}")
                if channels > MAX_CHANNELS:
                    raise DataError(f"{label}: {channels} channels; at most {MAX_CHANNELS} are read")
                if frames > MAX_FILE_SECONDS * rate:
                    raise DataError(f"{label}: {frames / rate:.0f} s of audio, above the limit of "
                                    f"{MAX_FILE_SECONDS:.0f} s")
                data = f.read(dtype="float32", always_2d=True)  # (S, C)
        except DataError:
            raise
        except (RuntimeError, TypeError, ValueError, EOFError) as e:  # soundfile's errors derive from these
            reason = " ".join(str(e).split()) or type(e).__name__
            raise DataError(f"{label}: not an audio file, or an unsupported or corrupt one ({reason})") from None
    if data.shape[0] == 0:
        raise DataError(f"{label}: empty audio (0 samples)")
    return to_waveform(data, rate, label)


def encode_wav(samples: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """``samples`` (S,) float in [-1, 1] -> the bytes of a 16-bit PCM WAV file (deterministic)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(samples, -1.0, 1.0), rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def describe_audio(clip: Waveform) -> dict:
    """``{seconds, summary}`` of a decoded clip (shown with an upload)."""
    return {"seconds": round(clip.seconds, 3), "summary": f"{clip.seconds:.1f} s"}


__all__ = ["SAMPLE_RATE", "Waveform", "load_audio", "to_waveform", "resample", "encode_wav", "describe_audio"]
