"""EfficientNet-Lite0's block table: channels and strides per block, valid layers and pools.

Plain Python (no torch), so that validating a config or listing the encoders stays light.
"""
from __future__ import annotations

from typing import Optional

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage of B0 / Lite0.
_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
# (out channels, total stride) of each of the 16 blocks, in order.
_BLOCKS = [(cout, 2 ** (1 + sum(1 for st in _STAGES[:k + 1] if st[2] == 2)))
           for k, (repeats, _, _, _, _, cout) in enumerate(_STAGES) for _ in range(repeats)]


# Valid ``layer`` values: a block index (negative counts from the end).
LAYERS = range(-len(_BLOCKS), len(_BLOCKS))


def feature_grid(layer: Optional[int] = None) -> int:
    """Side of the feature grid at 224 x 224 for block ``layer`` (None: the head)."""
    stride = 32 if layer is None else _BLOCKS[layer % len(_BLOCKS)][1]
    return 224 // stride


def pool_range(layer: Optional[int] = None) -> range:
    """Valid ``pool`` values for block ``layer`` (None: the head): 1 up to its feature grid."""
    return range(1, feature_grid(layer) + 1)
