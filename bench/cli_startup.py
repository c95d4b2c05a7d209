"""Start-up time of the ``pill`` command: help texts and argument errors, each in a fresh process.

What is timed is the whole command as a user types it (``python -m pill --help``): interpreter
start, imports, argument parsing, printing. Wall time is what a user waits; the child's CPU time
(user + system) is reported beside it because, unlike wall time, it barely changes when other
processes compete for the cores.
"""
from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

SRC = Path(__file__).resolve().parents[1] / "src"

CALLS = {
    "help": ["--help"],
    "train_help": ["train", "--help"],
    "params_help": ["params", "--help"],
    "bad_argument": ["train", "config.yaml", "--max-steps", "0"],
}


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(argv: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one ``python -m pill ARGV``."""
    cpu, t = _cpu_children(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pill", *argv], capture_output=True, env=env, timeout=120)
    elapsed = time.perf_counter() - t
    if proc.returncode not in (0, 2):
        raise RuntimeError(f"pill {' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode()[-500:]}")
    return elapsed, _cpu_children() - cpu


def bench_cli_startup(warmup: int = 1, reps: int = 5, log: Optional[Callable[[str], None]] = None) -> dict:
    """Median wall and CPU seconds of each call in :data:`CALLS` (interleaved; ``warmup`` untimed rounds)."""
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    wall: dict[str, list[float]] = {name: [] for name in CALLS}
    cpu: dict[str, list[float]] = {name: [] for name in CALLS}
    for i in range(warmup + reps):
        for name, argv in CALLS.items():
            w, c = _run(argv, env)
            if i >= warmup:
                wall[name].append(w)
                cpu[name].append(c)
    out = {"reps": reps, "calls": {n: "pill " + " ".join(a) for n, a in CALLS.items()},
           "median_s": {n: statistics.median(ts) for n, ts in wall.items()},
           "max_s": {n: max(ts) for n, ts in wall.items()},
           "median_cpu_s": {n: statistics.median(ts) for n, ts in cpu.items()}}
    out["slowest_median_s"] = max(out["median_s"].values())
    out["slowest_median_cpu_s"] = max(out["median_cpu_s"].values())
    if log:
        log("  " + ", ".join(f"{n} {out['median_s'][n]:.3f} s ({out['median_cpu_s'][n]:.3f} s CPU)" for n in CALLS))
    return out
