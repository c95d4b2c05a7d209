"""The encoder interface: a frozen encoder turns one input (an image, ...) into K tokens of width d.

:class:`Encoder` is what every modality shares; :class:`ImageEncoder` adds image preprocessing.
The paper calls an image encoder a visual prompt generator (VPG), hence the alias.
"""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image


class Encoder(nn.Module):
    """A frozen encoder of one modality. Subclasses set ``name``, ``modality``, ``num_tokens``, ``dim``.

    ``forward(inputs) -> (N, num_tokens, dim)``.
    """

    name: str = "encoder"
    modality: str
    num_tokens: int
    dim: int
    compute_dtype: Optional[torch.dtype] = None  # None: float32; else autocast to it (set_compute_dtype)

    def set_compute_dtype(self, dtype: Optional[torch.dtype]) -> "Encoder":
        """Compute :meth:`encode` under autocast to ``dtype`` (``torch.bfloat16``); None: float32.
        The weights stay float32 and :meth:`encode` returns float32 features either way."""
        if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compute dtype: float32, bfloat16 or float16, got {dtype}")
        self.compute_dtype = None if dtype == torch.float32 else dtype
        return self

    @property
    def precision_tag(self) -> str:
        """``""`` in float32, else the compute dtype's short name (``bf16``): names cache namespaces."""
        return {None: "", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.compute_dtype]

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """``forward`` in the compute dtype (under autocast where it is not float32); float32 out."""
        if self.compute_dtype is None:
            return self(inputs)
        with torch.autocast(inputs.device.type, dtype=self.compute_dtype):
            return self(inputs).float()

    def freeze(self) -> "Encoder":
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode: bool = True):  # frozen: BatchNorm/dropout always in eval mode
        return super().train(False)

    def fingerprint_fields(self) -> tuple:
        """What, besides the weights, tells two encoders' tokens apart."""
        return (self.name, self.num_tokens, self.dim)

    def fingerprint(self) -> str:
        """Stable hash of the encoder's name, shape and weights (identifies cached features / checkpoints)."""
        h = hashlib.sha256("|".join(str(f) for f in self.fingerprint_fields()).encode())
        for n, t in sorted(self.state_dict().items()):
            if t.device.type == "meta":
                h.update(f"{n}{tuple(t.shape)}".encode())
                continue
            flat = t.detach().reshape(-1)
            # A strided sample of each tensor is enough to tell checkpoints apart, and fast.
            sample = flat[:: max(1, flat.numel() // 256)].to(torch.float64).cpu().numpy().tobytes()
            h.update(n.encode() + sample)
        return h.hexdigest()[:16]


class ImageEncoder(Encoder):
    """A frozen image encoder. Subclasses set ``name``, ``num_tokens``, ``dim`` and ``image_size``.

    ``forward(pixel_values (N, 3, H, W)) -> (N, num_tokens, dim)``;
    ``preprocess(list[PIL.Image]) -> (N, 3, H, W)`` float32.
    """

    name: str = "vpg"
    modality = "image"
    image_size: int = 224
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Resize (bicubic, to a square ``image_size``), scale to [0, 1], normalise with mean/std."""
        s = self.image_size
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        arrays = []
        for img in images:
            if img.mode != "RGB":
                img = img.convert("RGB")
            arr = np.asarray(img.resize((s, s), Image.BICUBIC), dtype=np.float32) / 255.0  # (H, W, 3)
            arrays.append((arr - mean) / std)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)

    normalisation_set: bool = False  # mean/std chosen by the config, not the checkpoint's

    def set_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> "ImageEncoder":
        """Normalise pixels with ``mean`` / ``std`` (per channel) instead of the checkpoint's own.
        The choice enters the fingerprint, so cached features and checkpoints tell the two apart."""
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.normalisation_set = True
        return self

    def fingerprint_fields(self) -> tuple:
        fields = (self.name, self.num_tokens, self.dim, self.image_size)
        return fields + (tuple(self.mean), tuple(self.std)) if self.normalisation_set else fields


VisualPromptGenerator = ImageEncoder  # the paper's name for an image encoder
