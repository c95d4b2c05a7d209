"""Config values are read by the type of the field they set, on the command line and in YAML files.

YAML 1.1 (PyYAML's default) reads ``no`` as False, ``010`` as 8 and ``1e-3`` as a string; none of
that may reach a config field. Each trap is checked on every kind of field it could land in.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pill.errors import ConfigError
from pill.runconfig import TrainConfig, apply_overrides, check_inputs, load_config

ROOT = Path(__file__).resolve().parents[1]
TRAPS = ["no", "yes", "on", "off", "y", "n", "~", "null", "0x10", "1e-3", "2.0e-3", "010", '"quoted"']


def from_overrides(*items: str) -> TrainConfig:
    return TrainConfig.from_dict(apply_overrides({"data": {"root": "."}}, list(items)))


def from_yaml(tmp_path, section: str, key: str, text: str) -> TrainConfig:
    path = tmp_path / "c.yaml"
    body = f"  {key}: {text}\n"
    path.write_text(f"data:\n  root: .\n{body}" if section == "data" else f"data:\n  root: .\n{section}:\n{body}")
    return load_config(path)


# field -> the value each trap must give, or ConfigError
STRING = {t: t for t in TRAPS} | {'"quoted"': "quoted"}  # data.split: a plain string field
OPTIONAL_STRING = {**STRING, "~": None, "null": None}  # data.system_prompt: Optional[str]
INTEGER = {t: ConfigError for t in TRAPS} | {"0x10": 16, "010": 10}  # optim.epochs
FLOAT = {t: ConfigError for t in TRAPS} | {"0x10": 16.0, "010": 10.0, "1e-3": 1e-3, "2.0e-3": 2e-3}  # optim.weight_decay
OPTIONAL_FLOAT = {**FLOAT, "~": None, "null": None}  # optim.grad_clip
BOOL = {t: ConfigError for t in TRAPS} | {"no": False, "yes": True, "on": True, "off": False, "y": True,
                                          "n": False}  # train.tensorboard
PRECISION = {t: ConfigError for t in TRAPS} | {"no": "no"}  # train.mixed_precision: Literal
CASES = [("data", "split", STRING), ("data", "system_prompt", OPTIONAL_STRING), ("optim", "epochs", INTEGER),
         ("optim", "weight_decay", FLOAT), ("optim", "grad_clip", OPTIONAL_FLOAT), ("train", "tensorboard", BOOL),
         ("train", "mixed_precision", PRECISION)]
PARAMS = [(s, k, t, expect[t]) for s, k, expect in CASES for t in TRAPS]


def _check(build, section, key, expected):
    if expected is ConfigError:
        with pytest.raises(ConfigError, match=f"{section}.{key}"):
            cfg = build()
            pytest.fail(f"accepted as {getattr(getattr(cfg, section), key)!r}")
        return
    value = getattr(getattr(build(), section), key)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("section, key, text, expected", PARAMS, ids=[f"{s}.{k}={t}" for s, k, t, _ in PARAMS])
def test_override_is_read_by_field_type(section, key, text, expected):
    _check(lambda: from_overrides(f"{section}.{key}={text}"), section, key, expected)


@pytest.mark.parametrize("section, key, text, expected", PARAMS, ids=[f"{s}.{k}={t}" for s, k, t, _ in PARAMS])
def test_yaml_file_value_is_read_by_field_type(tmp_path, section, key, text, expected):
    _check(lambda: from_yaml(tmp_path, section, key, text), section, key, expected)


def test_quoted_values_stay_strings_and_lists_are_typed():
    cfg = from_overrides("data.split='no'", "optim.betas=[0.9, 0.95]", "pill.layers=0,2", "data.system_prompt=",
                         "pill.activation=none", "data.limit=null", "optim.max_steps=1e3")
    assert cfg.data.split == "no" and cfg.optim.betas == [0.9, 0.95] and cfg.pill.layers == [0, 2]
    assert cfg.data.system_prompt == "" and cfg.pill.activation == "none" and cfg.data.limit is None
    assert cfg.optim.max_steps == 1000
    assert from_overrides("data.system_prompt=Answer: briefly.").data.system_prompt == "Answer: briefly."


@pytest.mark.parametrize("override, words", [
    ("train.mixed_precision=maybe", ["train.mixed_precision", "'auto', 'no', 'bf16', 'fp16'", "'maybe'"]),
    ("optim.max_steps=1.5", ["optim.max_steps", "an integer or null", "'1.5'"]),
    ("train.tensorboard=perhaps", ["train.tensorboard", "true or false"]),
    ("optim.lr=.inf", ["optim.lr", "finite"]),
    ("optim.lr=.nan", ["optim.lr", "finite"]),
    ("optim.betas=[0.9, x]", ["optim.betas[1]", "a number"]),
    ("optim.betas=[0.9", ["--set optim.betas", "cannot parse"]),
])
def test_a_value_that_fits_no_type_names_the_key_and_the_accepted_values(override, words):
    with pytest.raises(ConfigError) as e:
        from_overrides(override)
    for w in words:
        assert w in str(e.value)


def test_yaml_file_with_mixed_precision_no_trains(tmp_path):
    """The report's crash: ``mixed_precision: no`` in a file, and ``=no`` on the command line."""
    from pill.data.synth import make_synth

    make_synth(tmp_path / "data", n_train=8, n_test=2, seed=0, progress=False)
    path = tmp_path / "c.yaml"
    path.write_text(f"""stage: finetune
model: {{llm: llama, random_init: true, pool: 1}}
data: {{format: scienceqa, root: {tmp_path / 'data'}, prompt_format: QCM-A, max_length: 160}}
optim: {{lr: 1e-3, batch_size: 4, micro_batch_size: 4, max_steps: 1}}
train: {{mixed_precision: no, cache_dir: {tmp_path / 'cache'}}}
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for args in ([], ["--set", "train.mixed_precision=no"]):
        out = tmp_path / f"run{len(args)}"
        proc = subprocess.run([sys.executable, "-m", "pill.cli", "train", str(path), "--output", str(out), *args],
                              capture_output=True, text=True, cwd=ROOT, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (out / "pill.safetensors").is_file()
        assert "mixed_precision: 'no'" in (out / "config.yaml").read_text()
        assert "precision: float32 (as configured)" in proc.stdout


def test_missing_data_says_what_the_config_needs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/demo/data here
    path = ROOT / "configs" / "demo" / "stage1_synth.yaml"
    with pytest.raises(ConfigError) as e:
        check_inputs(load_config(path), path)
    assert "data.json runs/demo/data/captions_llava.json does not exist" in str(e.value)
    assert "pill data synth --out runs/demo/data" in str(e.value)
    proc = subprocess.run([sys.executable, "-m", "pill.cli", "train", str(path)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "pill data synth --out runs/demo/data" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_says_what_it_needs(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Needs: ") and len(first) > 20
