"""Cache of frozen VPG features: computed once per image, reused by every epoch and stage.

Entries are keyed by the SHA-256 of the image's encoded bytes and stored in safetensors
shards under a folder named by the VPG's fingerprint, so a changed image file or a
different VPG never hits a stale entry. Writes are atomic (:func:`pill.io.write_atomic`), and
runs sharing a cache merge their index entries under a file lock instead of overwriting each
other's. A damaged index or shard costs a recomputation: :meth:`FeatureCache.build` checks the
shards of the entries it is asked for, warns, and computes the unreadable ones again.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from ..checkpoint import DIGEST, tensors_digest
from ..data.images import load_image
from ..errors import DataError
from ..io import write_atomic

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
        tag = vpg.precision_tag  # features computed in bf16 are kept apart from float32 ones
        self.dir = Path(root or default_cache_root()) / f"{vpg.name}-{vpg.fingerprint()}{'-' + tag if tag else ''}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, str] = self._read_index()
        self._handles: dict[str, object] = {}
        self.bad: dict[str, str] = {}  # inputs that could not be read (build with skip_bad)

    def _read_index(self) -> dict[str, str]:
        path = self.dir / INDEX
        if not path.is_file():
            return {}
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(index, dict) or not all(isinstance(v, str) for v in index.values()):
                raise ValueError("not a mapping of keys to shard names")
            return index
        except (ValueError, UnicodeDecodeError) as e:  # a damaged index only costs a recomputation
            if not getattr(self, "_warned_index", False):
                _warn(f"feature cache index {path} is unreadable ({e}); its entries are computed again")
                self._warned_index = True
            return {}

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
            write_atomic(self.dir / INDEX, json.dumps(self._index))

    def _forget_shard(self, shard: str, reason: str) -> None:
        """Drop an unreadable shard and every index entry that points at it (they are computed again)."""
        with self._locked():
            self.refresh()
            n = sum(v == shard for v in self._index.values())
            self._index = {k: v for k, v in self._index.items() if v != shard}
            write_atomic(self.dir / INDEX, json.dumps(self._index))
            (self.dir / shard).unlink(missing_ok=True)
        self._handles.pop(shard, None)
        _warn(f"feature cache shard {self.dir / shard} is unreadable ({reason}); its {n} entries are computed again")

    def _check_shards(self, keys: Iterable[str]) -> None:
        """Open the shard of every cached entry among ``keys`` and check its SHA-256; forget the shards
        that cannot be read, do not match it, or lack one of their entries."""
        by_shard: dict[str, list[str]] = {}
        for k in keys:
            if k in self._index:
                by_shard.setdefault(self._index[k], []).append(k)
        for shard, ks in by_shard.items():
            try:
                with safe_open(str(self.dir / shard), framework="pt") as f:
                    have = set(f.keys())
                    digest = (f.metadata() or {}).get(DIGEST)
                    if digest is not None and tensors_digest({k: f.get_tensor(k) for k in have}) != digest:
                        raise ValueError("its features differ from the SHA-256 recorded when it was written")
                lost = [k for k in ks if k not in have]
                if lost:
                    raise ValueError(f"{len(lost)} of its entries are not in it")
            except Exception as e:  # missing, truncated, not safetensors
                self._forget_shard(shard, f"{type(e).__name__}: {e}")

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
              progress: bool = True, device: Optional[torch.device] = None, skip_bad: bool = False) -> int:
        """Compute features for the images (key -> path or bytes) not yet cached. Returns how many.

        Cached entries whose shard cannot be read are computed again (with a warning). An input that
        cannot be read is a DataError, or with ``skip_bad`` is left out and recorded in
        ``self.bad`` (key -> message)."""
        if self.missing(images):
            self.refresh()  # another run may have computed them meanwhile
        self._check_shards(images)
        todo = [k for k in self.missing(images) if k not in self.bad]
        if not todo:
            return 0
        device = device or next(self.vpg.parameters()).device
        bar = tqdm(total=len(todo), desc=f"features ({self.vpg.name})", unit="input", disable=not progress)
        for start in range(0, len(todo), shard_size):
            chunk = todo[start:start + shard_size]
            tensors: dict[str, torch.Tensor] = {}
            for b in range(0, len(chunk), batch_size):
                keys, decoded = [], []
                for k in chunk[b:b + batch_size]:
                    try:
                        decoded.append(self.load(images[k]))
                        keys.append(k)
                    except DataError as e:
                        if not skip_bad:
                            raise
                        self.bad[k] = str(e)
                if keys:
                    pix = self.vpg.preprocess(decoded).to(device)
                    feats = self.vpg.encode(pix).float().cpu()  # (n, K, d)
                    for k, f in zip(keys, feats):
                        tensors[k] = f.contiguous()
                bar.update(len(chunk[b:b + batch_size]))
            if not tensors:
                continue
            name = f"shard-{hashlib.sha256(''.join(tensors).encode()).hexdigest()[:12]}.safetensors"
            write_atomic(self.dir / name, safetensors_bytes(tensors, metadata={DIGEST: tensors_digest(tensors)}))
            self._handles.pop(name, None)
            self._index.update({k: name for k in tensors})
            self._write_index()
        bar.close()
        return len(todo) - sum(k in self.bad for k in todo)

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
            try:
                h = self._handles.get(shard)
                if h is None:
                    h = self._handles[shard] = safe_open(str(self.dir / shard), framework="pt")
                t = h.get_tensor(k)
                if not bool(torch.isfinite(t).all()):
                    raise ValueError("they hold NaN or infinite values")
                out.append(t)
            except Exception as e:
                raise DataError(f"feature cache shard {self.dir / shard}: cannot read the features of {k[:12]}… "
                                f"({type(e).__name__}: {e}); delete the shard to compute them again") from None
        return torch.stack(out)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
