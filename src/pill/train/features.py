"""Cache of frozen VPG features: computed once per image, reused by every epoch and stage.

Entries are keyed by the SHA-256 of the image's encoded bytes and stored in safetensors
shards under a folder named by the VPG's fingerprint, so a changed image file or a
different VPG never hits a stale entry. Writes are atomic (temporary file, then rename), and
runs sharing a cache merge their index entries under a file lock instead of overwriting each
other's.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..data.images import load_image

ImageRef = Union[str, bytes]
INDEX = "index.json"


def default_cache_root() -> Path:
    from ..models import cache_dir

    return cache_dir() / "features"


class FeatureCache:
    """Features of one frozen encoder: ``get(keys) -> (N, K, d)``; ``build(inputs)`` fills what is missing.

    Each encoder has its own namespace (a folder named by its name and fingerprint), so the caches
    of several modalities share one root. ``load``: ``ref -> decoded input`` (default: images)."""

    def __init__(self, root: Union[str, Path, None], vpg, load=None):
        self.vpg = vpg
        self.load = load or load_image
        self.dir = Path(root or default_cache_root()) / f"{vpg.name}-{vpg.fingerprint()}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, str] = self._read_index()
        self._handles: dict[str, object] = {}

    def _read_index(self) -> dict[str, str]:
        path = self.dir / INDEX
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return {}  # a damaged index only costs a recomputation

    @contextlib.contextmanager
    def _locked(self):
        try:
            import fcntl
        except ImportError:  # no POSIX locks (Windows): concurrent runs may recompute, never corrupt
            yield
            return
        with open(self.dir / ".index.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write_index(self) -> None:
        """Merge this cache's entries into the index on disk (another run may have added its own)."""
        with self._locked():
            self.refresh()
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".index.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(self._index, f)
            os.replace(tmp, self.dir / INDEX)

    def refresh(self) -> None:
        """Pick up entries another run has written since this cache was opened."""
        self._index = {**self._read_index(), **self._index}

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def missing(self, keys: Iterable[str]) -> list[str]:
        return [k for k in dict.fromkeys(keys) if k not in self._index]

    @torch.no_grad()
    def build(self, images: dict[str, ImageRef], batch_size: int = 32, shard_size: int = 1024,
              progress: bool = True, device: Optional[torch.device] = None) -> int:
        """Compute features for the images (key -> path or bytes) not yet cached. Returns how many."""
        if self.missing(images):
            self.refresh()  # another run may have computed them meanwhile
        todo = self.missing(images)
        if not todo:
            return 0
        device = device or next(self.vpg.parameters()).device
        bar = tqdm(total=len(todo), desc=f"features ({self.vpg.name})", unit="input", disable=not progress)
        for start in range(0, len(todo), shard_size):
            chunk = todo[start:start + shard_size]
            tensors: dict[str, torch.Tensor] = {}
            for b in range(0, len(chunk), batch_size):
                keys = chunk[b:b + batch_size]
                pix = self.vpg.preprocess([self.load(images[k]) for k in keys]).to(device)
                feats = self.vpg(pix).float().cpu()  # (n, K, d)
                for k, f in zip(keys, feats):
                    tensors[k] = f.contiguous()
                bar.update(len(keys))
            name = f"shard-{hashlib.sha256(''.join(chunk).encode()).hexdigest()[:12]}.safetensors"
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".shard.", suffix=".tmp")
            os.close(fd)
            save_file(tensors, tmp)
            os.replace(tmp, self.dir / name)
            self._index.update({k: name for k in chunk})
            self._write_index()
        bar.close()
        return len(todo)

    def get(self, keys: Sequence[str]) -> torch.Tensor:
        """Stacked features (N, K, d) for ``keys`` (all must be cached)."""
        out = []
        for k in keys:
            shard = self._index.get(k)
            if shard is None:
                self.refresh()
                shard = self._index.get(k)
            if shard is None:
                raise KeyError(f"image {k[:12]}… has no cached features; run `pill features` or enable the cache")
            h = self._handles.get(shard)
            if h is None:
                h = self._handles[shard] = safe_open(str(self.dir / shard), framework="pt")
            out.append(h.get_tensor(k))
        return torch.stack(out)
