"""Reading CTranslate2 model files (``model.bin``, binary format version 6) into numpy arrays.

The layout, little-endian throughout::

    uint32  format version (6)
    string  spec name (``WhisperSpec``)        string = uint16 byte count (NUL included) + bytes + NUL
    uint32  spec revision
    uint32  number of variables, then per variable:
        string name (``encoder/layer_0/ffn/linear_0/weight``)
        uint8  rank, uint32 x rank dimensions
        uint8  dtype id (0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16)
        uint32 byte count, then the raw values
    uint32  number of aliases, then per alias: string alias, string name of the variable it shares

Every byte is accounted for: a file that ends early, has bytes left over, or uses another format
version is an error that names it.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from ..errors import PillError

SUPPORTED_VERSION = 6
# dtype id -> numpy dtype; bfloat16 (5) has no numpy type and is read as its raw 16 bits
DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: np.uint16}
BFLOAT16 = 5


class CTranslate2FormatError(PillError):
    """A CTranslate2 model file is truncated, has trailing bytes, or uses an unknown format."""


@dataclass
class CTranslate2Model:
    """The variables of a CTranslate2 model file. ``variables``: name -> array (aliases resolved);
    ``bfloat16``: names whose arrays hold bfloat16 bits (as uint16)."""

    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)
    bfloat16: set[str] = field(default_factory=set)

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.variables[name]
        except KeyError:
            raise CTranslate2FormatError(f"{self.spec}: no variable {name!r} in the model file") from None

    def scalar(self, name: str) -> int:
        return int(self[name].reshape(-1)[0])


class _Reader:
    def __init__(self, data: memoryview, name: str):
        self.data, self.pos, self.name = data, 0, name

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise CTranslate2FormatError(f"{self.name}: truncated: wanted {n} bytes at offset {self.pos}, "
                                         f"the file has {len(self.data)}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size))

    def string(self) -> str:
        (n,) = self.unpack("H")
        raw = bytes(self.take(n))
        if not raw.endswith(b"\0"):
            raise CTranslate2FormatError(f"{self.name}: a string at offset {self.pos - n} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise CTranslate2FormatError(f"{self.name}: a string at offset {self.pos - n} is not UTF-8") from None


def parse_ctranslate2(data: Union[bytes, memoryview], name: str = "model.bin") -> CTranslate2Model:
    """Parse the bytes of a CTranslate2 ``model.bin``; ``name`` appears in errors."""
    r = _Reader(memoryview(data), name)
    (version,) = r.unpack("I")
    if version != SUPPORTED_VERSION:
        raise CTranslate2FormatError(f"{name}: CTranslate2 format version {version}; this reader knows version "
                                     f"{SUPPORTED_VERSION} only")
    spec = r.string()
    (revision,) = r.unpack("I")
    (count,) = r.unpack("I")
    variables: dict[str, np.ndarray] = {}
    bf16: set[str] = set()
    for _ in range(count):
        var = r.string()
        (rank,) = r.unpack("B")
        shape = r.unpack("I" * rank) if rank else ()
        dtype_id, nbytes = r.unpack("BI")
        if dtype_id not in DTYPES:
            raise CTranslate2FormatError(f"{name}: variable {var!r} has unknown dtype id {dtype_id}")
        dtype = np.dtype(DTYPES[dtype_id])
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes != expected:
            raise CTranslate2FormatError(f"{name}: variable {var!r} of shape {shape} holds {nbytes} bytes, "
                                         f"expected {expected}")
        variables[var] = np.frombuffer(r.take(nbytes), dtype=dtype).reshape(shape)
        if dtype_id == BFLOAT16:
            bf16.add(var)
    (n_alias,) = r.unpack("I")
    aliases = {}
    for _ in range(n_alias):
        alias, target = r.string(), r.string()
        if target not in variables:
            raise CTranslate2FormatError(f"{name}: alias {alias!r} points to the unknown variable {target!r}")
        aliases[alias] = target
        variables[alias] = variables[target]
    if r.pos != len(r.data):
        raise CTranslate2FormatError(f"{name}: {len(r.data) - r.pos} bytes left after the last alias "
                                     f"(offset {r.pos}); not a CTranslate2 version-{version} file")
    return CTranslate2Model(spec, revision, variables, aliases, bf16)


def read_ctranslate2(parts: Union[str, Path, Sequence[Union[str, Path]]]) -> CTranslate2Model:
    """Read a ``model.bin`` (or the parts it was split into, in order, joined) and parse it."""
    paths = [Path(parts)] if isinstance(parts, (str, Path)) else [Path(p) for p in parts]
    chunks = []
    for p in paths:
        try:
            chunks.append(p.read_bytes())
        except OSError as e:
            raise PillError(f"{p}: cannot read CTranslate2 model file ({e.strerror or e})") from None
    name = str(paths[0]) if len(paths) == 1 else " + ".join(str(p) for p in paths)
    return parse_ctranslate2(chunks[0] if len(chunks) == 1 else b"".join(chunks), name)


__all__ = ["CTranslate2Model", "CTranslate2FormatError", "parse_ctranslate2", "read_ctranslate2",
           "SUPPORTED_VERSION"]
