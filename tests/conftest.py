"""Shared fixtures: tiny random models built from config (no download), the embedded tokenizer."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `auto` precision depends on the CPU (bf16 where it is native): the suite takes the same float32 path
# on every machine, and the tests that cover bf16 force it (pill.precision). Subprocesses inherit this.
os.environ.setdefault("PILL_PRECISION", "float32")
# The test models are tiny: one thread avoids threads spinning against each other (and against
# other processes), which made tiny-model tests up to 100x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    from pill.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture
def tiny_llm():
    from pill.models import build_llm_from_config

    return build_llm_from_config("llama")


@pytest.fixture
def tiny_vpg():
    from pill.encoders.efficientnet import EfficientNetVPG

    torch.manual_seed(0)
    return EfficientNetVPG(pretrained=False, pool=2)  # 4 tokens of width 1280


@pytest.fixture
def tiny_vlm(tiny_llm, tiny_vpg, tokenizer):
    from pill.vlm import PillVLM

    torch.manual_seed(0)
    return PillVLM(tiny_llm, tiny_vpg, tokenizer)


@pytest.fixture(scope="session")
def embedded_llm():
    from pill.models import load_llm

    return load_llm("smollm2-135m-instruct")
