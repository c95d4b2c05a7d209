"""What every benchmark shares: the device, timing, memory probes, models and batches."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import re
import statistics
import time
from typing import Callable, Optional

import torch

from pill.encoders import VisualPromptGenerator

EMBEDDED_LLM = "smollm2-135m-instruct"
EMBEDDED_VPG = dict(num_tokens=49, dim=1280)  # EfficientNet-Lite0: 7 x 7 tokens of width 1280
TINY_LLM = dict()  # build_llm_from_config("llama") defaults: 2 layers, width 64, vocab 49152


# -- device ------------------------------------------------------------------------------

def pick_device(name: Optional[str] = None) -> torch.device:
    """``cuda`` when available (or asked for), else ``cpu``."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the training recipe); plain float32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# -- timing ------------------------------------------------------------------------------

def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of ``fn()``, with the device synchronised before and after."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleave(fns: dict[str, Callable[[], object]], warmup: int, reps: int, device: torch.device,
               log: Optional[Callable[[str], None]] = None) -> dict[str, list[float]]:
    """Run the contenders in turn, A B C A B C ..., ``warmup`` untimed rounds then ``reps`` timed.

    Interleaving spreads slow phases of a shared machine over every contender, so the
    ratios of medians from one run are fair even when absolute times drift.
    Returns name -> list of seconds (one per timed round).
    """
    times: dict[str, list[float]] = {n: [] for n in fns}
    for r in range(warmup + reps):
        for name, fn in fns.items():
            t = timed(fn, device)
            if r >= warmup:
                times[name].append(t)
            if log is not None:
                log(f"    {'warm-up' if r < warmup else f'rep {r - warmup + 1}'} {name}: {t * 1e3:.1f} ms")
    return times


def summary(ts: list[float]) -> dict:
    """Median, min and all samples, in seconds."""
    return {"median_s": statistics.median(ts), "min_s": min(ts), "samples_s": [round(t, 6) for t in ts]}


def ratio(a: list[float], b: list[float]) -> dict:
    """``a / b`` from the medians (the headline number), from the minima, and per round."""
    paired = [x / y for x, y in zip(a, b)]
    return {"median": statistics.median(a) / statistics.median(b), "min": min(a) / min(b),
            "median_of_paired": statistics.median(paired)}


# -- memory ------------------------------------------------------------------------------

def trim_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so that RSS reflects live data."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_bytes(field: str) -> int:
    """``field`` of ``/proc/self/status`` in bytes (Linux); elsewhere the peak from getrusage."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """Resident set size now (Linux ``VmRSS``; elsewhere the peak from getrusage)."""
    return _status_bytes("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size since the last :func:`reset_peak_rss` (or process start)."""
    return _status_bytes("VmHWM")


class SavedActivations:
    """Bytes of the tensors autograd saves for backward (storages counted once, parameters excluded).

    ``with SavedActivations(model) as s: loss = model(...)`` then ``s.bytes``.
    """

    def __init__(self, *modules: torch.nn.Module):
        self._params = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
        self._seen: dict[int, int] = {}
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            s = t.untyped_storage()
            ptr = s.data_ptr()
            if ptr not in self._params:
                self._seen[ptr] = max(self._seen.get(ptr, 0), s.nbytes())
        # Not ``t`` itself: a saved output would then hold its own grad_fn, a reference cycle
        # through C++ that keeps the whole graph alive after the output is dropped.
        return t.detach()

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self) -> "SavedActivations":
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


# -- models and batches ------------------------------------------------------------------

class FeatureVPG(VisualPromptGenerator):
    """A weightless stand-in VPG: the benchmarks feed precomputed features (N, K, d_vpg),
    so no contender holds or runs an image encoder while it is timed."""

    name = "precomputed"

    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.dim = dim

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("FeatureVPG has no encoder; pass image_features")


def load_base_llm(model: str, device: torch.device, seed: int = 0):
    """``embedded``: SmolLM2-135M-Instruct (cached safetensors); ``tiny``: a 2-layer random LLaMA."""
    from pill.models import build_llm_from_config, load_llm

    if model == "embedded":
        llm = load_llm(EMBEDDED_LLM)
    elif model == "tiny":
        llm = build_llm_from_config("llama", seed=seed, **TINY_LLM)
    else:
        raise ValueError(f"model: 'embedded' or 'tiny', got {model!r}")
    return llm.to(device)


def vpg_shape(model: str) -> tuple[int, int]:
    """(K visual tokens, d_vpg) of the image features fed to the model."""
    return (EMBEDDED_VPG["num_tokens"], EMBEDDED_VPG["dim"]) if model == "embedded" else (16, 1280)


def training_batch(vocab: int, batch: int, length: int, num_tokens: int, dim: int, device: torch.device,
                   answer_frac: float = 0.25, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of ``batch`` sequences of ``length`` tokens, each with one image at the start.

    Layout per row: BOS, K image slots (modality 1), prompt text, answer (the last
    ``answer_frac`` of the row, the only labelled positions). Returns input_ids,
    attention_mask, modality_ids, labels (B, T) and image_features (B, K, d_vpg).
    """
    g = torch.Generator().manual_seed(seed)
    if length < num_tokens + 8:
        raise ValueError(f"length {length} leaves no room for text next to {num_tokens} visual tokens")
    ids = torch.randint(10, vocab, (batch, length), generator=g)
    ids[:, 0] = 1
    mods = torch.zeros(batch, length, dtype=torch.long)
    mods[:, 1:1 + num_tokens] = 1
    ids[mods.bool()] = 0
    labels = torch.full_like(ids, -100)
    n_answer = max(1, int(length * answer_frac))
    labels[:, -n_answer:] = ids[:, -n_answer:]
    feats = torch.randn(batch, num_tokens, dim, generator=g)
    return {k: v.to(device) for k, v in dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                                              modality_ids=mods, labels=labels, image_features=feats).items()}


def machine() -> dict:
    """CPU model, cores, torch version, accelerator name."""
    info = {"cpu": None, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cuda": None}
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        info["cpu"] = m.group(1).strip() if m else None
    except OSError:
        pass
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    try:  # which library code was measured
        import subprocess

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "src"], capture_output=True, text=True)
        info["git"] = head.stdout.strip() + (" + uncommitted changes in src/" if dirty.stdout.strip() else "")
    except OSError:
        pass
    try:
        import transformers
        import peft

        info["transformers"] = transformers.__version__
        info["peft"] = peft.__version__
    except ImportError:
        pass
    return info
