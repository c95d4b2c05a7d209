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


# -- tiny training runs: a random-init model on a small synthetic benchmark -----------------------

@pytest.fixture(scope="session")
def synth_small(tmp_path_factory):
    """The synthetic benchmark with 8 training and 4 test problems."""
    from pill.data.synth import make_synth

    root = tmp_path_factory.mktemp("synth_small")
    make_synth(root, n_train=8, n_test=4, seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_run_config(synth_small, tmp_path_factory):
    """``make(**changes) -> dict``: a run config of a tiny random-init model (2 steps an epoch);
    ``changes`` are dotted keys, e.g. ``make(**{"optim.lr": 1e-3})``."""
    cache = tmp_path_factory.mktemp("features_small")

    def make(**changes) -> dict:
        cfg = {"stage": "finetune",
               "model": {"llm": "llama", "random_init": True, "pool": 2},
               "data": {"format": "scienceqa", "root": str(synth_small), "split": "train", "prompt_format": "QCM-A",
                        "max_length": 160},
               "optim": {"lr": 3.0e-3, "epochs": 1, "batch_size": 4, "micro_batch_size": 4, "warmup_ratio": 0.1},
               "train": {"save_every": 1, "keep_last": 2, "cache_dir": str(cache), "log_every": 1}}
        for key, value in changes.items():
            *sections, last = key.split(".")
            node = cfg
            for part in sections:
                node = node.setdefault(part, {})
            node[last] = value
        return cfg

    return make


@pytest.fixture(scope="session")
def trained_run(tiny_run_config, tmp_path_factory):
    """A finished 2-step run (checkpoint at step 1, pill.safetensors at step 2) and its config file;
    copy it before changing it (``run_copy``)."""
    import yaml

    from pill.runconfig import load_config
    from pill.train.loop import train

    root = tmp_path_factory.mktemp("trained")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_run_config()))
    train(load_config(path), root / "run", progress=False)
    return root / "run", path


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A fresh copy of :func:`trained_run`'s run directory in ``tmp_path``, and its config file."""
    import shutil

    run, config = trained_run
    return shutil.copytree(run, tmp_path / "run"), config
