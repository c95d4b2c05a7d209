"""``pill --help``, ``pill <cmd> --help`` and argument errors import neither torch nor transformers.

Each call runs in a fresh interpreter under ``-X importtime``, whose report lists every module
the process imported; the wall time itself is measured in ``bench/run.py --only cli_startup``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "accelerate", "matplotlib")


def imported_modules(*args: str) -> tuple[set[str], subprocess.CompletedProcess]:
    """The top-level names of every module ``python -X importtime ARGS`` imported."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name.split(".")[0])
    return names, proc


@pytest.mark.parametrize("argv, code", [
    (["--help"], 0),
    (["train", "--help"], 0),
    (["params", "--help"], 0),
    (["data", "synth", "--help"], 0),
    (["train", "config.yaml", "--max-steps", "0"], 2),
    (["params", "--vpg", "nope"], 2),
    (["demo", "--pool", "99"], 2),
    (["no-such-command"], 2),
])
def test_help_and_argument_errors_import_no_heavy_module(argv, code):
    names, proc = imported_modules("-m", "pill", *argv)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "pill.cli" in proc.stderr  # the report is there: the check below can fail
    assert len(names) > 20, proc.stderr[-2000:]
    loaded = sorted(set(HEAVY) & names)
    assert not loaded, f"pill {' '.join(argv)} imported {loaded}"
    if code == 0:
        assert "usage: pill" in proc.stdout
    else:
        assert "Traceback" not in proc.stderr and "error:" in proc.stderr.splitlines()[-1]


def test_the_check_sees_torch_where_it_is_imported():
    """The same reading of the report finds torch where pill does import it (the model layer)."""
    names, proc = imported_modules("-c", "import pill.models")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch" in names and "pill" in names
