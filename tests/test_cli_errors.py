"""Every sub-command, given bad input, prints one line ``pill <command>: error: ...`` and exits 1.

The commands run in-process through :func:`pill.cli.main`. Loading a model is replaced by a
function that fails the test: a command must reject its input before it loads anything.
argparse's own errors (a bad value for a typed flag, a missing required flag) keep exit
code 2 and the usage text; their last line is the error.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pill.cli import error_line, main
from pill.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SQA = ROOT / "tests" / "assets" / "scienceqa"
STAGE2 = ROOT / "src" / "pill" / "configs" / "demo" / "stage2_synth.yaml"


class ModelLoaded(AssertionError):
    """Raised by the stand-ins for the model loaders: the input was not checked first."""


def _no_model(*args, **kwargs):
    raise ModelLoaded("a model (or the demo) was loaded before the bad input was rejected")


@pytest.fixture
def files(tmp_path, monkeypatch):
    """Bad inputs on disk, and model loaders that fail the test when called."""
    import pill.demo
    import pill.models
    import pill.train.loop
    import pill.vlm

    for module, name in ((pill.train.loop, "build_vlm"), (pill.train.loop, "train"), (pill.demo, "run_demo"),
                         (pill.models, "load_llm")):
        monkeypatch.setattr(module, name, _no_model)
    monkeypatch.setattr(pill.vlm.PillVLM, "from_pretrained", staticmethod(_no_model))
    (tmp_path / "bad.yaml").write_text("optim: [1,\n")
    (tmp_path / "unknown.yaml").write_text("bogus_key: 1\n")
    (tmp_path / "bad_pill.yaml").write_text("pill:\n  gate: everywhere\n")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "preds.json").write_text('{"results": {"103": 1}}')
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "empty_run").mkdir()
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(STAGE2, run / "config.yaml")
    (run / "pill.safetensors").write_bytes(b"")  # never read: the model is built first
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (run / "gates.json").write_text('{"layers": [0, 1], "mean_abs_gate": [0.5, 2.0]}')
    return tmp_path


def _argv(template: str, tmp: Path) -> list[str]:
    return [a.format(tmp=tmp, sqa=SQA, stage2=STAGE2) for a in template.split()]


# (argv, exit code, words the error line must contain)
CASES = [
    ("params --llm /nonexistent/llm-folder", 1, ["pill params: error:", "/nonexistent/llm-folder"]),
    ("params --config {tmp}/missing.yaml", 1, ["missing.yaml", "cannot read config"]),
    ("params --config {tmp}/bad_pill.yaml", 1, ["pill.gate", "everywhere"]),
    ("params --config {tmp}/bad.yaml", 1, ["bad.yaml", "YAML"]),
    ("params --vpg nope", 2, ["pill params: error:", "--vpg", "nope"]),
    ("demo --n-train 0", 2, ["pill demo: error:", "--n-train"]),
    ("demo --pool 99", 2, ["pill demo: error:", "--pool"]),
    ("demo --batch-size x", 2, ["pill demo: error:", "--batch-size"]),
    ("data synth --out {tmp}/s --n-train -1", 2, ["pill data synth: error:", "--n-train", "-1"]),
    ("data synth --out {tmp}/a_file/sub --n-train 1 --n-test 1", 1,
     ["pill data synth: error:", "--out", "a_file/sub", "Not a directory"]),
    ("data inspect scienceqa --root {tmp}/no_such_root", 1,
     ["pill data inspect scienceqa: error:", "no_such_root", "not found"]),
    ("data inspect scienceqa --root {sqa} --format QXX-A", 1, ["--format", "'QXX-A'"]),
    ("data inspect scienceqa --root {sqa} --split nosplit", 1, ["pid_splits.json", "'nosplit'"]),
    ("data inspect scienceqa --root {sqa} --limit 0", 2, ["--limit", "positive"]),
    ("data inspect llava --json {tmp}/missing.json --image-folder {tmp}", 1,
     ["pill data inspect llava: error:", "missing.json", "not found"]),
    ("train {tmp}/missing.yaml", 1, ["pill train: error:", "missing.yaml", "cannot read config"]),
    ("train {tmp}/bad.yaml", 1, ["pill train: error:", "bad.yaml", "invalid YAML"]),
    ("train {tmp}/unknown.yaml", 1, ["unknown.yaml", "unknown field 'bogus_key'"]),
    ("train {stage2} --set optim.lr=abc", 1, ["optim.lr", "expected a number", "'abc'"]),
    ("train {stage2} --set optim.lrr=1", 1, ["unknown field 'lrr'"]),
    ("train {stage2} --set nokey", 1, ["--set 'nokey'", "key=value"]),
    ("train {stage2} --max-steps 0", 2, ["pill train: error:", "--max-steps"]),
    ("features {tmp}/missing.yaml", 1, ["pill features: error:", "missing.yaml"]),
    ("eval scienceqa --run {tmp}/no_run", 1, ["pill eval scienceqa: error:", "no_run", "no config.yaml"]),
    ("eval scienceqa --run {tmp}/empty_run", 1, ["empty_run", "not a pill run directory"]),
    ("eval scienceqa", 2, ["pill eval scienceqa: error:", "--run"]),
    ("eval scienceqa --run {tmp}/run --data {sqa} --format QXX-A", 1, ["--format", "QXX-A"]),
    ("score scienceqa --predictions {tmp}/missing.json --data {sqa}", 1,
     ["pill score scienceqa: error:", "missing.json", "not found"]),
    ("score scienceqa --predictions {tmp}/bad.json --data {sqa}", 1, ["bad.json", "malformed predictions", "line 1"]),
    ("score scienceqa --predictions {tmp}/preds.json --data {sqa} --split nosplit", 1,
     ["pid_splits.json", "no split 'nosplit'"]),
    ("score scienceqa --predictions {tmp}/preds.json --data {tmp}/no_such_root", 1, ["no_such_root", "not found"]),
    ("chat --image {tmp}/missing.png hello", 1, ["pill chat: error:", "missing.png", "not found"]),
    ("chat --run {tmp}/no_run hello", 1, ["pill chat: error:", "no_run", "no config.yaml"]),
    ("plot training --run {tmp}/empty_run --out {tmp}/loss.png", 1,
     ["pill plot training: error:", "metrics.jsonl", "not found"]),
    ("plot training --run {tmp}/run --out {tmp}/a_file/loss.png", 1, ["a_file/loss.png", "cannot write"]),
    ("plot gates --run {tmp}/empty_run --out {tmp}/gates.png", 1, ["pill plot gates: error:", "gates.json"]),
    ("plot gates --run {tmp}/run --out {tmp}/gates.png", 1, ["run/gates.json", "layer 1", "[0, 1]"]),
    ("serve --run {tmp}/no_run", 1, ["pill serve: error:", "--run", "no_run", "no such run directory"]),
    ("serve --run {tmp}/empty_run", 1, ["pill serve: error:", "empty_run", "no config.yaml"]),
    ("serve --port 99999", 2, ["pill serve: error:", "--port", "99999"]),
]


def _case_id(case) -> str:
    argv = case.values[0] if hasattr(case, "values") else case[0]
    return " ".join(w for w in argv.split() if "{" not in w)[:60]


@pytest.mark.parametrize("argv, code, words", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_input_is_one_error_line(files, capsys, argv, code, words):
    try:
        status = main(_argv(argv, files))
    except SystemExit as e:  # argparse
        status = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert status == code, err
    if code == 1:
        assert len(lines) == 1, err
    else:
        assert lines[0].startswith("usage: pill "), err
    assert lines[-1].startswith("pill ") and ": error: " in lines[-1], err
    for word in words:
        assert word in lines[-1], f"{word!r} not in {lines[-1]!r}"


@pytest.mark.parametrize("argv, code", [
    ("train {tmp}/bad.yaml", 1),
    ("serve --port 99999", 2),
])
def test_error_line_from_a_real_process(files, argv, code):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "pill.cli", *_argv(argv, files)], capture_output=True, text=True,
                          env=env, cwd=files, timeout=300)
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"pill {argv.split()[0]}: error: ")


def test_error_line_is_one_line():
    assert error_line(ConfigError("a.yaml: invalid YAML: while parsing\n  in line 2\n    ^")) == \
        "a.yaml: invalid YAML: while parsing in line 2 ^"
    assert error_line(FileNotFoundError(2, "No such file or directory", "x/y.json")) == \
        "x/y.json: No such file or directory"
    assert error_line(OSError("no filename here")) == "no filename here"
